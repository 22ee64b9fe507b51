//! The error boundary of the FlagAdmin and Replication services: one enum for
//! every way a call can fail, and its mapping to gRPC status codes.

use crate::store::StoreError;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed or fails validation; the message names the
    /// field path and the reason.
    #[error("{0}")]
    Invalid(String),
    /// The named object does not exist.
    #[error("{0}")]
    NotFound(String),
    /// An object with that key exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// The write is refused in the current state (e.g. a segment in use);
    /// the message names what stands in the way.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Optimistic concurrency failed: the object is at another revision.
    #[error("{what} is at revision {current}, not the expected {expected}")]
    Conflict {
        what: String,
        current: u64,
        expected: u64,
    },
    /// The server is shutting down and takes no more writes.
    #[error("flagwrite is shutting down")]
    ShuttingDown,
    /// A flush failed: the write is committed in memory but may or may not
    /// be on disk, and flagwrite stops (fail-stop) so that recovery decides.
    #[error("{0}")]
    NotDurable(String),
    /// The store failed; the write may not have been committed durably.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<Error> for tonic::Status {
    fn from(error: Error) -> tonic::Status {
        let message = error.to_string();
        match error {
            Error::Invalid(_) => tonic::Status::invalid_argument(message),
            Error::NotFound(_) => tonic::Status::not_found(message),
            Error::AlreadyExists(_) => tonic::Status::already_exists(message),
            Error::FailedPrecondition(_) => tonic::Status::failed_precondition(message),
            Error::Conflict { .. } => tonic::Status::aborted(message),
            Error::ShuttingDown => tonic::Status::unavailable(message),
            Error::NotDurable(_) => tonic::Status::unavailable(message),
            Error::Store(_) => tonic::Status::internal(message),
        }
    }
}

impl Error {
    /// A short label for metrics.
    pub fn outcome(&self) -> &'static str {
        match self {
            Error::Invalid(_) => "invalid",
            Error::NotFound(_) => "not_found",
            Error::AlreadyExists(_) => "already_exists",
            Error::FailedPrecondition(_) => "failed_precondition",
            Error::Conflict { .. } => "aborted",
            Error::ShuttingDown => "unavailable",
            Error::NotDurable(_) => "not_durable",
            Error::Store(_) => "internal",
        }
    }
}
