//! CloudWatch Logs, read only: the output SSM's agent streams there as a command runs.

use super::{AwsError, Clients};

/// One log stream, read forward from its start, a page at a time.
#[derive(Debug, Clone)]
pub struct Follower {
    group: String,
    stream: String,
    /// GetLogEvents' forward token; None before the first page that found the stream.
    next: Option<String>,
}

/// A page of a stream: its lines, and whether it reached what the stream holds so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub lines: Vec<String>,
    pub at_end: bool,
}

impl Follower {
    pub fn new(group: &str, stream: &str) -> Follower {
        Follower {
            group: group.to_string(),
            stream: stream.to_string(),
            next: None,
        }
    }

    /// The next page of the stream. A stream that does not exist yet (nothing was written
    /// to it) is at its end. Cancel-safe: dropped before its answer, it reads nothing.
    pub async fn next_page(&mut self, clients: &Clients) -> Result<Page, AwsError> {
        let answer = clients
            .logs
            .get_log_events()
            .log_group_name(&self.group)
            .log_stream_name(&self.stream)
            .start_from_head(true)
            .set_next_token(self.next.clone())
            .send()
            .await;
        let answer = match answer {
            Ok(answer) => answer,
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_resource_not_found_exception()) =>
            {
                return Ok(Page {
                    lines: Vec::new(),
                    at_end: true,
                })
            }
            Err(e) => {
                return Err(AwsError::new(
                    format!("read log stream {} of group {}", self.stream, self.group),
                    e,
                ))
            }
        };
        let lines = answer
            .events()
            .iter()
            .flat_map(|event| event.message().unwrap_or_default().lines())
            .map(str::to_string)
            .collect();
        // At the stream's end the forward token comes back as it was sent; a page may be
        // empty while more follow.
        let token = answer.next_forward_token().map(str::to_string);
        let at_end = token.is_none() || token == self.next;
        if token.is_some() {
            self.next = token;
        }
        Ok(Page { lines, at_end })
    }
}
