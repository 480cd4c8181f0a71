//! Byte sizes with suffixes: `512`, `4K`, `512M`, `1G`, `2T` (binary units).

use std::fmt;

/// Why a size string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid size {input:?}: {reason} (examples: 4096, 64K, 512M, 1G)")]
pub struct SizeError {
    input: String,
    reason: &'static str,
}

/// Parses a byte count with an optional binary suffix (K, M, G, T; an optional
/// trailing `B` or `iB` is accepted).
pub(crate) fn parse_size_bytes(input: &str) -> Result<u64, SizeError> {
    let err = |reason| SizeError {
        input: input.to_owned(),
        reason,
    };
    let s = input.trim();
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    if digits_end == 0 {
        return Err(err("expected a number"));
    }
    let value: u64 = s[..digits_end]
        .parse()
        .map_err(|_| err("number too large"))?;
    let suffix = s[digits_end..].trim().to_ascii_uppercase();
    let shift = match suffix.trim_end_matches("IB").trim_end_matches('B') {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(err("unknown suffix")),
    };
    value
        .checked_mul(1u64 << shift)
        .ok_or_else(|| err("size overflows 64 bits"))
}

/// Formats a byte count in the largest binary unit that divides it.
pub(crate) struct HumanBytes(pub u64);

impl fmt::Display for HumanBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u32); 4] = [("T", 40), ("G", 30), ("M", 20), ("K", 10)];
        for (unit, shift) in UNITS {
            if self.0 >= 1 << shift && self.0 % (1 << shift) == 0 {
                return write!(f, "{}{}", self.0 >> shift, unit);
            }
        }
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_suffixes() {
        assert_eq!(parse_size_bytes("4096"), Ok(4096));
        assert_eq!(parse_size_bytes("64K"), Ok(64 << 10));
        assert_eq!(parse_size_bytes("512M"), Ok(512 << 20));
        assert_eq!(parse_size_bytes("1G"), Ok(1 << 30));
        assert_eq!(parse_size_bytes("1g"), Ok(1 << 30));
        assert_eq!(parse_size_bytes("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size_bytes("3T"), Ok(3 << 40));
    }

    #[test]
    fn refuses_garbage() {
        assert!(parse_size_bytes("").is_err());
        assert!(parse_size_bytes("G").is_err());
        assert!(parse_size_bytes("12Q").is_err());
        assert!(parse_size_bytes("-1").is_err());
        assert!(parse_size_bytes("99999999999T").is_err());
        let msg = parse_size_bytes("12Q").unwrap_err().to_string();
        assert!(
            msg.contains("\"12Q\"") && msg.contains("unknown suffix"),
            "{msg}"
        );
    }

    #[test]
    fn formats_human() {
        assert_eq!(HumanBytes(1 << 30).to_string(), "1G");
        assert_eq!(HumanBytes(1536 << 20).to_string(), "1536M");
        assert_eq!(HumanBytes(1000).to_string(), "1000");
    }
}
