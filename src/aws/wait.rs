//! The one wait helper for every "until available / completed / running" wait.
//!
//! The SDK's generated waiters first poll after 15 s and back off to 120 s: a volume ready in
//! 2 s costs 15 s, and they report no progress. This one polls after a fraction of a second,
//! backs off to a few seconds, reports progress, stops on interrupt, and when its bound runs
//! out names what is still pending.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How a wait paces itself.
#[derive(Debug, Clone, Copy)]
pub struct WaitPolicy {
    pub first_poll: Duration,
    pub max_interval: Duration,
    /// Give up after this long; what is pending stays on the undo stack.
    pub total: Duration,
}

impl WaitPolicy {
    /// Volumes, attachments, instances: usually seconds on EC2.
    pub const SHORT: WaitPolicy = WaitPolicy {
        first_poll: Duration::from_millis(250),
        max_interval: Duration::from_secs(3),
        total: Duration::from_secs(10 * 60),
    };
    /// Snapshots and AMIs: minutes for a large first snapshot, so a longer bound.
    pub const LONG: WaitPolicy = WaitPolicy {
        first_poll: Duration::from_millis(500),
        max_interval: Duration::from_secs(5),
        total: Duration::from_secs(60 * 60),
    };
    /// An image registered over a snapshot that is already completed: EC2 makes it
    /// available within seconds and says nothing of its progress, so a poll every half
    /// second (a few calls in all, far below DescribeImages' rate) rather than a backoff
    /// that would overshoot the end by seconds: each poll's interval is seconds of the bake.
    pub const REGISTERED: WaitPolicy = WaitPolicy {
        first_poll: Duration::from_millis(500),
        max_interval: Duration::from_millis(500),
        total: Duration::from_secs(60 * 60),
    };
}

/// How long a resource this run just made may stay NotFound (EC2's eventual consistency)
/// before that is believed: seconds as a rule, a minute at the very worst.
pub const VISIBILITY_BOUND: Duration = Duration::from_secs(120);

/// What one poll saw.
#[derive(Debug, Clone, PartialEq)]
pub enum Poll<T> {
    Ready(T),
    /// EC2 answers NotFound for it: made too recently to be seen everywhere. Pending until
    /// `VISIBILITY_BOUND`, then an error.
    NotYetVisible,
    /// Not there yet: its current state, and a percentage where AWS gives one.
    Pending {
        state: String,
        percent: Option<u8>,
    },
    /// A state it will not come back from (a snapshot in `error`, an image `failed`).
    Failed {
        state: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum WaitError<E: std::error::Error + 'static> {
    #[error("gave up waiting for {what} {id} after {}s: still {state}", waited.as_secs())]
    TimedOut {
        what: String,
        id: String,
        state: String,
        waited: Duration,
    },
    #[error("interrupted while waiting for {what} {id}")]
    Interrupted { what: String, id: String },
    #[error("{what} {id} is still unknown to EC2 {}s after it was made: it may exist; look for it and remove it", waited.as_secs())]
    NeverVisible {
        what: String,
        id: String,
        waited: Duration,
    },
    #[error("{what} {id} failed: it is {state}")]
    Failed {
        what: String,
        id: String,
        state: String,
    },
    #[error(transparent)]
    Poll(E),
}

/// The shortest interval between polls near a predicted end: each poll's overshoot of the
/// end is seconds of the bake.
const NEAR_END: Duration = Duration::from_millis(100);

/// The earliest the wait can end, at the pace from its start to `percent` after `elapsed`;
/// none before there is any progress to go by. EC2's percentage is a whole number, cut
/// short (a fifth of a second of a 20 s snapshot): the progress may be up to one more.
fn time_left(elapsed: Duration, percent: u8) -> Option<Duration> {
    (1..100).contains(&percent).then(|| {
        let at_most_done = f64::from(percent) + 1.0;
        elapsed.mul_f64((100.0 - at_most_done) / at_most_done)
    })
}

/// Polls until `poll` says Ready, with the growing interval of `policy`, polling sooner
/// when the progress it reports says the end is nearer. `on_pending` hears
/// every pending state, for progress display.
pub async fn wait_for<T, E, F, Fut>(
    what: &str,
    id: &str,
    policy: WaitPolicy,
    cancel: &CancellationToken,
    mut on_pending: impl FnMut(&str, Option<u8>),
    mut poll: F,
) -> Result<T, WaitError<E>>
where
    E: std::error::Error + 'static,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Poll<T>, E>>,
{
    // Each interval is this much longer than the one before, up to `max_interval`.
    const BACKOFF: f64 = 1.5;
    let started = Instant::now();
    let mut interval = policy.first_poll;
    let mut done_in: Option<Duration> = None;
    let mut near_end = NEAR_END;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = cancel.cancelled() => {
                return Err(WaitError::Interrupted { what: what.into(), id: id.into() });
            }
        }
        let state = match poll().await.map_err(WaitError::Poll)? {
            Poll::Ready(value) => return Ok(value),
            Poll::Failed { state } => {
                return Err(WaitError::Failed {
                    what: what.into(),
                    id: id.into(),
                    state,
                });
            }
            Poll::Pending { state, percent } => {
                on_pending(&state, percent);
                done_in = percent.and_then(|p| time_left(started.elapsed(), p));
                state
            }
            Poll::NotYetVisible => {
                let waited = started.elapsed();
                if waited >= VISIBILITY_BOUND.min(policy.total) {
                    return Err(WaitError::NeverVisible {
                        what: what.into(),
                        id: id.into(),
                        waited,
                    });
                }
                on_pending("not yet visible", None);
                "not yet visible".to_string()
            }
        };
        let waited = started.elapsed();
        if waited >= policy.total {
            return Err(WaitError::TimedOut {
                what: what.into(),
                id: id.into(),
                state,
                waited,
            });
        }
        interval = interval
            .mul_f64(BACKOFF)
            .min(policy.max_interval)
            .min(policy.total - waited);
        // Progress says when it will be done: poll then, not up to a whole backoff later.
        // Within a first poll of the end, the poll comes as close as the progress tells, at
        // least `near_end` after the last; twice that each time it is not done yet, up to
        // the longest interval: a progress stuck at 99 % (as EC2's can be, for minutes) is
        // then polled as a wait with no progress is.
        if let Some(eta) = done_in.take() {
            let floor = if eta < policy.first_poll {
                let floor = near_end;
                near_end = (near_end * 2).min(policy.max_interval);
                floor
            } else {
                policy.first_poll
            };
            interval = interval.min(eta.max(floor));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    #[derive(Debug, thiserror::Error)]
    #[error("describe failed")]
    struct DescribeFailed;

    #[tokio::test(start_paused = true)]
    async fn polls_fast_first_then_backs_off_to_the_cap() {
        let started = Instant::now();
        let seen = RefCell::new(Vec::new());
        let result: Result<&str, WaitError<DescribeFailed>> = wait_for(
            "volume",
            "vol-1",
            WaitPolicy::SHORT,
            &CancellationToken::new(),
            |_, _| {},
            || {
                seen.borrow_mut().push(started.elapsed());
                let n = seen.borrow().len();
                async move {
                    Ok(if n < 12 {
                        Poll::Pending {
                            state: "creating".into(),
                            percent: None,
                        }
                    } else {
                        Poll::Ready("vol-1")
                    })
                }
            },
        )
        .await;
        assert_eq!(result.unwrap(), "vol-1");
        let at = seen.borrow();
        assert_eq!(
            at[0],
            Duration::from_millis(250),
            "first poll comes after a fraction of a second"
        );
        let gaps: Vec<Duration> = at.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(
            gaps.windows(2).all(|g| g[1] >= g[0]),
            "intervals never shrink: {gaps:?}"
        );
        assert_eq!(
            *gaps.last().unwrap(),
            Duration::from_secs(3),
            "intervals stop growing at the cap"
        );
    }

    /// A snapshot whose progress grows steadily to 100 % at 21 s: the backoff alone would
    /// next poll at 25.4 s; the progress brings the poll that sees it done to within a
    /// first poll's interval of the end.
    #[tokio::test(start_paused = true)]
    async fn progress_brings_the_last_poll_close_to_the_end() {
        const DONE_AT: Duration = Duration::from_secs(21);
        let (seen_at, polls) = snapshot_seen_done(DONE_AT, Duration::ZERO).await;
        assert!(
            seen_at >= DONE_AT && seen_at <= DONE_AT + WaitPolicy::LONG.first_poll,
            "done at {DONE_AT:?}, seen at {seen_at:?}"
        );
        assert!(polls <= 20, "{polls} polls");
    }

    /// When a snapshot whose progress EC2 gives in whole percents, on pace to end at
    /// `done_at` but stuck at 99 % until `stuck_until`, is seen done; and how many polls
    /// that took.
    async fn snapshot_seen_done(done_at: Duration, stuck_until: Duration) -> (Duration, usize) {
        seen_done_with(WaitPolicy::LONG, done_at.max(stuck_until), |elapsed| {
            let percent = elapsed.as_secs_f64() / done_at.as_secs_f64() * 100.0;
            Some((percent as u8).min(99))
        })
        .await
    }

    /// The bake's own seconds include the time between a snapshot's end and the poll that
    /// sees it: near the predicted end, polls come closer than a first poll's interval.
    #[tokio::test(start_paused = true)]
    async fn near_its_end_a_snapshot_is_seen_done_within_a_fifth_of_a_second() {
        for done_ms in [4_300, 9_750, 20_300, 21_000, 33_100, 61_900] {
            let done_at = Duration::from_millis(done_ms);
            let (seen_at, polls) = snapshot_seen_done(done_at, Duration::ZERO).await;
            assert!(
                seen_at >= done_at && seen_at - done_at <= Duration::from_millis(200),
                "done at {done_at:?}, seen at {seen_at:?}"
            );
            assert!(polls <= 24, "done at {done_at:?}: {polls} polls");
        }
    }

    /// Progress that stays at 99 % (as EC2's can, for minutes) draws no stream of calls:
    /// after a few near the predicted end, the polls back off to the longest interval, as
    /// a wait with no progress does; and the end is still seen within it.
    #[tokio::test(start_paused = true)]
    async fn a_snapshot_stuck_at_99_percent_is_polled_as_one_without_progress() {
        let (done_at, stuck_until) = (Duration::from_secs(20), Duration::from_secs(620));
        let (seen_at, polls) = snapshot_seen_done(done_at, stuck_until).await;
        assert!(
            seen_at >= stuck_until && seen_at - stuck_until <= WaitPolicy::LONG.max_interval,
            "seen at {seen_at:?}"
        );
        let (_, polls_without_progress) = seen_done(WaitPolicy::LONG, stuck_until).await;
        assert!(
            polls <= polls_without_progress + 24,
            "{polls} polls, against {polls_without_progress} for a wait without progress"
        );
    }

    /// When a wait without progress is seen to end, under `policy`, for something ready at
    /// `done_at`; and how many polls it took.
    async fn seen_done(policy: WaitPolicy, done_at: Duration) -> (Duration, usize) {
        seen_done_with(policy, done_at, |_| None).await
    }

    /// When something ready at `done_at` is seen done under `policy`, pending until then
    /// with the progress `percent_at` gives for the time elapsed; and how many polls it took.
    async fn seen_done_with(
        policy: WaitPolicy,
        done_at: Duration,
        percent_at: impl Fn(Duration) -> Option<u8>,
    ) -> (Duration, usize) {
        let started = Instant::now();
        let polls = RefCell::new(0);
        let result: Result<(), WaitError<DescribeFailed>> = wait_for(
            "resource",
            "id-1",
            policy,
            &CancellationToken::new(),
            |_, _| {},
            || {
                *polls.borrow_mut() += 1;
                let elapsed = started.elapsed();
                let poll = if elapsed >= done_at {
                    Poll::Ready(())
                } else {
                    Poll::Pending {
                        state: "pending".into(),
                        percent: percent_at(elapsed),
                    }
                };
                async move { Ok(poll) }
            },
        )
        .await;
        result.unwrap();
        (started.elapsed(), polls.into_inner())
    }

    /// A registered image, available 5.3 s after RegisterImage (EC2 gives no progress): the
    /// backoff for long waits would see it seconds late; `REGISTERED` within half a second.
    #[tokio::test(start_paused = true)]
    async fn a_registered_image_is_seen_within_half_a_second_of_being_available() {
        const DONE_AT: Duration = Duration::from_millis(5300);
        let (long, _) = seen_done(WaitPolicy::LONG, DONE_AT).await;
        assert!(
            long - DONE_AT > Duration::from_secs(1),
            "LONG saw it at {long:?}"
        );
        let (registered, polls) = seen_done(WaitPolicy::REGISTERED, DONE_AT).await;
        assert!(
            registered >= DONE_AT && registered - DONE_AT <= Duration::from_millis(500),
            "available at {DONE_AT:?}, seen at {registered:?}"
        );
        assert!(polls <= 11, "{polls} polls");
        // A slow one: still two polls a second, never more.
        let (late, polls) = seen_done(WaitPolicy::REGISTERED, Duration::from_secs(60)).await;
        assert!(
            late - Duration::from_secs(60) <= Duration::from_millis(500),
            "seen at {late:?}"
        );
        assert!(polls <= 121, "{polls} polls");
    }

    #[test]
    fn time_left_is_the_earliest_end_a_whole_percentage_allows() {
        assert_eq!(
            time_left(Duration::from_secs(51), 50),
            Some(Duration::from_secs(49)),
            "50 % may be 50.99 %"
        );
        assert_eq!(
            time_left(Duration::from_secs(6), 74),
            Some(Duration::from_secs(2))
        );
        assert_eq!(time_left(Duration::from_secs(60), 99), Some(Duration::ZERO));
        assert_eq!(time_left(Duration::from_secs(6), 0), None, "no pace yet");
        assert_eq!(time_left(Duration::from_secs(6), 100), None);
    }

    #[tokio::test(start_paused = true)]
    async fn timeout_names_what_is_pending_and_reports_progress() {
        let policy = WaitPolicy {
            first_poll: Duration::from_millis(100),
            max_interval: Duration::from_secs(1),
            total: Duration::from_secs(10),
        };
        let mut percents = Vec::new();
        let result: Result<(), WaitError<DescribeFailed>> = wait_for(
            "snapshot",
            "snap-9",
            policy,
            &CancellationToken::new(),
            |_, p| percents.push(p),
            || async {
                Ok(Poll::Pending {
                    state: "pending".into(),
                    percent: Some(40),
                })
            },
        )
        .await;
        let err = result.unwrap_err().to_string();
        assert_eq!(
            err,
            "gave up waiting for snapshot snap-9 after 10s: still pending"
        );
        assert!(!percents.is_empty() && percents.iter().all(|p| *p == Some(40)));
    }

    #[tokio::test(start_paused = true)]
    async fn not_found_right_after_a_create_is_waited_out_within_its_bound() {
        let polls = RefCell::new(0);
        let result: Result<&str, WaitError<DescribeFailed>> = wait_for(
            "volume",
            "vol-1",
            WaitPolicy::SHORT,
            &CancellationToken::new(),
            |_, _| {},
            || {
                *polls.borrow_mut() += 1;
                let n = *polls.borrow();
                async move {
                    Ok(if n < 4 {
                        Poll::NotYetVisible
                    } else {
                        Poll::Ready("available")
                    })
                }
            },
        )
        .await;
        assert_eq!(result.unwrap(), "available");

        let started = Instant::now();
        let never: Result<(), WaitError<DescribeFailed>> = wait_for(
            "snapshot",
            "snap-1",
            WaitPolicy::LONG,
            &CancellationToken::new(),
            |_, _| {},
            || async { Ok(Poll::NotYetVisible) },
        )
        .await;
        let err = never.unwrap_err();
        assert!(matches!(err, WaitError::NeverVisible { .. }), "{err}");
        assert!(started.elapsed() >= VISIBILITY_BOUND);
        assert!(started.elapsed() < VISIBILITY_BOUND + Duration::from_secs(6));
        assert!(
            err.to_string()
                .starts_with("snapshot snap-1 is still unknown to EC2 120s after it was made"),
            "{err}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_state_ends_the_wait_at_once() {
        let r: Result<(), WaitError<DescribeFailed>> = wait_for(
            "snapshot",
            "snap-1",
            WaitPolicy::LONG,
            &CancellationToken::new(),
            |_, _| {},
            || async {
                Ok(Poll::Failed {
                    state: "error".into(),
                })
            },
        )
        .await;
        assert_eq!(
            r.unwrap_err().to_string(),
            "snapshot snap-1 failed: it is error"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn interrupt_ends_the_wait_and_poll_errors_pass_through() {
        let cancel = CancellationToken::new();
        cancel.cancel();
        let r: Result<(), WaitError<DescribeFailed>> = wait_for(
            "ami",
            "ami-1",
            WaitPolicy::LONG,
            &cancel,
            |_, _| {},
            || async {
                Ok(Poll::Pending {
                    state: "pending".into(),
                    percent: None,
                })
            },
        )
        .await;
        assert!(matches!(r, Err(WaitError::Interrupted { .. })));
        let r: Result<(), WaitError<DescribeFailed>> = wait_for(
            "ami",
            "ami-1",
            WaitPolicy::LONG,
            &CancellationToken::new(),
            |_, _| {},
            || async { Err(DescribeFailed) },
        )
        .await;
        assert!(matches!(r, Err(WaitError::Poll(DescribeFailed))));
    }
}
