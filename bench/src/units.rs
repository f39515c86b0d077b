//! Byte sizes on the command line: `2MiB`, `64KiB`, `40GiB`, `4096`, `1.5GB` — parsed for the
//! flags of `vkv bench vmm` and `vkv frag` and for the CLI's engine options (`--page-size`,
//! `--kv-memory`), and printed in their reports. Binary units (KiB…TiB, and K/M/G/T alone) are
//! powers of 1024, decimal ones (KB…TB) of 1000; a size must come out a whole number of bytes.

/// Why a byte size does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ByteSizeError {
    /// No number before the unit.
    #[error("expected a size like 2MiB or 4096, found {text:?}")]
    NoNumber { text: String },
    /// A unit other than B, KiB…TiB, KB…TB or K/M/G/T.
    #[error("unknown size unit {unit:?} in {text:?} (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)")]
    UnknownUnit { unit: String, text: String },
    /// A size that is fractional, negative or too large once scaled.
    #[error("{text:?} is not a whole number of bytes")]
    NotWholeBytes { text: String },
}

/// Parse a byte size with an optional binary (KiB, MiB, GiB, TiB) or decimal (KB, MB, GB, TB)
/// suffix; `K`/`M`/`G`/`T` alone are binary.
pub fn parse_bytes(text: &str) -> Result<usize, ByteSizeError> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: f64 = number.parse().map_err(|_| ByteSizeError::NoNumber {
        text: text.to_string(),
    })?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024.0 * 1024.0,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tib" => 1024f64.powi(4),
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        other => {
            return Err(ByteSizeError::UnknownUnit {
                unit: other.to_string(),
                text: text.to_string(),
            })
        }
    };
    let bytes = number * scale;
    if !bytes.is_finite() || bytes < 0.0 || bytes > usize::MAX as f64 || bytes.fract() != 0.0 {
        return Err(ByteSizeError::NotWholeBytes {
            text: text.to_string(),
        });
    }
    Ok(bytes as usize)
}

/// `2 MiB`, `64 KiB`, `512 B`: the largest binary unit that divides evenly.
pub fn format_bytes(bytes: usize) -> String {
    for (unit, size) in [("GiB", 1usize << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if bytes >= size && bytes.is_multiple_of(size) {
            return format!("{} {unit}", bytes / size);
        }
    }
    format!("{bytes} B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_print() {
        assert_eq!(parse_bytes("2MiB"), Ok(2 << 20));
        assert_eq!(parse_bytes("64KiB"), Ok(64 << 10));
        assert_eq!(parse_bytes("40GiB"), Ok(40 << 30));
        assert_eq!(parse_bytes("1.5GB"), Ok(1_500_000_000));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert!(parse_bytes("2 parsecs")
            .unwrap_err()
            .to_string()
            .contains("unknown size unit"));
        assert!(parse_bytes("MiB").is_err());
        assert!(parse_bytes("0.5B").is_err());
        assert_eq!(format_bytes(2 << 20), "2 MiB");
        assert_eq!(format_bytes(3000), "3000 B");
    }
}
