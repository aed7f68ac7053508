//! Errors from the agent API, classified so that callers can decide: retry, fail, or explain.

/// An agent request failed.
#[derive(Debug, thiserror::Error)]
pub enum ConsulError {
    /// The agent could not be reached, or the request timed out.
    #[error("cannot reach the Consul agent at {addr}: {}", with_causes(.source))]
    Unreachable {
        /// The agent address.
        addr: String,
        /// The transport error.
        #[source]
        source: reqwest::Error,
    },
    /// Over HTTP/1.1 a few requests at a time are allowed: the ones ahead of this request held
    /// every slot for all or most of its timeout, so it got no slot or too little time left.
    /// The agent is slow to answer, or unreachable for them too.
    #[error(
        "cannot reach the Consul agent at {addr}: the requests ahead held every request slot for most of {waited:?} (the agent is slow to answer, or unreachable)"
    )]
    Busy {
        /// The agent address.
        addr: String,
        /// How long the request waited.
        waited: std::time::Duration,
    },
    /// 403: the token lacks a permission (or is unknown).
    #[error(
        "permission denied by the agent for {endpoint} (the token likely lacks {permission}): {body}"
    )]
    Forbidden {
        /// What was requested.
        endpoint: String,
        /// The ACL permission this endpoint needs.
        permission: String,
        /// The agent's message.
        body: String,
    },
    /// 404.
    #[error("{endpoint}: not found: {body}")]
    NotFound {
        /// What was requested.
        endpoint: String,
        /// The agent's message.
        body: String,
    },
    /// 429: the agent limits this client, most often by `limits.http_max_conns_per_client`
    /// (concurrent connections per client address). Transient from our side: retried.
    #[error("{endpoint}: the agent refused the request (429): {body}{}", limit_hint(.body))]
    TooManyRequests {
        /// What was requested.
        endpoint: String,
        /// The agent's message.
        body: String,
    },
    /// Any other non-2xx status.
    #[error("{endpoint}: agent answered {status}: {body}")]
    Status {
        /// What was requested.
        endpoint: String,
        /// HTTP status.
        status: u16,
        /// The agent's message.
        body: String,
    },
    /// The body was not the JSON we expect.
    #[error("{endpoint}: malformed response: {source}")]
    Decode {
        /// What was requested.
        endpoint: String,
        /// The decoder's complaint.
        #[source]
        source: serde_json::Error,
    },
    /// A header we rely on was missing or malformed.
    #[error("{endpoint}: {what}")]
    Protocol {
        /// What was requested.
        endpoint: String,
        /// What was wrong.
        what: String,
    },
    /// The ACL token file could not be read.
    #[error("cannot read the ACL token file {path}: {source}")]
    TokenFile {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP client could not be built (bad CA file, bad client cert, ...).
    #[error("cannot set up the agent HTTP client: {0}")]
    Setup(String),
}

/// What to do about the agent's per-client connection limit, when that is what refused us.
fn limit_hint(body: &str) -> &'static str {
    if body.contains("concurrent connections") {
        " (over HTTP/1.1 each request in flight holds a connection, about 10 per proxy, and \
         the agent allows limits.http_max_conns_per_client, default 200, per client address \
         for every process on the host: point -http-addr at the agent's HTTPS port, where all \
         queries share one HTTP/2 connection, or raise the limit)"
    } else {
        ""
    }
}

impl ConsulError {
    /// Whether the agent could not be reached at all (as opposed to answering with an error).
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            ConsulError::Unreachable { .. } | ConsulError::Busy { .. }
        )
    }

    /// Whether this is an ACL refusal.
    pub fn is_forbidden(&self) -> bool {
        matches!(self, ConsulError::Forbidden { .. })
    }

    /// Whether this is a 404.
    pub fn is_not_found(&self) -> bool {
        matches!(self, ConsulError::NotFound { .. })
    }

    /// A short, stable label for the kind of failure, for logs that should change only when
    /// the kind of failure changes.
    pub fn kind(&self) -> &'static str {
        match self {
            ConsulError::Unreachable { .. } => "unreachable",
            ConsulError::Busy { .. } => "busy",
            ConsulError::Forbidden { .. } => "forbidden",
            ConsulError::NotFound { .. } => "not_found",
            ConsulError::TooManyRequests { .. } => "too_many_requests",
            ConsulError::Status { .. } => "status",
            ConsulError::Decode { .. } => "decode",
            ConsulError::Protocol { .. } => "protocol",
            ConsulError::TokenFile { .. } => "token_file",
            ConsulError::Setup(_) => "setup",
        }
    }
}

/// An error's message followed by those of its causes (`a: b: c`), skipping a cause whose
/// message the text already holds. reqwest's own message ("error sending request for url")
/// leaves out what an operator needs: connection refused, no such socket file, timed out.
fn with_causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        let message = c.to_string();
        if !text.contains(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
        cause = c.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreachable_agent_is_explained_down_to_the_cause() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] Middle);
        #[derive(Debug, thiserror::Error)]
        #[error("middle: io failed")]
        struct Middle(#[source] std::io::Error);
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "io failed");
        assert_eq!(with_causes(&Outer(Middle(io))), "outer: middle: io failed");
    }

    fn too_many(body: &str) -> String {
        ConsulError::TooManyRequests {
            endpoint: "roots".into(),
            body: body.into(),
        }
        .to_string()
    }

    #[test]
    fn a_429_from_the_connection_limit_says_how_to_get_under_it() {
        let msg = too_many(
            "Your IP is issuing too many concurrent connections, please rate limit your calls",
        );
        assert!(msg.contains("limits.http_max_conns_per_client"), "{msg}");
        assert!(msg.contains("HTTPS"), "{msg}");
        let other = too_many("rate limit exceeded");
        assert!(!other.contains("http_max_conns_per_client"), "{other}");
        assert!(other.contains("429") && other.contains("rate limit exceeded"));
    }
}
