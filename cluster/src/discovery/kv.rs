//! The store's vocabulary, shared by both backends: what a listing returns, and how long one
//! call may take.

use std::time::Duration;

/// Deadline for reaching etcd and for each unary call to it: an etcd that vanished costs a
/// bounded wait, never a hung planner or follower.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// One key as stored.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the key's last write: the guard of a conditional write.
    pub mod_revision: i64,
}

/// Every key under a prefix, as of one revision.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Listing {
    pub kvs: Vec<Kv>,
    /// The store's revision when it was read.
    pub revision: i64,
}

/// A conditional write: `value` goes to `key` only if the key's mod revision is
/// `expected_revision` (0: absent) and `holder`'s key holds `holder`'s value.
#[derive(Debug, Clone)]
pub(crate) struct GuardedPut {
    pub key: String,
    pub value: Vec<u8>,
    pub expected_revision: i64,
    pub holder: (String, String),
}
