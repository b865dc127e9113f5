//! The undo stack: how to remove every resource a run made, registered the moment the resource
//! exists, run in reverse.
//!
//! Rules learnt from where other builders leak: an entry leaves the stack only after its undo
//! succeeded; a failed undo is kept and reported by resource id; undos are idempotent, so an
//! early release (unmount before snapshot) and the final cleanup share one action.

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
        });
        id
    }

    /// Runs one undo now (unmount before snapshotting, say). It leaves the stack only if it
    /// succeeded; on failure it stays for the final cleanup, which will try again.
    pub async fn release(&mut self, id: UndoId) -> Result<(), Leftover> {
        let Some(pos) = self.entries.iter().position(|e| e.id == id) else {
            return Ok(());
        };
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

    /// Runs the undos in reverse order of registration, going on past any that fail. On
    /// success the artifact's entries are skipped (and forgotten). Returns what could not be
    /// removed; `on_each` hears of every undo before and after it runs.
    pub async fn unwind(
        &mut self,
        succeeded: bool,
        mut on_each: impl FnMut(UndoProgress<'_>),
    ) -> Vec<Leftover> {
        let mut leftovers = Vec::new();
        while let Some(mut entry) = self.entries.pop() {
            if succeeded && entry.keep == Keep::OnSuccess {
                continue;
            }
            on_each(UndoProgress::Started {
                resource: &entry.resource,
                action: &entry.action_name,
            });
            let result = (entry.action)().await.map_err(|e| error_chain(&*e));
            on_each(UndoProgress::Finished {
                resource: &entry.resource,
                action: &entry.action_name,
                error: result.as_ref().err().map(String::as_str),
            });
            if let Err(error) = result {
                leftovers.push(Leftover {
                    resource: entry.resource,
                    action: entry.action_name,
                    error,
                });
            }
        }
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

    #[tokio::test]
    async fn unwinds_in_reverse_past_failures() {
        let log = Log::default();
        let mut stack = UndoStack::default();
        for (name, fail) in [("vol-1", false), ("attach", true), ("mount", false)] {
            stack.push(name, "undo", Keep::Never, recording(&log, name, fail));
        }
        let left = stack.unwind(false, |_| {}).await;
        assert_eq!(*log.lock().unwrap(), ["mount", "attach", "vol-1"]);
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].resource, "attach");
        assert!(left[0].error.contains("cannot remove attach"));
        assert!(stack.is_empty());
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
