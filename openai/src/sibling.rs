//! The `n` choices of one request share their prompt's prefill: the router's scheduler
//! admits followers once their leader's prefill is done.

/// The `n` choices of one request prefill their common prompt once: the first announces
/// when its prefill is done (its full blocks then sit in the prefix cache), the others wait
/// for that before they are admitted, and take the prompt from the cache. A choice whose
/// leader is gone (failed, cancelled) no longer waits.
#[derive(Debug, Clone)]
pub enum SiblingPrefill {
    Leader(std::sync::Arc<std::sync::atomic::AtomicBool>),
    Follower(std::sync::Weak<std::sync::atomic::AtomicBool>),
}

impl SiblingPrefill {
    /// One leader and `followers` followers.
    pub fn group(followers: usize) -> (Self, Vec<Self>) {
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let weak = std::sync::Arc::downgrade(&done);
        (
            SiblingPrefill::Leader(done),
            (0..followers)
                .map(|_| SiblingPrefill::Follower(weak.clone()))
                .collect(),
        )
    }

    /// Whether this choice must still wait for its leader's prefill.
    pub fn waiting(&self) -> bool {
        match self {
            SiblingPrefill::Leader(_) => false,
            SiblingPrefill::Follower(leader) => leader
                .upgrade()
                .is_some_and(|done| !done.load(std::sync::atomic::Ordering::Acquire)),
        }
    }

    /// The leader's prefill is done.
    pub fn announce(&self) {
        if let SiblingPrefill::Leader(done) = self {
            done.store(true, std::sync::atomic::Ordering::Release);
        }
    }
}
