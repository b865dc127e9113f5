//! CloudWatch Logs, read only: the output SSM's agent streams there as a command runs.

use super::{AwsError, Clients};

/// How many pages one read goes through at most.
const PAGES_PER_READ: usize = 20;

/// One log stream, read forward from its start: each read answers what was added since.
#[derive(Debug, Clone)]
pub struct Follower {
    group: String,
    stream: String,
    /// GetLogEvents' forward token; None before the first read that found the stream.
    next: Option<String>,
}

impl Follower {
    pub fn new(group: &str, stream: &str) -> Follower {
        Follower {
            group: group.to_string(),
            stream: stream.to_string(),
            next: None,
        }
    }

    /// The lines added to the stream since the last read. A stream that does not exist yet
    /// (nothing was written to it) has none.
    pub async fn new_lines(&mut self, clients: &Clients) -> Result<Vec<String>, AwsError> {
        let mut lines = Vec::new();
        // A page may be empty while more follow; what is left is read at the next call.
        for _ in 0..PAGES_PER_READ {
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
                    break
                }
                Err(e) => {
                    return Err(AwsError::new(
                        format!("read log stream {} of group {}", self.stream, self.group),
                        e,
                    ))
                }
            };
            for event in answer.events() {
                let message = event.message().unwrap_or_default();
                lines.extend(message.lines().map(str::to_string));
            }
            // At the stream's end the forward token comes back as it was sent.
            let token = answer.next_forward_token().map(str::to_string);
            if token.is_none() || token == self.next {
                break;
            }
            self.next = token;
        }
        Ok(lines)
    }
}
