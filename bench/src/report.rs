//! How every `vkv bench` command and `vkv frag` hand over what they measured: the whole report
//! as pretty-printed JSON on stdout (`--json`), or the command's own table. One function, so the
//! choice reads the same everywhere and JSON is always the serialized report, nothing else.

use serde::Serialize;

/// Print `report` on stdout: as pretty JSON when `json`, else through `print_table`.
pub fn emit<R: Serialize + ?Sized>(
    report: &R,
    json: bool,
    print_table: impl FnOnce(&R),
) -> serde_json::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        print_table(report);
    }
    Ok(())
}

/// Today's date in UTC, `YYYY-MM-DD` (the civil-from-days algorithm of Howard Hinnant's date
/// library), for reports that say when they were measured.
pub fn utc_date() -> String {
    date_of(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    )
}

/// The UTC date `secs` seconds after the Unix epoch.
fn date_of(secs: u64) -> String {
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn dates_are_the_civil_calendar() {
        assert_eq!(super::date_of(0), "1970-01-01");
        assert_eq!(super::date_of(951_868_740), "2000-02-29");
        assert_eq!(super::date_of(1_796_601_600), "2026-12-07");
    }
}
