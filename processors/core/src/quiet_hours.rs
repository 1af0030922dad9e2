//! Quiet hours and blackout days in the customer's own time zone: when may a message go out.
//! Civil times are resolved through the IANA database compiled into the binary, so the answer
//! depends on nothing but the arguments (and is right across daylight-saving changes).

use crate::events::{DeferralReason, Millis};
use crate::topology::{Blackout, QuietHours};
use jiff::civil::{Date, DateTime, Time};
use jiff::tz::TimeZone;
use jiff::Timestamp;

/// When a message may go out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendWindow {
    /// Now is allowed.
    Now,
    /// Not before this instant, for this reason.
    NotBefore(Millis, DeferralReason),
}

/// Resolves an IANA time zone name, or None when it is not one.
pub fn time_zone(name: &str) -> Option<TimeZone> {
    TimeZone::get(name).ok()
}

fn minutes(t: Time) -> i32 {
    i32::from(t.hour()) * 60 + i32::from(t.minute())
}

fn in_quiet(minute_of_day: i32, q: &QuietHours) -> bool {
    let (start, end) = (q.start_minute, q.end_minute);
    if start == end {
        false
    } else if start < end {
        (start..end).contains(&minute_of_day)
    } else {
        minute_of_day >= start || minute_of_day < end
    }
}

fn blacked_out(date: Date, region: Option<&str>, blackouts: &[Blackout]) -> bool {
    blackouts.iter().any(|b| {
        b.date == date
            && (b.regions.is_empty() || region.is_some_and(|r| b.regions.iter().any(|x| x == r)))
    })
}

/// The instant a civil time on a date happens in a zone; a time skipped by a clock change
/// moves forward past the gap, a repeated one takes its first occurrence.
fn instant(date: Date, minute_of_day: i32, tz: &TimeZone) -> Option<Millis> {
    let t = Time::new((minute_of_day / 60) as i8, (minute_of_day % 60) as i8, 0, 0).ok()?;
    let ts = tz
        .to_ambiguous_timestamp(DateTime::from_parts(date, t))
        .compatible()
        .ok()?;
    Some(ts.as_millisecond())
}

/// The first instant at or after `at` outside quiet hours and blackout days, in `tz`.
pub fn next_allowed(
    at: Millis,
    tz: &TimeZone,
    region: Option<&str>,
    quiet: &QuietHours,
    blackouts: &[Blackout],
) -> SendWindow {
    let mut candidate = at;
    let mut reason = None;
    // Each step moves to the end of a quiet period or to the next day; a year of blackouts is
    // more than any calendar holds.
    for _ in 0..800 {
        let Ok(ts) = Timestamp::from_millisecond(candidate) else {
            break;
        };
        let local = tz.to_datetime(ts);
        let date = local.date();
        let minute = minutes(local.time());
        if blacked_out(date, region, blackouts) {
            reason = Some(DeferralReason::Blackout);
            let Some(next_day) = date.tomorrow().ok() else {
                break;
            };
            // The day after a blackout opens when its quiet hours end.
            let opening = if in_quiet(0, quiet) {
                quiet.end_minute
            } else {
                0
            };
            match instant(next_day, opening, tz) {
                Some(next) if next > candidate => candidate = next,
                _ => break,
            }
            continue;
        }
        if in_quiet(minute, quiet) {
            reason.get_or_insert(DeferralReason::QuietHours);
            let end_date = if minute >= quiet.end_minute {
                match date.tomorrow() {
                    Ok(d) => d,
                    Err(_) => break,
                }
            } else {
                date
            };
            match instant(end_date, quiet.end_minute, tz) {
                Some(next) if next > candidate => candidate = next,
                _ => break,
            }
            continue;
        }
        return match reason {
            None => SendWindow::Now,
            Some(r) => SendWindow::NotBefore(candidate, r),
        };
    }
    SendWindow::NotBefore(candidate, reason.unwrap_or(DeferralReason::QuietHours))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quiet() -> QuietHours {
        QuietHours {
            start_minute: 21 * 60,
            end_minute: 8 * 60,
            exempt_purposes: vec![],
            recheck_unknown_time_zone_hours: 6,
        }
    }

    fn at(s: &str) -> Millis {
        s.parse::<Timestamp>().unwrap().as_millisecond()
    }

    fn ny() -> TimeZone {
        time_zone("America/New_York").unwrap()
    }

    #[test]
    fn daytime_is_allowed_and_night_waits_for_eight_local() {
        // 15:00 UTC is 10:00 in New York in November (EST, UTC-5).
        assert_eq!(
            next_allowed(at("2026-11-10T15:00:00Z"), &ny(), None, &quiet(), &[]),
            SendWindow::Now
        );
        // 03:00 UTC is 22:00 the evening before in New York: wait for 08:00 EST = 13:00 UTC.
        assert_eq!(
            next_allowed(at("2026-11-11T03:00:00Z"), &ny(), None, &quiet(), &[]),
            SendWindow::NotBefore(at("2026-11-11T13:00:00Z"), DeferralReason::QuietHours)
        );
    }

    #[test]
    fn eight_local_moves_with_daylight_saving() {
        // The night the clocks go back (1 Nov 2026, EDT -> EST): 08:00 is 13:00 UTC, not 12:00.
        assert_eq!(
            next_allowed(at("2026-11-01T05:00:00Z"), &ny(), None, &quiet(), &[]),
            SendWindow::NotBefore(at("2026-11-01T13:00:00Z"), DeferralReason::QuietHours)
        );
        // The night before, still on EDT, 08:00 was 12:00 UTC.
        assert_eq!(
            next_allowed(at("2026-10-31T05:00:00Z"), &ny(), None, &quiet(), &[]),
            SendWindow::NotBefore(at("2026-10-31T12:00:00Z"), DeferralReason::QuietHours)
        );
    }

    #[test]
    fn a_blackout_day_in_the_customers_region_pushes_to_the_next_morning() {
        let christmas = Blackout {
            name: "Christmas Day".into(),
            date: Date::new(2026, 12, 25).unwrap(),
            regions: vec!["US".into()],
        };
        let noon = at("2026-12-25T17:00:00Z");
        assert_eq!(
            next_allowed(
                noon,
                &ny(),
                Some("US"),
                &quiet(),
                std::slice::from_ref(&christmas)
            ),
            SendWindow::NotBefore(at("2026-12-26T13:00:00Z"), DeferralReason::Blackout)
        );
        assert_eq!(
            next_allowed(noon, &ny(), Some("BR"), &quiet(), &[christmas]),
            SendWindow::Now,
            "another region's holiday is no blackout here"
        );
    }

    #[test]
    fn unknown_zone_names_are_recognised() {
        assert!(time_zone("Europe/Madrid").is_some());
        assert!(time_zone("Mars/Olympus_Mons").is_none());
    }
}
