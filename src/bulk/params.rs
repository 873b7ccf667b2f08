//! Query parameters shared by the bulk operations.

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};

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
}
