//! Query parameters shared by the bulk operations.

use chrono::{DateTime, Days, Months, NaiveDate, NaiveDateTime, TimeZone, Utc};

/// Parses `_since`: an ISO 8601 date (`2021-06-10`, midnight UTC) or date-time, with a zone
/// (`2021-06-10T08:26:10.707454+02:00`, `...Z`) or without one (read as UTC).
pub fn parse_instant(text: &str) -> Option<DateTime<Utc>> {
    if let Ok(at) = DateTime::parse_from_rfc3339(text) {
        return Some(at.with_timezone(&Utc));
    }
    for format in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%dT%H:%M"] {
        if let Ok(at) = NaiveDateTime::parse_from_str(text, format) {
            return Some(at.and_utc());
        }
    }
    NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .ok()
        .and_then(|date| date.and_hms_opt(0, 0, 0))
        .map(|at| at.and_utc())
}

/// Parses a boolean parameter: `true` or `false`, nothing else.
pub fn parse_bool(text: &str) -> Option<bool> {
    match text {
        "true" => Some(true),
        "false" => Some(false),
        _ => None,
    }
}

/// `from <= t < to`; `None`: unbounded on that side.
pub type InstantRange = (Option<DateTime<Utc>>, Option<DateTime<Utc>>);

/// `_lastUpdated=[prefix]date`: a date or date-time, with its precision as the range it
/// stands for (`2024-03` is all of March). Returns `from <= ts < to`.
pub fn last_updated(text: &str) -> Result<InstantRange, String> {
    let prefixes = ["eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap"];
    let (prefix, date) = match prefixes.iter().find(|p| text.starts_with(**p)) {
        Some(p) => (*p, &text[2..]),
        None => ("eq", text),
    };
    let (low, high) = instant_range(date)
        .ok_or_else(|| format!("_lastUpdated '{text}' is not a FHIR date or instant"))?;
    let (from, to) = match prefix {
        "eq" => (Some(low), Some(high)),
        "gt" | "sa" => (Some(high), None),
        "ge" => (Some(low), None),
        "lt" | "eb" => (None, Some(low)),
        "le" => (None, Some(high)),
        other => return Err(format!("_lastUpdated prefix '{other}' is not supported")),
    };
    Ok((from, to))
}

/// The instants a FHIR date or dateTime stands for: `[low, high)`.
fn instant_range(text: &str) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
    let day = |y: i32, m: u32, d: u32| NaiveDate::from_ymd_opt(y, m, d);
    let midnight = |date: NaiveDate| Some(Utc.from_utc_datetime(&date.and_hms_opt(0, 0, 0)?));
    let parts: Vec<&str> = text.split('-').collect();
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    match parts.as_slice() {
        [y] if y.len() == 4 && all_digits(y) => {
            let start = day(y.parse().ok()?, 1, 1)?;
            Some((
                midnight(start)?,
                midnight(start.checked_add_months(Months::new(12))?)?,
            ))
        }
        [y, m] if y.len() == 4 && m.len() == 2 && all_digits(y) && all_digits(m) => {
            let start = day(y.parse().ok()?, m.parse().ok()?, 1)?;
            Some((
                midnight(start)?,
                midnight(start.checked_add_months(Months::new(1))?)?,
            ))
        }
        [y, m, d] if d.len() == 2 && all_digits(y) && all_digits(m) && all_digits(d) => {
            let start = day(y.parse().ok()?, m.parse().ok()?, d.parse().ok()?)?;
            Some((
                midnight(start)?,
                midnight(start.checked_add_days(Days::new(1))?)?,
            ))
        }
        _ => {
            let at = parse_instant(text)?;
            Some((at, at + chrono::Duration::microseconds(1)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_in_every_iso_form() {
        let utc = |s: &str| {
            DateTime::parse_from_rfc3339(s)
                .map(|t| t.with_timezone(&Utc))
                .ok()
        };
        assert_eq!(parse_instant("2021-06-10"), utc("2021-06-10T00:00:00Z"));
        assert_eq!(
            parse_instant("2021-06-10T08:26:10Z"),
            utc("2021-06-10T08:26:10Z")
        );
        assert_eq!(
            parse_instant("2021-06-10T08:26:10.707454+02:00"),
            utc("2021-06-10T06:26:10.707454Z")
        );
        assert_eq!(
            parse_instant("2021-06-10T08:26:10.5"),
            utc("2021-06-10T08:26:10.5Z")
        );
        assert_eq!(
            parse_instant("2021-06-10T08:26"),
            utc("2021-06-10T08:26:00Z")
        );
        for bad in [
            "yesterday",
            "2021-13-01",
            "2021-06-10T25:00:00",
            "",
            "2021-06-10'; drop table x",
        ] {
            assert_eq!(parse_instant(bad), None, "{bad}");
        }
    }

    #[test]
    fn last_updated_ranges() {
        let (low, high) = instant_range("2024-02").expect("month");
        assert_eq!(low.to_rfc3339(), "2024-02-01T00:00:00+00:00");
        assert_eq!(high.to_rfc3339(), "2024-03-01T00:00:00+00:00");
        assert!(instant_range("2024-13").is_none());
        assert!(last_updated("ap2024").is_err());
        let (from, to) = last_updated("le2024-02-29").expect("valid");
        assert_eq!(
            (from, to.map(|t| t.to_rfc3339())),
            (None, Some("2024-03-01T00:00:00+00:00".into()))
        );
    }
}
