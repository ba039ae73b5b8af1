//! The registry's error type.

use std::path::PathBuf;

/// Everything that can go wrong in the registry library. Each message says
/// what to do next; [`Error::http_status`] maps it to the HTTP answer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request or the operator's input is malformed.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The token is unknown, already used, or expired.
    #[error("the token is unknown, already used or expired: ask the registry operator for a new one")]
    BadToken,
    /// The request needs a client certificate of a live node.
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// The caller is known but may not do this.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// No such node, certificate, token or path.
    #[error("not found: {0}")]
    NotFound(String),
    /// The state conflicts with the request (e.g. the registry already exists).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The network has no free prefix of the requested length left.
    #[error(
        "no free /{0} prefix left in the network: revoke unused nodes (`sixmesh registry list`) or use a longer prefix length"
    )]
    Exhausted(u8),
    /// A certificate, CSR or key could not be made or parsed.
    #[error("certificate error: {0}")]
    Certificate(String),
    /// The registry's state directory has no registry in it.
    #[error("no registry in {0}: run `sixmesh registry init --state-dir {0}` first")]
    NotInitialized(PathBuf),
    /// The database failed.
    #[error("database error: {0}")]
    Database(#[from] rusqlite::Error),
    /// A file or socket operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Talking to a registry failed (client side).
    #[error("registry request failed: {0}")]
    Remote(String),
    /// The registry answered with an error (client side).
    #[error("the registry refused ({status}): {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The registry's one-line error message.
        message: String,
    },
    /// A signature did not verify (network config, CA fingerprint).
    #[error("verification failed: {0}")]
    Verification(String),
    /// An internal failure (a bug or a dead worker thread).
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// Wraps an I/O error with what was being done.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io { what: what.into(), source }
    }

    /// The HTTP status this error is answered with.
    pub fn http_status(&self) -> u16 {
        match self {
            Error::BadRequest(_) | Error::Certificate(_) | Error::Verification(_) => 400,
            Error::BadToken | Error::Unauthorized(_) => 401,
            Error::Forbidden(_) => 403,
            Error::NotFound(_) => 404,
            Error::Conflict(_) => 409,
            Error::Exhausted(_) => 507,
            _ => 500,
        }
    }

    /// A short machine-readable code for the JSON error body.
    pub fn code(&self) -> &'static str {
        match self {
            Error::BadRequest(_) => "bad_request",
            Error::BadToken => "bad_token",
            Error::Unauthorized(_) => "unauthorized",
            Error::Forbidden(_) => "forbidden",
            Error::NotFound(_) => "not_found",
            Error::Conflict(_) => "conflict",
            Error::Exhausted(_) => "exhausted",
            Error::Certificate(_) => "bad_certificate",
            Error::Verification(_) => "verification_failed",
            _ => "internal",
        }
    }
}

impl From<rcgen::Error> for Error {
    fn from(e: rcgen::Error) -> Self {
        Error::Certificate(e.to_string())
    }
}

/// Result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
