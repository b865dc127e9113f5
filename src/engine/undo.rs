//! The undo stack: how to remove every resource a run made, registered the moment the resource
//! exists, run in reverse.
//!
//! Rules learnt from where other builders leak: an entry leaves the stack only after its undo
//! succeeded; a failed undo is kept and reported by resource id; undos are idempotent, so an
//! early release (unmount before snapshot) and the final cleanup share one action; and an
//! undo that is only safe once another has succeeded (detach a volume once it is
//! unmounted) is not tried when that one failed, and is named as left with the reason.
//!
//! The final cleanup starts every undo at once, except those that must wait for another
//! (`require`, `order`): a CI system that sends SIGTERM kills about 10 s later, and removals
//! one after another (each with its wait) do not fit in that.

use std::future::Future;
use std::pin::Pin;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
type UndoFuture = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;
type UndoAction = Box<dyn FnMut() -> UndoFuture + Send>;

/// Whether an undo runs when the build succeeds too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// Temporary: a work volume, a key pair, a mount. Always removed.
    Never,
    /// The artifact (an AMI and its snapshot): kept on success, removed on failure.
    OnSuccess,
}

/// A handle to an undo registered earlier, for releasing it ahead of the final cleanup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UndoId(u64);

struct Entry {
    id: UndoId,
    resource: String,
    action_name: String,
    keep: Keep,
    action: UndoAction,
    /// Undos that must have succeeded before this one may run.
    after: Vec<UndoId>,
    /// Undos that must have been tried, whatever came of it, before this one runs.
    after_tried: Vec<UndoId>,
}

/// A resource that could not be cleaned, with why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Leftover {
    pub resource: String,
    pub action: String,
    pub error: String,
}

impl std::fmt::Display for Leftover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({} failed: {})",
            self.resource, self.action, self.error
        )
    }
}

/// A resource a failed run kept (`--on-error=abort`), and the undo that would remove it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Kept {
    pub resource: String,
    pub action: String,
}

impl std::fmt::Display for Kept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (not done: {})", self.resource, self.action)
    }
}

#[derive(Default)]
pub struct UndoStack {
    entries: Vec<Entry>,
    next_id: u64,
}

impl UndoStack {
    /// Registers how to undo `resource`. `action_name` reads as a verb phrase: "delete volume".
    pub fn push<F, Fut>(
        &mut self,
        resource: impl Into<String>,
        action_name: impl Into<String>,
        keep: Keep,
        mut action: F,
    ) -> UndoId
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
    {
        let id = UndoId(self.next_id);
        self.next_id += 1;
        self.entries.push(Entry {
            id,
            resource: resource.into(),
            action_name: action_name.into(),
            keep,
            action: Box::new(move || Box::pin(action())),
            after: Vec::new(),
            after_tried: Vec::new(),
        });
        id
    }

    /// Gives up every undo, none run: what a failed run keeps for a person to look at,
    /// oldest first.
    pub fn abandon(self) -> Vec<Kept> {
        self.entries
            .into_iter()
            .map(|e| Kept {
                resource: e.resource,
                action: e.action_name,
            })
            .collect()
    }

    /// Says that `dependent` may only be undone once `prerequisite` has been: a volume is
    /// detached only once its filesystem is unmounted, never under a live one.
    pub fn require(&mut self, dependent: UndoId, prerequisite: UndoId) {
        if let Some(entry) = self.entries.iter_mut().find(|e| e.id == dependent) {
            entry.after.push(prerequisite);
        }
    }

    /// Says that `later` runs only once `earlier` has been tried, whether or not it
    /// succeeded: the files lent to an image go back before it is unmounted, and the
    /// unmount is still worth trying when that fails.
    pub fn order(&mut self, later: UndoId, earlier: UndoId) {
        if let Some(entry) = self.entries.iter_mut().find(|e| e.id == later) {
            entry.after_tried.push(earlier);
        }
    }

    /// The first prerequisite of `entry` still on the stack (not undone), if any.
    fn blocking(&self, entry: &Entry) -> Option<&Entry> {
        entry
            .after
            .iter()
            .find_map(|id| self.entries.iter().find(|e| e.id == *id))
    }

    /// Runs one undo now (unmount before snapshotting, say). It leaves the stack only if it
    /// succeeded; on failure it stays for the final cleanup, which will try again.
    pub async fn release(&mut self, id: UndoId) -> Result<(), Leftover> {
        let Some(pos) = self.entries.iter().position(|e| e.id == id) else {
            return Ok(());
        };
        if let Some(blocker) = self.blocking(&self.entries[pos]) {
            let entry = &self.entries[pos];
            return Err(Leftover {
                resource: entry.resource.clone(),
                action: entry.action_name.clone(),
                error: not_tried(blocker),
            });
        }
        let entry = &mut self.entries[pos];
        match (entry.action)().await {
            Ok(()) => {
                self.entries.remove(pos);
                Ok(())
            }
            Err(e) => Err(Leftover {
                resource: entry.resource.clone(),
                action: entry.action_name.clone(),
                error: error_chain(&*e),
            }),
        }
    }

    /// Hands a resource over to the user without undoing it: the stack forgets it.
    pub fn forget(&mut self, id: UndoId) {
        self.entries.retain(|e| e.id != id);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Runs the undos, going on past any that fail: each starts as soon as what it waits
    /// for (`require`, `order`) is done, all the others at once, newest first. On success
    /// the artifact's entries are skipped (and forgotten). Returns what could not be
    /// removed; `on_each` hears of every undo as it starts and as it ends.
    pub async fn unwind(
        &mut self,
        succeeded: bool,
        mut on_each: impl FnMut(UndoProgress<'_>),
    ) -> Vec<Leftover> {
        let mut waiting: Vec<Entry> = self
            .entries
            .drain(..)
            .rev()
            .filter(|e| !(succeeded && e.keep == Keep::OnSuccess))
            .collect();
        let mut running: Vec<Entry> = Vec::new();
        // Failed undos, and those not tried because of one: what requires them is not tried.
        let mut failed: Vec<Entry> = Vec::new();
        let mut leftovers = Vec::new();
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            // Start, or give up on, every entry that no longer waits for another.
            while let Some(pos) = waiting.iter().position(|e| {
                let pending =
                    |id: &UndoId| waiting.iter().chain(running.iter()).any(|w| w.id == *id);
                let blocked = e.after.iter().any(|id| failed.iter().any(|f| f.id == *id));
                blocked || !(e.after.iter().any(pending) || e.after_tried.iter().any(pending))
            }) {
                let mut entry = waiting.remove(pos);
                let blocker = entry
                    .after
                    .iter()
                    .find_map(|id| failed.iter().find(|f| f.id == *id));
                if let Some(blocker) = blocker {
                    leftovers.push(Leftover {
                        error: not_tried(blocker),
                        resource: entry.resource.clone(),
                        action: entry.action_name.clone(),
                    });
                    failed.push(entry);
                    continue;
                }
                on_each(UndoProgress::Started {
                    resource: &entry.resource,
                    action: &entry.action_name,
                });
                let (id, undo) = (entry.id, (entry.action)());
                tasks.spawn(async move { (id, undo.await.map_err(|e| error_chain(&*e))) });
                running.push(entry);
            }
            let Some(joined) = tasks.join_next().await else {
                break;
            };
            let (id, result) = joined.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
            let pos = running
                .iter()
                .position(|e| e.id == id)
                .expect("a running undo");
            let entry = running.remove(pos);
            on_each(UndoProgress::Finished {
                resource: &entry.resource,
                action: &entry.action_name,
                error: result.as_ref().err().map(String::as_str),
            });
            if let Err(error) = result {
                leftovers.push(Leftover {
                    resource: entry.resource.clone(),
                    action: entry.action_name.clone(),
                    error,
                });
                failed.push(entry);
            }
        }
        // Only entries that wait on each other are left: a bug, but never a silent one.
        leftovers.extend(waiting.into_iter().map(|entry| Leftover {
            error: "not tried: it waits for an undo that waits for it".into(),
            resource: entry.resource,
            action: entry.action_name,
        }));
        leftovers
    }
}

pub enum UndoProgress<'a> {
    Started {
        resource: &'a str,
        action: &'a str,
    },
    Finished {
        resource: &'a str,
        action: &'a str,
        error: Option<&'a str>,
    },
}

fn not_tried(blocker: &Entry) -> String {
    format!(
        "not tried, as {} ({}) did not succeed first",
        blocker.resource, blocker.action_name
    )
}

/// An error and its causes as one line: "outer: inner: root".
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // Many errors already repeat their source in their own message.
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    type Log = Arc<Mutex<Vec<String>>>;

    /// An undo that writes its resource's name to `log`, and fails if asked to.
    fn recording(log: &Log, name: &str, fail: bool) -> impl FnMut() -> UndoFuture + Send + 'static {
        let (log, name) = (log.clone(), name.to_string());
        move || {
            let (log, name) = (log.clone(), name.clone());
            Box::pin(async move {
                log.lock().unwrap().push(name.clone());
                if fail {
                    Err(format!("cannot remove {name}").into())
                } else {
                    Ok(())
                }
            })
        }
    }

    /// Like `recording`, after a pause: an undo that would log after a quicker one it does
    /// not wait for.
    fn slow(log: &Log, name: &str, fail: bool) -> impl FnMut() -> UndoFuture + Send + 'static {
        let mut inner = recording(log, name, fail);
        move || {
            let undo = inner();
            Box::pin(async move {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                undo.await
            })
        }
    }

    #[tokio::test]
    async fn independent_undos_all_start_at_once_and_go_on_past_failures() {
        // Each undo waits for the other two to have started: one after another, they
        // would wait for ever (and the timeout fail the test).
        let started = Arc::new(tokio::sync::Barrier::new(3));
        let log = Log::default();
        let mut stack = UndoStack::default();
        for (name, fail) in [("vol-1", false), ("key-1", true), ("sg-1", false)] {
            let (started, mut undo) = (started.clone(), recording(&log, name, fail));
            stack.push(name, "remove", Keep::Never, move || {
                let (started, undo) = (started.clone(), undo());
                Box::pin(async move {
                    started.wait().await;
                    undo.await
                }) as UndoFuture
            });
        }
        let left = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            stack.unwind(false, |_| {}),
        )
        .await
        .expect("the undos ran at once");
        let mut ran = log.lock().unwrap().clone();
        ran.sort();
        assert_eq!(ran, ["key-1", "sg-1", "vol-1"]);
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].resource, "key-1");
        assert!(left[0].error.contains("cannot remove key-1"));
        assert!(stack.is_empty());
    }

    #[tokio::test]
    async fn an_undo_waits_for_what_it_requires_or_is_ordered_after() {
        let log = Log::default();
        let mut stack = UndoStack::default();
        let unmount = stack.push(
            "/mnt/x",
            "unmount",
            Keep::Never,
            recording(&log, "unmount", false),
        );
        let restore = stack.push(
            "/mnt/x/etc/resolv.conf",
            "restore",
            Keep::Never,
            slow(&log, "restore", true),
        );
        let detach = stack.push(
            "vol-1 on i-1",
            "detach",
            Keep::Never,
            recording(&log, "detach", false),
        );
        stack.require(detach, unmount);
        // The restore fails, and the unmount is still tried after it.
        stack.order(unmount, restore);
        let left = stack.unwind(false, |_| {}).await;
        assert_eq!(*log.lock().unwrap(), ["restore", "unmount", "detach"]);
        assert_eq!(left.len(), 1, "{left:?}");
        assert_eq!(left[0].resource, "/mnt/x/etc/resolv.conf");
    }

    #[tokio::test]
    async fn an_undo_whose_prerequisite_failed_is_not_tried_and_is_named() {
        let log = Log::default();
        let mut stack = UndoStack::default();
        let delete = stack.push(
            "vol-1",
            "delete volume",
            Keep::Never,
            recording(&log, "delete", false),
        );
        let detach = stack.push(
            "vol-1 on i-1",
            "detach volume",
            Keep::Never,
            recording(&log, "detach", false),
        );
        let unmount = stack.push(
            "/mnt/x",
            "unmount",
            Keep::Never,
            recording(&log, "unmount", true),
        );
        stack.require(detach, unmount);
        stack.require(delete, detach);
        let err = stack.release(detach).await.unwrap_err();
        assert_eq!(
            err.error,
            "not tried, as /mnt/x (unmount) did not succeed first"
        );
        let left = stack.unwind(false, |_| {}).await;
        assert_eq!(
            *log.lock().unwrap(),
            ["unmount"],
            "nothing after the failed unmount ran"
        );
        let named: Vec<String> = left.iter().map(|l| l.to_string()).collect();
        assert_eq!(
            named,
            [
                "/mnt/x (unmount failed: cannot remove unmount)",
                "vol-1 on i-1 (detach volume failed: not tried, as /mnt/x (unmount) did not succeed first)",
                "vol-1 (delete volume failed: not tried, as vol-1 on i-1 (detach volume) did not succeed first)",
            ]
        );
    }

    #[tokio::test]
    async fn success_keeps_the_artifact() {
        let log = Log::default();
        let mut stack = UndoStack::default();
        stack.push(
            "vol-1",
            "delete volume",
            Keep::Never,
            recording(&log, "vol-1", false),
        );
        stack.push(
            "ami-1",
            "deregister image",
            Keep::OnSuccess,
            recording(&log, "ami-1", false),
        );
        assert!(stack.unwind(true, |_| {}).await.is_empty());
        assert_eq!(*log.lock().unwrap(), ["vol-1"]);
    }

    #[tokio::test]
    async fn a_failed_release_stays_for_the_final_cleanup() {
        let log = Log::default();
        let mut stack = UndoStack::default();
        let id = stack.push(
            "mount",
            "unmount",
            Keep::Never,
            recording(&log, "mount", true),
        );
        assert!(stack.release(id).await.is_err());
        assert_eq!(stack.len(), 1);
        let left = stack.unwind(false, |_| {}).await;
        assert_eq!(left.len(), 1);
        assert_eq!(*log.lock().unwrap(), ["mount", "mount"]);
    }

    #[tokio::test]
    async fn a_successful_release_leaves_the_stack() {
        let log = Log::default();
        let mut stack = UndoStack::default();
        let id = stack.push(
            "mount",
            "unmount",
            Keep::Never,
            recording(&log, "mount", false),
        );
        stack.release(id).await.unwrap();
        assert!(stack.is_empty());
        assert!(stack.unwind(false, |_| {}).await.is_empty());
        assert_eq!(*log.lock().unwrap(), ["mount"]);
    }
}
