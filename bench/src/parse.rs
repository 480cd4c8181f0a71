//! Parsers for the command line: sizes (`4k`, `1M`), durations (`10s`, `500ms`) and CPU
//! lists (`0,2-3`).

use std::time::Duration;

/// A size in bytes: a number with an optional binary suffix `k`/`m`/`g`/`t` (any case,
/// optionally followed by `i`/`ib`/`b`: `4k`, `4K`, `4KiB`, `1M`, `512`, `512b`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits_end);
    if num.is_empty() {
        return Err(format!(
            "size {s:?}: expected a number with an optional k/M/G/T suffix"
        ));
    }
    let n: u64 = num.parse().map_err(|e| format!("size {s:?}: {e}"))?;
    let unit: u64 = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "ki" | "kib" => 1 << 10,
        "m" | "mb" | "mi" | "mib" => 1 << 20,
        "g" | "gb" | "gi" | "gib" => 1 << 30,
        "t" | "tb" | "ti" | "tib" => 1 << 40,
        _ => {
            return Err(format!(
                "size {s:?}: unknown suffix {suffix:?} (use k, M, G or T; binary units)"
            ))
        }
    };
    n.checked_mul(unit)
        .ok_or_else(|| format!("size {s:?} overflows 64 bits"))
}

/// A duration: a number (integer or decimal) with an optional unit `us`, `ms`, `s`, `m`,
/// `h`; no unit means seconds (`10s`, `10`, `1.5s`, `500ms`, `2m`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let num_end = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(num_end);
    if num.is_empty() {
        return Err(format!(
            "duration {s:?}: expected a number with an optional unit"
        ));
    }
    let n: f64 = num.parse().map_err(|e| format!("duration {s:?}: {e}"))?;
    let secs_per_unit = match unit {
        "us" => 1e-6,
        "ms" => 1e-3,
        "" | "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => {
            return Err(format!(
                "duration {s:?}: unknown unit {unit:?} (use us, ms, s, m or h)"
            ))
        }
    };
    Duration::try_from_secs_f64(n * secs_per_unit).map_err(|e| format!("duration {s:?}: {e}"))
}

/// A CPU list as taskset and cpuset take it: comma-separated CPU numbers and inclusive
/// ranges (`0`, `0,2`, `1-3,6`). Order is kept (it decides which queue gets which CPU);
/// duplicates are refused.
pub fn parse_cpu_list(s: &str) -> Result<Vec<usize>, String> {
    let mut out = Vec::new();
    for part in s.split(',') {
        let part = part.trim();
        let num = |x: &str| {
            x.trim()
                .parse::<usize>()
                .map_err(|e| format!("CPU list {s:?}: {x:?}: {e}"))
        };
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => {
                let n = num(part)?;
                (n, n)
            }
        };
        if lo > hi {
            return Err(format!("CPU list {s:?}: range {part:?} is backwards"));
        }
        if hi >= libc::CPU_SETSIZE as usize {
            return Err(format!(
                "CPU list {s:?}: CPU {hi} is beyond CPU_SETSIZE ({})",
                libc::CPU_SETSIZE
            ));
        }
        for cpu in lo..=hi {
            if out.contains(&cpu) {
                return Err(format!("CPU list {s:?}: CPU {cpu} appears twice"));
            }
            out.push(cpu);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("512b"), Ok(512));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("4KiB"), Ok(4096));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert!(parse_size("").is_err());
        assert!(parse_size("k").is_err());
        assert!(parse_size("4x").is_err());
        assert!(parse_size("-4k").is_err());
        assert!(parse_size("1.5k").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("10x").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0"), Ok(vec![0]));
        assert_eq!(parse_cpu_list("1,0"), Ok(vec![1, 0]));
        assert_eq!(parse_cpu_list("0-3"), Ok(vec![0, 1, 2, 3]));
        assert_eq!(parse_cpu_list("0,2-3, 6"), Ok(vec![0, 2, 3, 6]));
        assert!(parse_cpu_list("").is_err());
        assert!(parse_cpu_list("3-1").is_err());
        assert!(parse_cpu_list("0,0").is_err());
        assert!(parse_cpu_list("a").is_err());
        assert!(parse_cpu_list("100000").is_err());
    }
}
