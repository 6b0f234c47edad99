//! Byte sizes as operators write them: `2GiB`, `512MiB`, `1048576`; and `--capacity`, which is
//! either a size or a share of the container's memory (`60%`).

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

/// A size for people: `512 B`, `90 KiB`, `2.0 GiB` (one decimal below 10 of a unit, none above).
pub fn human(bytes: u64) -> String {
    let Some((name, size)) = UNITS[..4].iter().find(|(_, size)| bytes >= *size) else {
        return format!("{bytes} B");
    };
    let value = bytes as f64 / *size as f64;
    if value < 10.0 { format!("{value:.1} {name}") } else { format!("{value:.0} {name}") }
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

/// `--capacity`: a size, or a share of the memory the container may use (its cgroup limit, else the
/// machine's memory), which is read when the node starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capacity {
    Bytes(ByteSize),
    /// Percent of the memory limit, 1 to 100.
    ShareOfMemory(u8),
}

impl Capacity {
    /// The capacity in bytes, given the memory a share is of.
    pub fn bytes_of(self, memory_bytes: u64) -> u64 {
        match self {
            Capacity::Bytes(size) => size.0,
            Capacity::ShareOfMemory(percent) => (u128::from(memory_bytes) * u128::from(percent) / 100) as u64,
        }
    }
}

impl FromStr for Capacity {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let Some(number) = s.strip_suffix('%') else { return s.parse().map(Capacity::Bytes) };
        let share =
            || format!("{s:?} is not a share of memory; write a whole percent from 1% to 100%, e.g. 60%");
        let percent: u8 = number.trim().parse().map_err(|_| share())?;
        if !(1..=100).contains(&percent) {
            return Err(share());
        }
        Ok(Capacity::ShareOfMemory(percent))
    }
}

impl fmt::Display for Capacity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Capacity::Bytes(size) => size.fmt(f),
            Capacity::ShareOfMemory(percent) => write!(f, "{percent}%"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_for_people() {
        let cases = [
            (0, "0 B"),
            (512, "512 B"),
            (1024, "1.0 KiB"),
            (92_160, "90 KiB"),
            (2 << 30, "2.0 GiB"),
            (3 * (1 << 40) / 2, "1.5 TiB"),
            (38_650, "38 KiB"),
        ];
        for (bytes, want) in cases {
            assert_eq!(human(bytes), want, "{bytes}");
        }
    }

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

    #[test]
    fn capacities_are_sizes_or_shares_of_memory() {
        let cases = [
            ("2GiB", Capacity::Bytes(ByteSize(2 << 30))),
            ("60%", Capacity::ShareOfMemory(60)),
            (" 1 % ", Capacity::ShareOfMemory(1)),
            ("100%", Capacity::ShareOfMemory(100)),
        ];
        for (s, want) in cases {
            assert_eq!(s.parse::<Capacity>(), Ok(want), "{s}");
        }
        for bad in ["0%", "101%", "60.5%", "-5%", "%", "x%", "lots"] {
            let e = bad.parse::<Capacity>().unwrap_err();
            assert!(e.contains(&format!("{:?}", bad.trim())), "{bad}: {e}");
        }
        assert!("150%".parse::<Capacity>().unwrap_err().contains("from 1% to 100%"));
        assert_eq!(Capacity::ShareOfMemory(60).bytes_of(10 << 30), 6 << 30);
        assert_eq!(Capacity::ShareOfMemory(100).bytes_of(u64::MAX), u64::MAX, "no overflow");
        assert_eq!(Capacity::Bytes(ByteSize(5)).bytes_of(1 << 30), 5, "a size is a size");
        assert_eq!(Capacity::ShareOfMemory(60).to_string(), "60%");
    }
}
