//! Time spans and send windows written by people in definitions.
//!
//! Definitions are hand-written JSON, so waits are spelled the way people say
//! them (`"2 days"`, `"1h 30m"`) rather than as raw seconds, and delay windows
//! (`{"start": "09:00", "end": "17:00", "days": ["mon", "fri"]}`) are read in
//! the contact's own time zone.

use chrono::{
    DateTime, Datelike, Duration, LocalResult, NaiveDate, NaiveTime, TimeZone, Utc, Weekday,
};
use chrono_tz::Tz;
use serde_json::Value;

use crate::fault::{child, index, reject_unknown_keys, type_name, Fault};

const DURATION_HELP: &str = "a duration is one or more whole numbers with units, e.g. \"2 days\", \"1 hour 30 minutes\", \"45s\"; units: s/sec/second(s), m/min/minute(s), h/hr/hour(s), d/day(s), w/week(s)";

/// Parses human durations used in definitions: "2 days", "1 hour 30 minutes", "90 seconds", "45s", "15m", "2h", "3d", "1 week".
///
/// Resolution is one second. Parts add up, whitespace between number and unit
/// is optional, and parts may be separated by spaces or commas. Units are
/// case-insensitive. "0 seconds" is a valid zero duration.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let fail = |what: String| Err(format!("{what}; {DURATION_HELP}"));
    let chars: Vec<char> = s.chars().collect();
    let mut i = 0;
    let mut total: i64 = 0;
    let mut parts = 0;
    loop {
        while i < chars.len() && (chars[i].is_whitespace() || (parts > 0 && chars[i] == ',')) {
            i += 1;
        }
        if i >= chars.len() {
            break;
        }
        if chars[i] == '-' {
            return fail(format!("negative durations are not allowed (got {s:?})"));
        }
        let digits_start = i;
        while i < chars.len() && chars[i].is_ascii_digit() {
            i += 1;
        }
        if i == digits_start {
            return fail(format!(
                "expected a number at {:?} in {s:?}",
                tail(&chars, i)
            ));
        }
        if i < chars.len()
            && (chars[i] == '.' || chars[i] == ',')
            && chars.get(i + 1).is_some_and(char::is_ascii_digit)
        {
            return fail(format!("only whole numbers are allowed (got {s:?})"));
        }
        let digits: String = chars[digits_start..i].iter().collect();
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        let unit_start = i;
        while i < chars.len() && chars[i].is_alphabetic() {
            i += 1;
        }
        let unit: String = chars[unit_start..i]
            .iter()
            .collect::<String>()
            .to_lowercase();
        if unit.is_empty() {
            return fail(format!("missing unit after {digits} in {s:?}"));
        }
        let Some(unit_secs) = unit_seconds(&unit) else {
            return fail(format!("unknown unit {unit:?} in {s:?}"));
        };
        let part = digits
            .parse::<i64>()
            .ok()
            .and_then(|n| n.checked_mul(unit_secs))
            .and_then(|n| total.checked_add(n));
        match part {
            Some(t) if t <= MAX_SECONDS => total = t,
            _ => {
                return fail(format!(
                    "{s:?} is too long; at most {} days",
                    MAX_SECONDS / 86_400
                ))
            }
        }
        parts += 1;
    }
    if parts == 0 {
        return fail("the duration is empty".to_owned());
    }
    Duration::try_seconds(total).map_or_else(|| fail(format!("{s:?} is out of range")), Ok)
}

/// Longest accepted duration: 100 years, far beyond any sane wait, and far
/// inside what timestamps can hold.
const MAX_SECONDS: i64 = 100 * 366 * 86_400;

fn unit_seconds(unit: &str) -> Option<i64> {
    Some(match unit {
        "s" | "sec" | "secs" | "second" | "seconds" => 1,
        "m" | "min" | "mins" | "minute" | "minutes" => 60,
        "h" | "hr" | "hrs" | "hour" | "hours" => 3_600,
        "d" | "day" | "days" => 86_400,
        "w" | "week" | "weeks" => 604_800,
        _ => return None,
    })
}

fn tail(chars: &[char], i: usize) -> String {
    chars[i..].iter().take(20).collect()
}

/// A daily window during which a delayed step may run, in the contact's zone.
/// The window is `start <= local time < end` on the listed days.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimeWindow {
    pub start: NaiveTime,
    pub end: NaiveTime,
    /// Days the window opens; parsing fills all seven when "days" is absent.
    /// An empty list is treated as every day.
    pub days: Vec<Weekday>,
}

const DAY_NAMES: &str = "mon, tue, wed, thu, fri, sat, sun";

impl TimeWindow {
    /// Parses `{"start":"09:00","end":"17:00","days":["mon",…]}`; collects every fault.
    pub fn parse(v: &Value, path: &str) -> Result<TimeWindow, Vec<Fault>> {
        let mut faults = Vec::new();
        let Value::Object(obj) = v else {
            return Err(vec![Fault::new(
                path,
                format!(
                    "window must be an object like {{\"start\": \"09:00\", \"end\": \"17:00\", \"days\": [\"mon\", \"tue\"]}}; got {}",
                    type_name(v)
                ),
            )]);
        };
        reject_unknown_keys(
            obj,
            &["start", "end", "days"],
            path,
            "in a window",
            &mut faults,
        );
        let mut time = |key: &str| match obj.get(key) {
            None => {
                faults.push(Fault::new(
                    child(path, key),
                    format!("{key} is required, as 24-hour \"HH:MM\""),
                ));
                None
            }
            Some(t) => {
                let parsed = t.as_str().and_then(parse_hhmm);
                if parsed.is_none() {
                    faults.push(Fault::new(
                        child(path, key),
                        format!("{key} must be a 24-hour time \"HH:MM\" from \"00:00\" to \"23:59\"; got {t}"),
                    ));
                }
                parsed
            }
        };
        let start = time("start");
        let end = time("end");
        if let (Some(s), Some(e)) = (start, end) {
            if s >= e {
                faults.push(Fault::new(
                    child(path, "end"),
                    "end must be later than start on the same day (windows cannot span midnight)",
                ));
            }
        }
        let days = match obj.get("days") {
            None | Some(Value::Null) => ALL_DAYS.to_vec(),
            Some(Value::Array(items)) if items.is_empty() => {
                faults.push(Fault::new(
                    child(path, "days"),
                    format!(
                        "days must list at least one of {DAY_NAMES} (leave it out for every day)"
                    ),
                ));
                Vec::new()
            }
            Some(Value::Array(items)) => {
                let mut days = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    match item.as_str().and_then(parse_day) {
                        Some(d) if !days.contains(&d) => days.push(d),
                        Some(_) => {}
                        None => faults.push(Fault::new(
                            index(&child(path, "days"), i),
                            format!("unknown day {item}; days are {DAY_NAMES}"),
                        )),
                    }
                }
                days
            }
            Some(other) => {
                faults.push(Fault::new(
                    child(path, "days"),
                    format!(
                        "days must be an array of {DAY_NAMES}; got {}",
                        type_name(other)
                    ),
                ));
                Vec::new()
            }
        };
        match (start, end) {
            (Some(start), Some(end)) if faults.is_empty() => Ok(TimeWindow { start, end, days }),
            _ => Err(faults),
        }
    }

    fn open_on(&self, day: Weekday) -> bool {
        self.days.is_empty() || self.days.contains(&day)
    }

    /// `now` if `now` is inside the window in `tz`, else the next instant the
    /// window opens. A start time that falls in a DST gap moves to the first
    /// valid instant after it; a start time that occurs twice uses the first.
    /// A day whose whole window falls inside a DST gap is skipped.
    pub fn next_open(&self, now: DateTime<Utc>, tz: Tz) -> DateTime<Utc> {
        let local = now.with_timezone(&tz);
        let time = local.time();
        if self.open_on(local.weekday()) && self.start <= time && time < self.end {
            return now;
        }
        let today = local.date_naive();
        // Eight days covers a full week plus today, so any non-empty day list hits.
        for offset in 0..=8 {
            let Some(date) = today.checked_add_days(chrono::Days::new(offset)) else {
                break;
            };
            if !self.open_on(date.weekday()) {
                continue;
            }
            let Some(opens) = self.opening_on(date, tz) else {
                continue;
            };
            if opens >= now {
                return opens;
            }
        }
        now
    }

    /// The instant the window opens on local `date`, if it opens at all.
    fn opening_on(&self, date: NaiveDate, tz: Tz) -> Option<DateTime<Utc>> {
        let start = date.and_time(self.start);
        // Gaps are at most a day long; scan minute by minute past one.
        for minutes in 0..=(24 * 60 + 60) {
            let candidate = start.checked_add_signed(Duration::minutes(minutes))?;
            let resolved = match tz.from_local_datetime(&candidate) {
                LocalResult::Single(t) => t,
                LocalResult::Ambiguous(first, _) => first,
                LocalResult::None => continue,
            };
            if candidate.date() != date || candidate.time() >= self.end {
                return None;
            }
            return Some(resolved.with_timezone(&Utc));
        }
        None
    }
}

const ALL_DAYS: [Weekday; 7] = [
    Weekday::Mon,
    Weekday::Tue,
    Weekday::Wed,
    Weekday::Thu,
    Weekday::Fri,
    Weekday::Sat,
    Weekday::Sun,
];

fn parse_hhmm(s: &str) -> Option<NaiveTime> {
    let b = s.as_bytes();
    if b.len() != 5 || b[2] != b':' || ![b[0], b[1], b[3], b[4]].iter().all(u8::is_ascii_digit) {
        return None;
    }
    let hour = u32::from(b[0] - b'0') * 10 + u32::from(b[1] - b'0');
    let minute = u32::from(b[3] - b'0') * 10 + u32::from(b[4] - b'0');
    NaiveTime::from_hms_opt(hour, minute, 0)
}

fn parse_day(s: &str) -> Option<Weekday> {
    Some(match s.to_ascii_lowercase().as_str() {
        "mon" | "monday" => Weekday::Mon,
        "tue" | "tuesday" => Weekday::Tue,
        "wed" | "wednesday" => Weekday::Wed,
        "thu" | "thursday" => Weekday::Thu,
        "fri" | "friday" => Weekday::Fri,
        "sat" | "saturday" => Weekday::Sat,
        "sun" | "sunday" => Weekday::Sun,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn secs(s: &str) -> i64 {
        parse_duration(s)
            .unwrap_or_else(|e| panic!("{s:?}: {e}"))
            .num_seconds()
    }

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn window(v: Value) -> TimeWindow {
        TimeWindow::parse(&v, "$.w").unwrap_or_else(|f| panic!("{f:?}"))
    }

    // ---- durations ----

    #[test]
    fn parses_simple_durations() {
        assert_eq!(secs("2 days"), 2 * 86_400);
        assert_eq!(secs("90 seconds"), 90);
        assert_eq!(secs("45s"), 45);
        assert_eq!(secs("15m"), 900);
        assert_eq!(secs("2h"), 7_200);
        assert_eq!(secs("3d"), 3 * 86_400);
        assert_eq!(secs("1 week"), 604_800);
        assert_eq!(secs("1 day"), 86_400);
        assert_eq!(secs("10 mins"), 600);
        assert_eq!(secs("3 hrs"), 10_800);
    }

    #[test]
    fn parses_compound_durations() {
        assert_eq!(secs("1 hour 30 minutes"), 5_400);
        assert_eq!(secs("1h30m"), 5_400);
        assert_eq!(secs("  1 w, 2 d  "), 604_800 + 2 * 86_400);
        assert_eq!(secs("1 Hour 5 SEC"), 3_605);
        assert_eq!(secs("1 hour 1 hour"), 7_200);
    }

    #[test]
    fn zero_is_valid() {
        assert_eq!(secs("0 seconds"), 0);
        assert_eq!(secs("0s"), 0);
    }

    #[test]
    fn rejects_bad_durations() {
        let cases = [
            ("", "empty"),
            ("   ", "empty"),
            ("-5 minutes", "negative"),
            ("5", "missing unit"),
            ("days", "expected a number"),
            ("5 fortnights", "unknown unit"),
            ("500 ms", "unknown unit"),
            ("1.5 hours", "whole numbers"),
            ("2 days and 3 hours", "expected a number"),
            ("5 min -", "negative"),
            (", 5 min", "expected a number"),
            ("1 hour @", "expected a number"),
            ("99999999999999999999999 s", "too long"),
            ("9223372036854775807 weeks", "too long"),
            ("36600000 days", "too long"),
        ];
        for (input, want) in cases {
            let err = parse_duration(input).expect_err(input);
            assert!(err.contains(want), "{input:?}: {err}");
            assert!(
                err.contains("units:"),
                "{input:?} should say what is allowed: {err}"
            );
        }
    }

    // ---- window parsing ----

    #[test]
    fn parses_window() {
        let w = window(json!({"start": "09:00", "end": "17:30", "days": ["mon", "Friday", "mon"]}));
        assert_eq!(w.start, NaiveTime::from_hms_opt(9, 0, 0).unwrap());
        assert_eq!(w.end, NaiveTime::from_hms_opt(17, 30, 0).unwrap());
        assert_eq!(w.days, vec![Weekday::Mon, Weekday::Fri]);
        let all = window(json!({"start": "00:00", "end": "23:59"}));
        assert_eq!(all.days.len(), 7);
    }

    #[test]
    fn window_faults() {
        let f = TimeWindow::parse(&json!("9-5"), "$.w").unwrap_err();
        assert_eq!(f[0].path, "$.w");
        let f = TimeWindow::parse(
            &json!({"start": "9:00", "end": "24:00", "days": "mon", "tz": "x"}),
            "$.w",
        )
        .unwrap_err();
        let paths: Vec<&str> = f.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, vec!["$.w.tz", "$.w.start", "$.w.end", "$.w.days"]);
        let f = TimeWindow::parse(
            &json!({"end": "10:00", "days": ["mon", "funday", 3]}),
            "$.w",
        )
        .unwrap_err();
        let paths: Vec<&str> = f.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, vec!["$.w.start", "$.w.days[1]", "$.w.days[2]"]);
        assert!(f[1].message.contains("mon, tue"));
    }

    #[test]
    fn window_start_must_precede_end() {
        for (s, e) in [("17:00", "09:00"), ("09:00", "09:00")] {
            let f = TimeWindow::parse(&json!({"start": s, "end": e}), "$.w").unwrap_err();
            assert_eq!(f.len(), 1);
            assert_eq!(f[0].path, "$.w.end");
        }
        let f = TimeWindow::parse(
            &json!({"start": "09:00", "end": "10:00", "days": []}),
            "$.w",
        )
        .unwrap_err();
        assert_eq!(f[0].path, "$.w.days");
    }

    #[test]
    fn hhmm_parsing() {
        assert!(parse_hhmm("23:59").is_some());
        assert!(parse_hhmm("00:00").is_some());
        for bad in [
            "24:00",
            "12:60",
            "1:00",
            "12:0",
            "12-00",
            "ab:cd",
            "12:000",
            "",
            "１２:00",
        ] {
            assert!(parse_hhmm(bad).is_none(), "{bad}");
        }
    }

    // ---- next_open ----

    #[test]
    fn inside_window_returns_now() {
        let w = window(json!({"start": "09:00", "end": "17:00"}));
        let now = utc("2026-01-14T10:15:00Z"); // 11:15 in Paris
        assert_eq!(w.next_open(now, chrono_tz::Europe::Paris), now);
        // Start is inclusive.
        let now = utc("2026-01-14T08:00:00Z"); // 09:00 Paris
        assert_eq!(w.next_open(now, chrono_tz::Europe::Paris), now);
    }

    #[test]
    fn before_window_waits_until_start_same_day() {
        let w = window(json!({"start": "09:00", "end": "17:00"}));
        let now = utc("2026-01-14T05:00:00Z"); // 06:00 Paris
        assert_eq!(
            w.next_open(now, chrono_tz::Europe::Paris),
            utc("2026-01-14T08:00:00Z")
        );
    }

    #[test]
    fn after_window_waits_until_next_day() {
        let w = window(json!({"start": "09:00", "end": "17:00"}));
        // End is exclusive: 17:00 Paris is outside.
        let now = utc("2026-01-14T16:00:00Z");
        assert_eq!(
            w.next_open(now, chrono_tz::Europe::Paris),
            utc("2026-01-15T08:00:00Z")
        );
        let w = window(json!({"start": "09:00", "end": "17:00"}));
        let ny = chrono_tz::America::New_York;
        // 23:30 in New York on Jan 14 is 04:30 UTC Jan 15.
        let now = utc("2026-01-15T04:30:00Z");
        assert_eq!(w.next_open(now, ny), utc("2026-01-15T14:00:00Z"));
    }

    #[test]
    fn day_filter_skips_to_allowed_day() {
        // 2026-01-16 is a Friday.
        let w = window(
            json!({"start": "09:00", "end": "17:00", "days": ["mon", "tue", "wed", "thu", "fri"]}),
        );
        let fri_evening = utc("2026-01-16T18:00:00Z");
        assert_eq!(
            w.next_open(fri_evening, chrono_tz::UTC),
            utc("2026-01-19T09:00:00Z")
        );
        let sat_noon = utc("2026-01-17T12:00:00Z");
        assert_eq!(
            w.next_open(sat_noon, chrono_tz::UTC),
            utc("2026-01-19T09:00:00Z")
        );
        let w = window(json!({"start": "10:00", "end": "11:00", "days": ["wed"]}));
        // Wednesday 2026-01-14 after the window: a full week ahead.
        let wed_late = utc("2026-01-14T11:00:00Z");
        assert_eq!(
            w.next_open(wed_late, chrono_tz::UTC),
            utc("2026-01-21T10:00:00Z")
        );
    }

    #[test]
    fn day_filter_uses_local_weekday() {
        // Saturday 2026-01-17 23:30 UTC is already Sunday 08:30 in Tokyo.
        let w = window(json!({"start": "08:00", "end": "12:00", "days": ["sun"]}));
        let now = utc("2026-01-17T23:30:00Z");
        assert_eq!(w.next_open(now, chrono_tz::Asia::Tokyo), now);
        assert_eq!(
            w.next_open(now, chrono_tz::UTC),
            utc("2026-01-18T08:00:00Z")
        );
    }

    #[test]
    fn dst_spring_forward_paris() {
        // 2026-03-29 (last Sunday of March): Paris jumps 02:00 -> 03:00.
        let paris = chrono_tz::Europe::Paris;
        let w = window(json!({"start": "02:30", "end": "04:00"}));
        let now = utc("2026-03-28T23:00:00Z"); // 00:00 Paris
                                               // 02:30 does not exist; the next valid instant is 03:00 CEST = 01:00 UTC.
        assert_eq!(w.next_open(now, paris), utc("2026-03-29T01:00:00Z"));
        // Ordinary window the day after DST uses the new offset (+02:00).
        let w = window(json!({"start": "09:00", "end": "17:00"}));
        let now = utc("2026-03-29T16:00:00Z"); // 18:00 CEST
        assert_eq!(w.next_open(now, paris), utc("2026-03-30T07:00:00Z"));
        // Across the change: Saturday evening -> Sunday 09:00 CEST.
        let now = utc("2026-03-28T20:00:00Z"); // 21:00 CET
        assert_eq!(w.next_open(now, paris), utc("2026-03-29T07:00:00Z"));
    }

    #[test]
    fn dst_window_inside_gap_is_skipped() {
        let paris = chrono_tz::Europe::Paris;
        let w = window(json!({"start": "02:00", "end": "02:45"}));
        let now = utc("2026-03-28T23:00:00Z"); // 00:00 Paris on the gap day
                                               // No such time on 2026-03-29: open on the 30th at 02:00 CEST.
        assert_eq!(w.next_open(now, paris), utc("2026-03-30T00:00:00Z"));
    }

    #[test]
    fn dst_fall_back_uses_first_occurrence() {
        // 2026-10-25: Paris repeats 02:00-03:00.
        let paris = chrono_tz::Europe::Paris;
        let w = window(json!({"start": "02:30", "end": "04:00"}));
        let now = utc("2026-10-24T22:00:00Z"); // 00:00 CEST
        assert_eq!(w.next_open(now, paris), utc("2026-10-25T00:30:00Z"));
    }

    #[test]
    fn empty_day_list_means_every_day() {
        let w = TimeWindow {
            start: NaiveTime::from_hms_opt(9, 0, 0).unwrap(),
            end: NaiveTime::from_hms_opt(10, 0, 0).unwrap(),
            days: Vec::new(),
        };
        let now = utc("2026-01-17T12:00:00Z");
        assert_eq!(
            w.next_open(now, chrono_tz::UTC),
            utc("2026-01-18T09:00:00Z")
        );
    }
}
