//! API and admin keys live in `moe-cluster` (shared with the gateway); here, what a refused
//! admin call becomes in the router's one error enum.

pub use moe_cluster::api_keys::{AccessDenied, AdminAccess, ApiKeys, KeyFileArgs, KeyFileError};

use crate::error::RouterError;

impl From<AccessDenied> for RouterError {
    fn from(denied: AccessDenied) -> Self {
        match denied {
            AccessDenied::Unauthenticated(m) => RouterError::Unauthenticated(m),
            AccessDenied::PermissionDenied(m) => RouterError::PermissionDenied(m),
        }
    }
}
