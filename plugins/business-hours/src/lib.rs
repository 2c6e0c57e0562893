//! `business-hours`: deny a WebGroup outside configured hours.
//!
//! Configuration (JSON):
//!
//! ```json
//! {"webgroup": "social", "open": "09:00", "close": "18:00",
//!  "days": ["mon", "tue", "wed", "thu", "fri"], "time_zone": "Europe/Berlin"}
//! ```
//!
//! A flow to a name in `webgroup` is denied outside `open`–`close` on the
//! listed days, both judged in local time: the weekday is that of the local
//! date. The time zone is an IANA name (`time_zone`, e.g. `Europe/Berlin`,
//! `America/New_York`), whose daylight saving is followed without a reload:
//! the time zone database is compiled into the module. Instead of a name, a
//! fixed offset from UTC may be given (`utc_offset`, `+HH:MM` or `-HH:MM`),
//! but not both; with neither the hours are in UTC. The record notes the
//! local time it judged, with its offset and zone (`local_time`, e.g.
//! `mon 09:30 +01:00 Europe/Berlin`). Other flows are left to the policy.

use jiff::tz::{self, Offset, TimeZone};
use jiff::Timestamp;
use serde::Deserialize;
use sluice_sdk::proxy_wasm::traits::Context;
use sluice_sdk::{connection_policy, now, unix_seconds, ConnectionPolicy, Flow, Notes, Verdict};

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    webgroup: String,
    open: String,
    close: String,
    days: Vec<String>,
    #[serde(default)]
    time_zone: Option<String>,
    #[serde(default)]
    utc_offset: Option<String>,
}

#[derive(Debug)]
struct Hours {
    webgroup: String,
    /// Minutes after local midnight.
    open: u32,
    close: u32,
    /// Monday is 0.
    days: Vec<u32>,
    /// Where the hours and days are judged.
    zone: TimeZone,
}

impl Default for Hours {
    fn default() -> Self {
        Hours {
            webgroup: String::new(),
            open: 0,
            close: 0,
            days: Vec::new(),
            zone: TimeZone::UTC,
        }
    }
}

/// `HH:MM` as minutes after midnight.
fn clock(s: &str) -> Result<u32, String> {
    let (h, m) = s.split_once(':').ok_or_else(|| format!("`{s}` is not HH:MM"))?;
    let (h, m): (u32, u32) = (
        h.parse().map_err(|_| format!("`{s}` is not HH:MM"))?,
        m.parse().map_err(|_| format!("`{s}` is not HH:MM"))?,
    );
    if h > 24 || m > 59 || (h == 24 && m > 0) {
        return Err(format!("`{s}` is not a time of day"));
    }
    Ok(h * 60 + m)
}

/// `+HH:MM` or `-HH:MM` as minutes east of UTC.
fn offset(s: &str) -> Result<i32, String> {
    let (sign, rest) = match s.as_bytes().first() {
        Some(b'+') => (1, &s[1..]),
        Some(b'-') => (-1, &s[1..]),
        _ => return Err(format!("utc_offset `{s}` must start with + or -")),
    };
    // At most 24:00, so it fits.
    let m = clock(rest)? as i32;
    if m > 14 * 60 {
        return Err(format!("utc_offset `{s}` is beyond ±14:00"));
    }
    Ok(sign * m)
}

/// The zone the configuration names: an IANA name, a fixed offset, or UTC.
fn zone(time_zone: Option<&str>, utc_offset: Option<&str>) -> Result<TimeZone, String> {
    match (time_zone, utc_offset) {
        (Some(_), Some(_)) => Err("give time_zone or utc_offset, not both".into()),
        (Some(name), None) => tz::db()
            .get(name)
            .map_err(|_| format!("time_zone `{name}` is not a known time zone (an IANA name such as `Europe/Berlin`)")),
        (None, Some(o)) => {
            let offset =
                Offset::from_seconds(offset(o)? * 60).map_err(|_| format!("utc_offset `{o}` is out of range"))?;
            Ok(TimeZone::fixed(offset))
        }
        (None, None) => Ok(TimeZone::UTC),
    }
}

/// An offset as `+HH:MM` (`+HH:MM:SS` if it has seconds).
fn shown_offset(offset: Offset) -> String {
    let s = offset.seconds();
    let sign = if s < 0 { '-' } else { '+' };
    let s = s.unsigned_abs();
    let (h, m, sec) = (s / 3600, s / 60 % 60, s % 60);
    if sec == 0 {
        format!("{sign}{h:02}:{m:02}")
    } else {
        format!("{sign}{h:02}:{m:02}:{sec:02}")
    }
}

impl Hours {
    /// Whether a flow at `unix` seconds falls inside the hours, and the
    /// local time it was judged at, with its offset and zone.
    fn open_at(&self, unix: u64) -> (bool, String) {
        let at = i64::try_from(unix)
            .ok()
            .and_then(|s| Timestamp::from_second(s).ok())
            .unwrap_or(Timestamp::MAX);
        let local = self.zone.to_datetime(at);
        let minute = u32::from(local.hour().unsigned_abs()) * 60 + u32::from(local.minute().unsigned_abs());
        let weekday = u32::from(local.weekday().to_monday_zero_offset().unsigned_abs());
        let open = self.days.contains(&weekday) && minute >= self.open && minute < self.close;
        let mut shown = format!(
            "{} {:02}:{:02} {}",
            DAYS[weekday as usize],
            minute / 60,
            minute % 60,
            shown_offset(self.zone.to_offset(at))
        );
        if let Some(name) = self.zone.iana_name() {
            shown.push(' ');
            shown.push_str(name);
        }
        (open, shown)
    }
}

impl ConnectionPolicy for Hours {
    fn configure(&mut self, config: &[u8]) -> Result<(), String> {
        let raw: Raw = serde_json::from_slice(config).map_err(|e| format!("business-hours configuration: {e}"))?;
        let days = raw
            .days
            .iter()
            .map(|d| {
                DAYS.iter()
                    .position(|x| x.eq_ignore_ascii_case(d))
                    .map(|p| p as u32)
                    .ok_or_else(|| format!("`{d}` is not a day (mon … sun)"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let (open, close) = (clock(&raw.open)?, clock(&raw.close)?);
        if open >= close {
            return Err(format!("open {} is not before close {}", raw.open, raw.close));
        }
        *self = Hours {
            webgroup: raw.webgroup,
            open,
            close,
            days,
            zone: zone(raw.time_zone.as_deref(), raw.utc_offset.as_deref())?,
        };
        Ok(())
    }

    fn decide(&mut self, flow: &Flow, notes: &mut Notes, ctx: &dyn Context) -> Verdict {
        if !flow.in_webgroup(&self.webgroup) {
            return Verdict::Abstain;
        }
        let (open, local) = self.open_at(unix_seconds(now(ctx)));
        notes.add("local_time", local);
        if open {
            Verdict::Abstain
        } else {
            notes.add("why", "outside business hours");
            Verdict::Deny
        }
    }
}

connection_policy!(Hours);

#[cfg(test)]
mod tests {
    use super::*;

    fn hours(days: &[u32], zone: TimeZone) -> Hours {
        Hours {
            webgroup: "social".into(),
            open: 9 * 60,
            close: 18 * 60,
            days: days.to_vec(),
            zone,
        }
    }

    fn named(name: &str) -> TimeZone {
        zone(Some(name), None).unwrap()
    }

    fn configured(json: &str) -> Result<Hours, String> {
        let mut h = Hours::default();
        h.configure(json.as_bytes()).map(|()| h)
    }

    const WEEK: &str = r#""webgroup": "social", "open": "09:00", "close": "18:00",
        "days": ["mon", "tue", "wed", "thu", "fri"]"#;

    #[test]
    fn judges_local_time_and_weekday() {
        // 2026-12-07 (a Monday) 08:30 UTC is 09:30 at +01:00.
        let monday_0830_utc = 1_796_632_200;
        let plus_one = zone(None, Some("+01:00")).unwrap();
        let h = hours(&[0, 1, 2, 3, 4], plus_one.clone());
        assert_eq!(h.open_at(monday_0830_utc), (true, "mon 09:30 +01:00".into()));
        // 17:30 UTC is 18:30 local: closed.
        assert!(!h.open_at(monday_0830_utc + 9 * 3600).0);
        // Sunday is not a business day.
        assert!(!hours(&[6], plus_one).open_at(monday_0830_utc).0);
        assert!(clock("24:01").is_err() && offset("0100").is_err());
        assert_eq!(offset("-05:30"), Ok(-330));
        assert!(offset("+14:01").is_err());
        let h = hours(&[0], zone(None, Some("-05:30")).unwrap());
        assert_eq!(h.open_at(monday_0830_utc), (false, "mon 03:00 -05:30".into()));
        // With neither a zone nor an offset, UTC.
        let h = hours(&[0], zone(None, None).unwrap());
        assert_eq!(h.open_at(monday_0830_utc), (false, "mon 08:30 +00:00 UTC".into()));
    }

    #[test]
    fn a_named_zone_follows_daylight_saving() {
        let h = hours(&[0, 1, 2, 3, 4], named("Europe/Berlin"));
        // 07:30 UTC on a Monday: 08:30 in winter (closed), 09:30 in summer (open).
        let winter = 1_768_203_000; // 2026-01-12
        let summer = 1_783_927_800; // 2026-07-13
        assert_eq!(h.open_at(winter), (false, "mon 08:30 +01:00 Europe/Berlin".into()));
        assert_eq!(h.open_at(summer), (true, "mon 09:30 +02:00 Europe/Berlin".into()));
        // The spring change, 2026-03-29 01:00 UTC: 01:59 CET, then 03:00 CEST.
        let spring = 1_774_746_000;
        assert_eq!(h.open_at(spring - 1).1, "sun 01:59 +01:00 Europe/Berlin");
        assert_eq!(h.open_at(spring).1, "sun 03:00 +02:00 Europe/Berlin");
        // The autumn change, 2026-10-25 01:00 UTC: 02:59 CEST, then 02:00 CET.
        let autumn = 1_792_890_000;
        assert_eq!(h.open_at(autumn - 1).1, "sun 02:59 +02:00 Europe/Berlin");
        assert_eq!(h.open_at(autumn).1, "sun 02:00 +01:00 Europe/Berlin");
        // New York changes on other dates: still -04:00 on Berlin's autumn change.
        let ny = hours(&[0], named("America/New_York"));
        assert_eq!(ny.open_at(autumn).1, "sat 21:00 -04:00 America/New_York");
        assert_eq!(ny.open_at(1_796_632_200).1, "mon 03:30 -05:00 America/New_York");
    }

    #[test]
    fn the_weekday_turns_at_local_midnight() {
        let all_day_monday = |zone| Hours {
            open: 0,
            close: 24 * 60,
            ..hours(&[0], zone)
        };
        // Berlin's Monday 2026-12-07 starts at 23:00 UTC on the Sunday.
        let h = all_day_monday(named("Europe/Berlin"));
        let midnight = 1_796_598_000;
        assert_eq!(
            h.open_at(midnight - 1),
            (false, "sun 23:59 +01:00 Europe/Berlin".into())
        );
        assert_eq!(h.open_at(midnight), (true, "mon 00:00 +01:00 Europe/Berlin".into()));
        // New York's starts at 05:00 UTC, when it is Monday in UTC already.
        let h = all_day_monday(named("America/New_York"));
        let midnight = 1_796_619_600;
        assert_eq!(
            h.open_at(midnight - 1),
            (false, "sun 23:59 -05:00 America/New_York".into())
        );
        assert_eq!(h.open_at(midnight), (true, "mon 00:00 -05:00 America/New_York".into()));
    }

    #[test]
    fn configuration_takes_a_zone_or_an_offset() {
        let h = configured(&format!(r#"{{{WEEK}, "time_zone": "America/New_York"}}"#)).unwrap();
        assert_eq!(h.zone.iana_name(), Some("America/New_York"));
        // Names are matched without regard to case, and shown as the database spells them.
        assert_eq!(named("europe/berlin").iana_name(), Some("Europe/Berlin"));
        let h = configured(&format!(r#"{{{WEEK}, "utc_offset": "+01:00"}}"#)).unwrap();
        assert_eq!(h.open_at(1_796_632_200), (true, "mon 09:30 +01:00".into()));
        let h = configured(&format!("{{{WEEK}}}")).unwrap();
        assert_eq!(h.zone.iana_name(), Some("UTC"));
    }

    #[test]
    fn an_unknown_zone_is_refused() {
        let err = configured(&format!(r#"{{{WEEK}, "time_zone": "Europe/Berlni"}}"#)).unwrap_err();
        assert!(
            err.contains("time_zone `Europe/Berlni` is not a known time zone"),
            "{err}"
        );
        let err = configured(&format!(r#"{{{WEEK}, "time_zone": "+01:00"}}"#)).unwrap_err();
        assert!(err.contains("is not a known time zone"), "{err}");
    }

    #[test]
    fn a_zone_and_an_offset_together_are_refused() {
        let json = format!(r#"{{{WEEK}, "time_zone": "Europe/Berlin", "utc_offset": "+01:00"}}"#);
        assert_eq!(configured(&json).unwrap_err(), "give time_zone or utc_offset, not both");
        // A refused configuration leaves the previous one in place.
        let mut h = configured(&format!(r#"{{{WEEK}, "time_zone": "Europe/Berlin"}}"#)).unwrap();
        assert!(h.configure(json.as_bytes()).is_err());
        assert_eq!(h.zone.iana_name(), Some("Europe/Berlin"));
    }
}
