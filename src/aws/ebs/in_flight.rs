//! How many block calls go at once: a pace that grows while latency holds the calls back,
//! never past what EBS's rate allows at the latency seen, and halves when EBS throttles
//! them; and the loop that keeps that many in flight.

use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use tokio::time::Instant;

use super::THROTTLED_ATTEMPTS;

/// Block calls in flight at first where the rate's quota is shared (`Quota::Account`). EBS
/// serves 1,000 a second; at its usual 100 ms a call that takes 100 in flight, so the pace
/// grows from here.
pub const BLOCKS_IN_FLIGHT: usize = 32;
/// EBS's usual latency for a block call, by its own sizing example.
const USUAL_LATENCY: Duration = Duration::from_millis(100);
/// The most in flight, whatever the latency: each holds an SDK call's state, at most 64 KiB
/// of its block in amibake's own buffers (a put's read buffer, a get's run before it is
/// written), and what the HTTP client reads ahead on its connection.
pub const MOST_BLOCKS_IN_FLIGHT: usize = 128;
/// The fewest, however much EBS throttles.
const FEWEST_BLOCKS_IN_FLIGHT: usize = 4;
/// EBS's block-call rate: PutSnapshotBlock per snapshot, GetSnapshotBlock per account
/// (the service quotas' defaults).
const EBS_BLOCK_CALLS_PER_SECOND: f64 = 1000.0;
/// The share of that rate the pace aims at: calls in flight times latency is the rate only
/// on average, and a second over the quota is throttled.
const RATE_AIMED_AT: f64 = 0.9;

/// Whose share of EBS's block-call rate the calls spend: it decides how many go at first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quota {
    /// PutSnapshotBlock's, per snapshot: the new snapshot's, this run's alone. The calls
    /// start at what that rate allows at EBS's usual latency: a bake's few hundred blocks
    /// go in a few rounds rather than the first of them spent growing the pace.
    Snapshot,
    /// GetSnapshotBlock's, per account: other clients of the account may be spending it
    /// too, so the calls start at `BLOCKS_IN_FLIGHT` and grow while none is throttled.
    Account,
}

/// How many block calls go at once, judged once a round (as many calls as the limit).
/// - A round with a throttled attempt: EBS's rate holds the calls back, and the limit
///   halves.
/// - A round that filled the limit with none: latency does. Until the first throttle the
///   limit doubles (a bake's few hundred blocks are put in a few rounds); after one it grows
///   by a quarter, since another client may be spending the same quota.
/// - Either way never past the calls that EBS's rate allows at the latency seen (rate ×
///   latency, less a margin): more would only be throttled, and hold blocks meanwhile.
/// - A round that never filled it (the items came slower than the calls) says nothing, and
///   the limit stays.
#[derive(Debug)]
struct Pace {
    limit: usize,
    done_in_round: usize,
    filled_in_round: bool,
    throttled_before_round: u64,
    ever_throttled: bool,
    /// The fastest call of the round so far: EBS's own latency. A slower call waited
    /// besides (retries after a throttle, a queue at the service), and the average of whole
    /// calls would grow with the calls in flight themselves and lift the cap past any use.
    fastest_in_round: Option<Duration>,
}

impl Pace {
    fn new(quota: Quota, throttled: u64) -> Pace {
        Pace {
            limit: match quota {
                Quota::Snapshot => Pace::rate_allows(USUAL_LATENCY),
                Quota::Account => BLOCKS_IN_FLIGHT,
            },
            done_in_round: 0,
            filled_in_round: false,
            throttled_before_round: throttled,
            ever_throttled: false,
            fastest_in_round: None,
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// A call started, making `in_flight` calls.
    fn call_started(&mut self, in_flight: usize) {
        self.filled_in_round |= in_flight >= self.limit;
    }

    /// The most calls in flight that EBS's rate allows at `latency`.
    fn rate_allows(latency: Duration) -> usize {
        let calls = (EBS_BLOCK_CALLS_PER_SECOND * RATE_AIMED_AT * latency.as_secs_f64()) as usize;
        calls.clamp(FEWEST_BLOCKS_IN_FLIGHT, MOST_BLOCKS_IN_FLIGHT)
    }

    /// A call ended after `took`; `throttled` is the count of throttled attempts so far.
    fn call_ended(&mut self, throttled: u64, took: Duration) {
        let fastest = self.fastest_in_round.map_or(took, |f| f.min(took));
        self.fastest_in_round = Some(fastest);
        self.done_in_round += 1;
        if self.done_in_round < self.limit {
            return;
        }
        self.fastest_in_round = None;
        if throttled > self.throttled_before_round {
            self.ever_throttled = true;
            self.limit = (self.limit / 2).max(FEWEST_BLOCKS_IN_FLIGHT);
        } else if self.filled_in_round {
            let grown = if self.ever_throttled {
                self.limit + self.limit.div_ceil(4)
            } else {
                self.limit * 2
            };
            // Never shrunk by a latency that fell: a round without a throttle says the
            // limit it had was not too many.
            self.limit = grown.min(Pace::rate_allows(fastest)).max(self.limit);
        }
        self.done_in_round = 0;
        self.filled_in_round = false;
        self.throttled_before_round = throttled;
    }
}

/// How a run of block calls ended, when none failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ran {
    All,
    Interrupted,
}

/// Runs `call` on each of `items`, as many at a time as the `Pace` allows (from what
/// `quota` starts at, between `FEWEST_BLOCKS_IN_FLIGHT` and `MOST_BLOCKS_IN_FLIGHT` as EBS
/// throttles or not), and hands each
/// result to `done` as it comes. Only that many calls exist at once (an SDK call's future is
/// large), so memory stays flat however many blocks there are.
/// `items` may come as they are found (a stream): calls start as soon as an item is there and a place is free. Stops at the
/// first error, of a call or of `done`, and at `cancel`; what is still in flight is aborted.
pub async fn each_block<I, T, E, Fut>(
    quota: Quota,
    items: impl Stream<Item = I>,
    cancel: &tokio_util::sync::CancellationToken,
    mut call: impl FnMut(I) -> Fut,
    mut done: impl FnMut(T) -> Result<(), E>,
) -> Result<Ran, E>
where
    Fut: std::future::Future<Output = Result<T, E>> + Send + 'static,
    T: Send + 'static,
    E: Send + 'static,
{
    let mut items = std::pin::pin!(items);
    let mut no_more_items = false;
    let mut in_flight = tokio::task::JoinSet::new();
    let mut pace = Pace::new(quota, THROTTLED_ATTEMPTS.load(Ordering::Relaxed));
    loop {
        if no_more_items && in_flight.is_empty() {
            return Ok(Ran::All);
        }
        tokio::select! {
            _ = cancel.cancelled() => {
                in_flight.abort_all();
                return Ok(Ran::Interrupted);
            }
            item = items.next(), if !no_more_items && in_flight.len() < pace.limit() => {
                match item {
                    Some(item) => {
                        let call = call(item);
                        in_flight.spawn(async move {
                            let started = Instant::now();
                            (call.await, started.elapsed())
                        });
                        pace.call_started(in_flight.len());
                    }
                    None => no_more_items = true,
                }
            }
            Some(joined) = in_flight.join_next() => match joined {
                Ok((result, took)) => {
                    pace.call_ended(THROTTLED_ATTEMPTS.load(Ordering::Relaxed), took);
                    done(result?)?
                }
                // Tasks are only aborted above, and a block call does not panic.
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;
    use tokio_util::sync::CancellationToken;

    /// A call that takes a while and counts how many run at once.
    fn counting_call(
        now: Arc<AtomicUsize>,
        most: Arc<AtomicUsize>,
    ) -> impl FnMut(
        u64,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<u64, String>> + Send>,
    > {
        move |item| {
            let (now, most) = (now.clone(), most.clone());
            Box::pin(async move {
                let running = now.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(running, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(10)).await;
                now.fetch_sub(1, Ordering::SeqCst);
                if item == 1000 {
                    return Err(format!("block {item} refused"));
                }
                Ok(item)
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn items_from_a_stream_are_called_as_they_come_and_never_too_many_at_once() {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<u64>(4);
        // Items found slowly, as a reading of the image finds them.
        let finder = tokio::spawn(async move {
            for i in 0..200 {
                tx.send(i).await.unwrap();
                if i % 50 == 0 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        });
        let (now, most) = (Arc::default(), Arc::new(AtomicUsize::new(0)));
        let mut done = Vec::new();
        let ran = each_block(
            Quota::Account,
            futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)),
            &CancellationToken::new(),
            counting_call(now, most.clone()),
            |item| {
                done.push(item);
                Ok::<_, String>(())
            },
        )
        .await;
        finder.await.unwrap();
        assert_eq!(ran, Ok(Ran::All));
        done.sort();
        assert_eq!(done, (0..200).collect::<Vec<_>>());
        let most = most.load(Ordering::SeqCst);
        assert!(most > 1 && most <= MOST_BLOCKS_IN_FLIGHT, "{most} at once");
    }

    /// A round whose calls all go at once, the limit filled, each taking `took`.
    fn round(pace: &mut Pace, throttled: u64, took: Duration) -> usize {
        let limit = pace.limit();
        (1..=limit).for_each(|n| pace.call_started(n));
        (0..limit).for_each(|_| pace.call_ended(throttled, took));
        pace.limit()
    }

    #[test]
    fn the_pace_doubles_up_to_what_the_rate_allows_at_the_latency_seen() {
        let mut pace = Pace::new(Quota::Account, 7);
        // Items too slow to fill it: the limit is not what holds the calls back.
        for _ in 0..BLOCKS_IN_FLIGHT {
            pace.call_started(1);
            pace.call_ended(7, USUAL_LATENCY);
        }
        assert_eq!(pace.limit(), BLOCKS_IN_FLIGHT);
        // At 100 ms a call, 90 in flight are 900 a second: 90 % of EBS's 1,000.
        assert_eq!(round(&mut pace, 7, USUAL_LATENCY), 64);
        assert_eq!(round(&mut pace, 7, USUAL_LATENCY), 90);
        assert_eq!(round(&mut pace, 7, USUAL_LATENCY), 90);
        // Calls that waited besides (a retry's backoff, a queue): EBS's latency is its
        // fastest call's, and the cap holds.
        (1..=90).for_each(|n| pace.call_started(n));
        pace.call_ended(7, USUAL_LATENCY);
        (1..90).for_each(|_| pace.call_ended(7, Duration::from_secs(2)));
        assert_eq!(pace.limit(), 90);
        // Slower calls allow more, up to the most.
        let limits: Vec<_> = (0..10)
            .map(|_| round(&mut pace, 7, Duration::from_secs(1)))
            .collect();
        assert_eq!(limits.last(), Some(&MOST_BLOCKS_IN_FLIGHT));
        assert!(limits.windows(2).all(|w| w[0] <= w[1]), "{limits:?}");
        // Faster ones do not shrink it: only a throttle does.
        assert_eq!(
            round(&mut pace, 7, Duration::from_millis(1)),
            MOST_BLOCKS_IN_FLIGHT
        );
    }

    /// A snapshot's puts spend its own rate: they start at what it allows at EBS's usual
    /// latency, all of them in the first round. An account's gets start lower.
    #[tokio::test(start_paused = true)]
    async fn puts_start_at_their_snapshots_rate_and_gets_lower() {
        for (quota, first_round) in [(Quota::Snapshot, 90), (Quota::Account, BLOCKS_IN_FLIGHT)] {
            let (now, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
            let ran = each_block(
                quota,
                futures_util::stream::iter(0..first_round as u64),
                &CancellationToken::new(),
                counting_call(now, most.clone()),
                |_| Ok::<_, String>(()),
            )
            .await;
            assert_eq!(ran, Ok(Ran::All));
            assert_eq!(most.load(Ordering::SeqCst), first_round, "{quota:?}");
        }
    }

    #[test]
    fn a_throttle_halves_the_pace_and_it_grows_back_slowly() {
        let mut pace = Pace::new(Quota::Account, 0);
        while round(&mut pace, 0, USUAL_LATENCY) < 90 {}
        // A throttle within a round halves it, once for that round.
        assert_eq!(round(&mut pace, 1, USUAL_LATENCY), 45);
        // Unthrottled again: a quarter more a round (another client may share the quota),
        // up to the rate's 90 again.
        assert_eq!(round(&mut pace, 1, USUAL_LATENCY), 57);
        assert_eq!(round(&mut pace, 1, USUAL_LATENCY), 72);
        assert_eq!(round(&mut pace, 1, USUAL_LATENCY), 90);
        assert_eq!(round(&mut pace, 1, USUAL_LATENCY), 90);
        // Throttled round after round: down to the fewest, never below.
        for throttled in 2..12 {
            round(&mut pace, throttled, USUAL_LATENCY);
        }
        assert_eq!(pace.limit(), FEWEST_BLOCKS_IN_FLIGHT);
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_error_stops_the_calls_and_an_interrupt_says_so() {
        let (now, most) = (Arc::new(AtomicUsize::new(0)), Arc::default());
        let mut done = 0;
        let ran = each_block(
            Quota::Account,
            futures_util::stream::iter(990..2000),
            &CancellationToken::new(),
            counting_call(now.clone(), most),
            |_| {
                done += 1;
                Ok(())
            },
        )
        .await;
        assert_eq!(ran, Err("block 1000 refused".to_string()));
        assert!(done < 100, "{done} calls finished after the error");

        let cancel = CancellationToken::new();
        cancel.cancel();
        let ran = each_block(
            Quota::Account,
            futures_util::stream::pending::<u64>(),
            &cancel,
            counting_call(Arc::default(), Arc::default()),
            |_| Ok(()),
        )
        .await;
        assert_eq!(ran, Ok(Ran::Interrupted), "even while waiting for an item");
    }
}
