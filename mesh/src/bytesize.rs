//! Byte sizes as operators write them: `2GiB`, `512MiB`, `1048576`.

use std::fmt;
use std::str::FromStr;

/// A number of bytes, parsed from an integer with an optional binary (KiB, MiB, GiB, TiB) or decimal
/// (KB, MB, GB, TB) unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct ByteSize(pub u64);

const UNITS: &[(&str, u64)] = &[
    ("TiB", 1 << 40),
    ("GiB", 1 << 30),
    ("MiB", 1 << 20),
    ("KiB", 1 << 10),
    ("TB", 1_000_000_000_000),
    ("GB", 1_000_000_000),
    ("MB", 1_000_000),
    ("KB", 1_000),
    ("B", 1),
];

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (number, unit) = s.split_at(split);
        let unit = unit.trim();
        let number: u64 = number
            .parse()
            .map_err(|_| format!("{s:?} is not a byte size; write e.g. 2GiB, 512MiB or 1048576"))?;
        let multiplier = if unit.is_empty() {
            1
        } else {
            UNITS.iter().find(|(name, _)| name.eq_ignore_ascii_case(unit)).map(|(_, m)| *m).ok_or_else(
                || format!("unknown unit {unit:?} in {s:?}; use KiB, MiB, GiB, TiB (or KB, MB, GB, TB)"),
            )?
        };
        number.checked_mul(multiplier).map(ByteSize).ok_or_else(|| format!("{s:?} is too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, size) in &UNITS[..4] {
            if self.0 >= *size && self.0.is_multiple_of(*size) {
                return write!(f, "{}{name}", self.0 / size);
            }
        }
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        let cases = [
            ("0", 0),
            ("1048576", 1 << 20),
            ("2GiB", 2 << 30),
            ("512MiB", 512 << 20),
            ("64 KiB", 64 << 10),
            ("3gib", 3 << 30),
            ("5MB", 5_000_000),
            ("7B", 7),
        ];
        for (s, want) in cases {
            assert_eq!(s.parse::<ByteSize>(), Ok(ByteSize(want)), "{s}");
        }
        for bad in ["", "GiB", "1.5GiB", "-1", "2 parsecs", "99999999999TiB"] {
            assert!(bad.parse::<ByteSize>().is_err(), "{bad}");
        }
    }

    #[test]
    fn displays_in_the_largest_exact_unit() {
        assert_eq!(ByteSize(2 << 30).to_string(), "2GiB");
        assert_eq!(ByteSize(1536 << 20).to_string(), "1536MiB");
        assert_eq!(ByteSize(1000).to_string(), "1000");
    }
}
