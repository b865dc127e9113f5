//! How many block calls go at once: a pace that grows while latency holds the calls back
//! and halves when EBS throttles them, and the loop that keeps that many in flight.

use std::sync::atomic::Ordering;

use futures_util::{Stream, StreamExt};

use super::THROTTLED_ATTEMPTS;

/// Block calls in flight at first. EBS serves 1,000 a second (puts per snapshot, gets per
/// account); at its usual 100 ms a call that takes 100 in flight, so the pace grows from here.
pub const BLOCKS_IN_FLIGHT: usize = 32;
/// The most in flight: past EBS's rate at its usual latency, and 64 MiB of block data.
pub const MOST_BLOCKS_IN_FLIGHT: usize = 128;
/// The fewest, however much EBS throttles.
const FEWEST_BLOCKS_IN_FLIGHT: usize = 4;

/// How many block calls go at once, judged once a round (as many calls as the limit): a
/// round with a throttled attempt means EBS's rate holds the calls back, and the limit
/// halves; one that filled the limit with none means latency does, and it grows by a
/// quarter. A round that never filled it (the items came slower than the calls) says
/// nothing, and the limit stays.
#[derive(Debug)]
struct Pace {
    limit: usize,
    done_in_round: usize,
    filled_in_round: bool,
    throttled_before_round: u64,
}

impl Pace {
    fn new(throttled: u64) -> Pace {
        Pace {
            limit: BLOCKS_IN_FLIGHT,
            done_in_round: 0,
            filled_in_round: false,
            throttled_before_round: throttled,
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// A call started, making `in_flight` calls.
    fn call_started(&mut self, in_flight: usize) {
        self.filled_in_round |= in_flight >= self.limit;
    }

    /// A call ended; `throttled` is the count of throttled attempts so far.
    fn call_ended(&mut self, throttled: u64) {
        self.done_in_round += 1;
        if self.done_in_round < self.limit {
            return;
        }
        if throttled > self.throttled_before_round {
            self.limit = (self.limit / 2).max(FEWEST_BLOCKS_IN_FLIGHT);
        } else if self.filled_in_round {
            self.limit = (self.limit + self.limit.div_ceil(4)).min(MOST_BLOCKS_IN_FLIGHT);
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

/// Runs `call` on each of `items`, as many at a time as the `Pace` allows (from
/// `BLOCKS_IN_FLIGHT`, between `FEWEST_BLOCKS_IN_FLIGHT` and `MOST_BLOCKS_IN_FLIGHT` as EBS
/// throttles or not), and hands each
/// result to `done` as it comes. Only that many calls exist at once (an SDK call's future is
/// large, and a put holds its block), so memory stays flat however many blocks there are.
/// `items` may come as they are found (a stream): calls start as soon as an item is there and a place is free. Stops at the
/// first error, of a call or of `done`, and at `cancel`; what is still in flight is aborted.
pub async fn each_block<I, T, E, Fut>(
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
    let mut pace = Pace::new(THROTTLED_ATTEMPTS.load(Ordering::Relaxed));
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
                        in_flight.spawn(call(item));
                        pace.call_started(in_flight.len());
                    }
                    None => no_more_items = true,
                }
            }
            Some(joined) = in_flight.join_next() => match joined {
                Ok(result) => {
                    pace.call_ended(THROTTLED_ATTEMPTS.load(Ordering::Relaxed));
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

    #[test]
    fn the_pace_grows_while_nothing_is_throttled_and_halves_when_something_is() {
        let mut pace = Pace::new(7);
        // A round whose calls all go at once, the limit filled.
        let round = |pace: &mut Pace, throttled: u64| {
            let limit = pace.limit();
            (1..=limit).for_each(|n| pace.call_started(n));
            (0..limit).for_each(|_| pace.call_ended(throttled));
            pace.limit()
        };
        // Items too slow to fill it: the limit is not what holds the calls back.
        for _ in 0..BLOCKS_IN_FLIGHT {
            pace.call_started(1);
            pace.call_ended(7);
        }
        assert_eq!(pace.limit(), BLOCKS_IN_FLIGHT);
        // Latency is the limit: a quarter more each round, up to the most.
        assert_eq!(round(&mut pace, 7), 40);
        assert_eq!(round(&mut pace, 7), 50);
        let mut limits = Vec::new();
        for _ in 0..20 {
            limits.push(round(&mut pace, 7));
        }
        assert_eq!(limits.last(), Some(&MOST_BLOCKS_IN_FLIGHT));
        assert!(limits.windows(2).all(|w| w[0] <= w[1]), "{limits:?}");
        // A throttle within a round halves it, once for that round.
        assert_eq!(round(&mut pace, 9), MOST_BLOCKS_IN_FLIGHT / 2);
        // Unthrottled again: it grows back.
        assert_eq!(round(&mut pace, 9), 80);
        // Throttled round after round: down to the fewest, never below.
        let mut throttled = 9;
        for _ in 0..10 {
            throttled += 1;
            round(&mut pace, throttled);
        }
        assert_eq!(pace.limit(), FEWEST_BLOCKS_IN_FLIGHT);
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_error_stops_the_calls_and_an_interrupt_says_so() {
        let (now, most) = (Arc::new(AtomicUsize::new(0)), Arc::default());
        let mut done = 0;
        let ran = each_block(
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
            futures_util::stream::pending::<u64>(),
            &cancel,
            counting_call(Arc::default(), Arc::default()),
            |_| Ok(()),
        )
        .await;
        assert_eq!(ran, Ok(Ran::Interrupted), "even while waiting for an item");
    }
}
