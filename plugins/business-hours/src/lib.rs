//! `business-hours`: deny a WebGroup outside configured hours.
//!
//! Configuration (JSON):
//!
//! ```json
//! {"webgroup": "social", "open": "09:00", "close": "18:00",
//!  "days": ["mon", "tue", "wed", "thu", "fri"], "utc_offset": "+01:00"}
//! ```
//!
//! A flow to a name in `webgroup` is denied outside `open`–`close` on the
//! listed days, in the time zone given as a fixed offset from UTC
//! (`utc_offset`, default `+00:00`; a zone with daylight saving needs its
//! offset changed twice a year, by a reload). The record notes the local
//! time it judged (`local_time`). Other flows are left to the policy.

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
    utc_offset: Option<String>,
}

#[derive(Debug, Default)]
struct Hours {
    webgroup: String,
    /// Minutes after local midnight.
    open: u32,
    close: u32,
    /// Monday is 0.
    days: Vec<u32>,
    /// Minutes east of UTC.
    offset: i64,
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
fn offset(s: &str) -> Result<i64, String> {
    let (sign, rest) = match s.as_bytes().first() {
        Some(b'+') => (1, &s[1..]),
        Some(b'-') => (-1, &s[1..]),
        _ => return Err(format!("utc_offset `{s}` must start with + or -")),
    };
    let m = i64::from(clock(rest)?);
    if m > 14 * 60 {
        return Err(format!("utc_offset `{s}` is beyond ±14:00"));
    }
    Ok(sign * m)
}

impl Hours {
    /// Whether a flow at `unix` seconds falls inside the hours, and the
    /// local time it was judged at.
    fn open_at(&self, unix: u64) -> (bool, String) {
        let local = unix as i64 + self.offset * 60;
        let days = local.div_euclid(86_400);
        let minute = (local.rem_euclid(86_400) / 60) as u32;
        // 1970-01-01 was a Thursday (3 with Monday 0).
        let weekday = (days + 3).rem_euclid(7) as u32;
        let open = self.days.contains(&weekday) && minute >= self.open && minute < self.close;
        let shown = format!("{} {:02}:{:02}", DAYS[weekday as usize], minute / 60, minute % 60);
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
            offset: raw.utc_offset.as_deref().map_or(Ok(0), offset)?,
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

    fn hours(days: &[u32]) -> Hours {
        Hours {
            webgroup: "social".into(),
            open: 9 * 60,
            close: 18 * 60,
            days: days.to_vec(),
            offset: 60,
        }
    }

    #[test]
    fn judges_local_time_and_weekday() {
        // 2026-12-07 (a Monday) 08:30 UTC is 09:30 at +01:00.
        let monday_0830_utc = 1_796_632_200;
        let h = hours(&[0, 1, 2, 3, 4]);
        assert_eq!(h.open_at(monday_0830_utc), (true, "mon 09:30".into()));
        // 17:30 UTC is 18:30 local: closed.
        assert_eq!(h.open_at(monday_0830_utc + 9 * 3600).0, false);
        // Sunday is not a business day.
        assert_eq!(hours(&[6]).open_at(monday_0830_utc).0, false);
        assert!(clock("24:01").is_err() && offset("0100").is_err());
        assert_eq!(offset("-05:30"), Ok(-330));
    }
}
