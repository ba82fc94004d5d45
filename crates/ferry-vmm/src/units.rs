//! The one set of units of ferry's command line and API clients.
//!
//! - Sizes ([`parse_size`]): `512M`, `4G`, `64KiB`, `2GB`: binary multiples (K = 1024), with an
//!   optional `B` or `iB`. A bare number is MiB, as QEMU's `-m` and virsh's `setmem --size`
//!   are read by people who type `512`.
//! - Rates ([`parse_rate`]): bytes per second as `100M` or `100MiB/s` (binary), or link speeds
//!   as `800Mbit` or `1Gbit/s` (decimal bits, as links are sold). A bare number is refused: it
//!   is bytes to some tools and bits to others.
#![forbid(unsafe_code)]

/// A size or rate that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    /// Not a size.
    #[error(
        "`{0}` is not a size: give a number with K, M, G or T (binary, 512M = 512 MiB), \
         optionally followed by B or iB; a bare number is MiB"
    )]
    Size(String),
    /// Not a rate (or a rate without a unit).
    #[error(
        "`{0}` is not a rate: give a unit, bytes per second as K, M, G or T (binary, 100M = \
         100 MiB/s, also written 100MiB/s) or bits per second as kbit, Mbit or Gbit (decimal, \
         1Gbit = 10^9 bit/s)"
    )]
    Rate(String),
    /// Does not fit in 64 bits.
    #[error("`{0}` is too large")]
    TooLarge(String),
}

/// The leading decimal number and what follows it.
fn split_number(t: &str) -> Option<(u64, &str)> {
    let end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let n = t[..end].parse().ok()?;
    Some((n, &t[end..]))
}

/// The shift of a binary unit: `K`, `M`, `G`, `T`, each optionally with `B` or `iB`.
fn binary_shift(unit: &str) -> Option<u32> {
    let prefix = unit
        .strip_suffix("iB")
        .or_else(|| unit.strip_suffix('B'))
        .unwrap_or(unit);
    match prefix {
        "K" | "k" => Some(10),
        "M" | "m" => Some(20),
        "G" | "g" => Some(30),
        "T" | "t" => Some(40),
        _ => None,
    }
}

fn scaled(n: u64, shift: u32, s: &str) -> Result<u64, UnitError> {
    n.checked_mul(1 << shift)
        .ok_or_else(|| UnitError::TooLarge(s.to_owned()))
}

/// Parses a size into bytes (see the module documentation).
pub fn parse_size(s: &str) -> Result<u64, UnitError> {
    let bad = || UnitError::Size(s.to_owned());
    let (n, unit) = split_number(s.trim()).ok_or_else(bad)?;
    let shift = match unit {
        "" => 20,
        "B" => 0,
        unit => binary_shift(unit).ok_or_else(bad)?,
    };
    scaled(n, shift, s)
}

/// Parses a rate into bytes per second (see the module documentation).
pub fn parse_rate(s: &str) -> Result<u64, UnitError> {
    let bad = || UnitError::Rate(s.to_owned());
    let t = s.trim();
    let t = t.strip_suffix("/s").unwrap_or(t);
    let (n, unit) = split_number(t).ok_or_else(bad)?;
    if let Some(prefix) = unit.strip_suffix("bit") {
        let scale: u64 = match prefix {
            "k" | "K" => 1_000,
            "M" => 1_000_000,
            "G" => 1_000_000_000,
            _ => return Err(bad()),
        };
        return n
            .checked_mul(scale)
            .map(|bits| bits / 8)
            .ok_or_else(|| UnitError::TooLarge(s.to_owned()));
    }
    scaled(n, binary_shift(unit).ok_or_else(bad)?, s)
}

/// `bytes` as MiB with one decimal, e.g. `512.0 MiB`.
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_binary_and_a_bare_number_is_mib() {
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("2GB"), Ok(2 << 30));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size(" 512 "), Ok(512 << 20));
        assert_eq!(parse_size("4096B"), Ok(4096));
        for bad in ["", "G", "4X", "-1M", "1.5G", "4 G", "512Mb"] {
            assert_eq!(parse_size(bad), Err(UnitError::Size(bad.into())), "{bad}");
        }
        assert_eq!(
            parse_size("99999999999T"),
            Err(UnitError::TooLarge("99999999999T".into()))
        );
    }

    #[test]
    fn rates_need_a_unit_and_take_bytes_or_bits() {
        assert_eq!(parse_rate("100M"), Ok(100 << 20));
        assert_eq!(parse_rate("100MiB/s"), Ok(100 << 20));
        assert_eq!(parse_rate("1G/s"), Ok(1 << 30));
        assert_eq!(parse_rate("1Gbit"), Ok(125_000_000));
        assert_eq!(parse_rate("800Mbit/s"), Ok(100_000_000));
        assert_eq!(parse_rate("64kbit"), Ok(8_000));
        for bad in ["512", "512/s", "", "M", "10bit", "1Tbit", "1mbit"] {
            assert_eq!(parse_rate(bad), Err(UnitError::Rate(bad.into())), "{bad}");
        }
        let e = parse_rate("512").unwrap_err().to_string();
        assert!(e.contains("give a unit") && e.contains("Mbit"), "{e}");
    }

    #[test]
    fn mib_has_one_decimal() {
        assert_eq!(mib(3 << 19), "1.5 MiB");
    }
}
