//! Parsers for the command line: sizes (`4k`, `1M`), durations (`10s`, `500ms`) and CPU
//! lists (`0,2-3`).

use std::num::{ParseFloatError, ParseIntError};
use std::time::{Duration, TryFromFloatSecsError};

/// A size, duration or CPU list that does not parse: the text as given, and what is wrong
/// with it. clap prints the message after `invalid value '…' for '--flag'`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// A size that does not start with a number.
    #[error("size {input:?}: expected a number with an optional k/M/G/T suffix")]
    SizeNoNumber {
        /// The size as given.
        input: String,
    },
    /// A size whose number does not parse (it has more digits than 64 bits hold).
    #[error("size {input:?}: {source}")]
    SizeNumber {
        /// The size as given.
        input: String,
        /// Why the number does not parse.
        #[source]
        source: ParseIntError,
    },
    /// A size with a suffix other than k/M/G/T (and their `i`/`ib`/`b` forms).
    #[error("size {input:?}: unknown suffix {suffix:?} (use k, M, G or T; binary units)")]
    SizeSuffix {
        /// The size as given.
        input: String,
        /// The suffix after the number.
        suffix: String,
    },
    /// A size whose number times its unit is more than 64 bits hold.
    #[error("size {input:?} overflows 64 bits")]
    SizeOverflow {
        /// The size as given.
        input: String,
    },
    /// A duration that does not start with a number.
    #[error("duration {input:?}: expected a number with an optional unit")]
    DurationNoNumber {
        /// The duration as given.
        input: String,
    },
    /// A duration whose number does not parse (e.g. `1.2.3`).
    #[error("duration {input:?}: {source}")]
    DurationNumber {
        /// The duration as given.
        input: String,
        /// Why the number does not parse.
        #[source]
        source: ParseFloatError,
    },
    /// A duration with a unit other than us/ms/s/m/h.
    #[error("duration {input:?}: unknown unit {unit:?} (use us, ms, s, m or h)")]
    DurationUnit {
        /// The duration as given.
        input: String,
        /// The unit after the number.
        unit: String,
    },
    /// A duration too long for a [`Duration`].
    #[error("duration {input:?}: {source}")]
    DurationRange {
        /// The duration as given.
        input: String,
        /// Why it is out of range.
        #[source]
        source: TryFromFloatSecsError,
    },
    /// A CPU list entry (or range end) that is not a CPU number.
    #[error("CPU list {list:?}: {entry:?}: {source}")]
    CpuNumber {
        /// The CPU list as given.
        list: String,
        /// The entry or range end that does not parse.
        entry: String,
        /// Why it does not parse.
        #[source]
        source: ParseIntError,
    },
    /// A CPU range whose first CPU is above its last.
    #[error("CPU list {list:?}: range {range:?} is backwards")]
    CpuRangeBackwards {
        /// The CPU list as given.
        list: String,
        /// The range, e.g. `3-1`.
        range: String,
    },
    /// A CPU that a `cpu_set_t` cannot hold.
    #[error(
        "CPU list {list:?}: CPU {cpu} is beyond CPU_SETSIZE ({})",
        libc::CPU_SETSIZE
    )]
    CpuBeyondSetSize {
        /// The CPU list as given.
        list: String,
        /// The CPU.
        cpu: usize,
    },
    /// A CPU named twice (directly or through overlapping ranges).
    #[error("CPU list {list:?}: CPU {cpu} appears twice")]
    CpuTwice {
        /// The CPU list as given.
        list: String,
        /// The CPU.
        cpu: usize,
    },
}

/// A size in bytes: a number with an optional binary suffix `k`/`m`/`g`/`t` (any case,
/// optionally followed by `i`/`ib`/`b`: `4k`, `4K`, `4KiB`, `1M`, `512`, `512b`).
pub fn parse_size(s: &str) -> Result<u64, ParseError> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits_end);
    if num.is_empty() {
        return Err(ParseError::SizeNoNumber { input: s.into() });
    }
    let n: u64 = num.parse().map_err(|source| ParseError::SizeNumber {
        input: s.into(),
        source,
    })?;
    let unit: u64 = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "ki" | "kib" => 1 << 10,
        "m" | "mb" | "mi" | "mib" => 1 << 20,
        "g" | "gb" | "gi" | "gib" => 1 << 30,
        "t" | "tb" | "ti" | "tib" => 1 << 40,
        _ => {
            return Err(ParseError::SizeSuffix {
                input: s.into(),
                suffix: suffix.into(),
            })
        }
    };
    n.checked_mul(unit)
        .ok_or_else(|| ParseError::SizeOverflow { input: s.into() })
}

/// A duration: a number (integer or decimal) with an optional unit `us`, `ms`, `s`, `m`,
/// `h`; no unit means seconds (`10s`, `10`, `1.5s`, `500ms`, `2m`).
pub fn parse_duration(s: &str) -> Result<Duration, ParseError> {
    let t = s.trim();
    let num_end = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(num_end);
    if num.is_empty() {
        return Err(ParseError::DurationNoNumber { input: s.into() });
    }
    let n: f64 = num.parse().map_err(|source| ParseError::DurationNumber {
        input: s.into(),
        source,
    })?;
    let secs_per_unit = match unit {
        "us" => 1e-6,
        "ms" => 1e-3,
        "" | "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => {
            return Err(ParseError::DurationUnit {
                input: s.into(),
                unit: unit.into(),
            })
        }
    };
    Duration::try_from_secs_f64(n * secs_per_unit).map_err(|source| ParseError::DurationRange {
        input: s.into(),
        source,
    })
}

/// A CPU list as taskset and cpuset take it: comma-separated CPU numbers and inclusive
/// ranges (`0`, `0,2`, `1-3,6`). Order is kept (it decides which queue gets which CPU);
/// duplicates are refused.
pub fn parse_cpu_list(s: &str) -> Result<Vec<usize>, ParseError> {
    let mut out = Vec::new();
    for part in s.split(',') {
        let part = part.trim();
        let num = |x: &str| {
            x.trim()
                .parse::<usize>()
                .map_err(|source| ParseError::CpuNumber {
                    list: s.into(),
                    entry: x.into(),
                    source,
                })
        };
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => {
                let n = num(part)?;
                (n, n)
            }
        };
        if lo > hi {
            return Err(ParseError::CpuRangeBackwards {
                list: s.into(),
                range: part.into(),
            });
        }
        if hi >= libc::CPU_SETSIZE as usize {
            return Err(ParseError::CpuBeyondSetSize {
                list: s.into(),
                cpu: hi,
            });
        }
        for cpu in lo..=hi {
            if out.contains(&cpu) {
                return Err(ParseError::CpuTwice {
                    list: s.into(),
                    cpu,
                });
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
    }

    #[test]
    fn bad_sizes_say_what_is_wrong() {
        for s in ["", "k", "-4k"] {
            assert_eq!(
                parse_size(s),
                Err(ParseError::SizeNoNumber { input: s.into() }),
                "{s:?}"
            );
        }
        assert_eq!(
            parse_size("4x"),
            Err(ParseError::SizeSuffix {
                input: "4x".into(),
                suffix: "x".into()
            })
        );
        assert_eq!(
            parse_size("1.5k"),
            Err(ParseError::SizeSuffix {
                input: "1.5k".into(),
                suffix: ".5k".into()
            })
        );
        assert_eq!(
            parse_size("99999999999T"),
            Err(ParseError::SizeOverflow {
                input: "99999999999T".into()
            })
        );
        let e = parse_size("99999999999999999999").unwrap_err();
        assert!(matches!(e, ParseError::SizeNumber { .. }), "{e:?}");
        assert!(std::error::Error::source(&e).is_some());
        assert_eq!(
            parse_size("4x").unwrap_err().to_string(),
            r#"size "4x": unknown suffix "x" (use k, M, G or T; binary units)"#
        );
        assert_eq!(
            parse_size("k").unwrap_err().to_string(),
            r#"size "k": expected a number with an optional k/M/G/T suffix"#
        );
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
    }

    #[test]
    fn bad_durations_say_what_is_wrong() {
        for s in ["s", "-1s", ""] {
            assert_eq!(
                parse_duration(s),
                Err(ParseError::DurationNoNumber { input: s.into() }),
                "{s:?}"
            );
        }
        assert_eq!(
            parse_duration("10x"),
            Err(ParseError::DurationUnit {
                input: "10x".into(),
                unit: "x".into()
            })
        );
        let e = parse_duration("1.2.3s").unwrap_err();
        assert!(matches!(e, ParseError::DurationNumber { .. }), "{e:?}");
        assert!(std::error::Error::source(&e).is_some());
        let long = format!("{}h", "9".repeat(20));
        let e = parse_duration(&long).unwrap_err();
        assert!(matches!(e, ParseError::DurationRange { .. }), "{e:?}");
        assert!(std::error::Error::source(&e).is_some());
        assert_eq!(
            parse_duration("10x").unwrap_err().to_string(),
            r#"duration "10x": unknown unit "x" (use us, ms, s, m or h)"#
        );
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0"), Ok(vec![0]));
        assert_eq!(parse_cpu_list("1,0"), Ok(vec![1, 0]));
        assert_eq!(parse_cpu_list("0-3"), Ok(vec![0, 1, 2, 3]));
        assert_eq!(parse_cpu_list("0,2-3, 6"), Ok(vec![0, 2, 3, 6]));
    }

    #[test]
    fn bad_cpu_lists_say_what_is_wrong() {
        let e = parse_cpu_list("").unwrap_err();
        assert!(
            matches!(&e, ParseError::CpuNumber { list, entry, .. } if list.is_empty() && entry.is_empty()),
            "{e:?}"
        );
        let e = parse_cpu_list("0,a").unwrap_err();
        assert!(
            matches!(&e, ParseError::CpuNumber { entry, .. } if entry == "a"),
            "{e:?}"
        );
        assert!(std::error::Error::source(&e).is_some());
        assert_eq!(
            e.to_string(),
            r#"CPU list "0,a": "a": invalid digit found in string"#
        );
        assert_eq!(
            parse_cpu_list("3-1"),
            Err(ParseError::CpuRangeBackwards {
                list: "3-1".into(),
                range: "3-1".into()
            })
        );
        assert_eq!(
            parse_cpu_list("0,0"),
            Err(ParseError::CpuTwice {
                list: "0,0".into(),
                cpu: 0
            })
        );
        assert_eq!(
            parse_cpu_list("0-2,1"),
            Err(ParseError::CpuTwice {
                list: "0-2,1".into(),
                cpu: 1
            })
        );
        let e = parse_cpu_list("100000").unwrap_err();
        assert_eq!(
            e,
            ParseError::CpuBeyondSetSize {
                list: "100000".into(),
                cpu: 100000
            }
        );
        assert_eq!(
            e.to_string(),
            format!(
                r#"CPU list "100000": CPU 100000 is beyond CPU_SETSIZE ({})"#,
                libc::CPU_SETSIZE
            )
        );
    }
}
