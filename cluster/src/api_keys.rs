//! Optional API keys (`--api-key-file`, `--admin-key-file`): requests must carry
//! `Authorization: Bearer <key>`. Keys are compared in constant time (no early exit on the
//! first differing byte, on length, or on which key matched) and never logged. Admin keys are
//! a separate set: [`AdminAccess`] lets only them (or, without the file, a client on this
//! host) make mutating calls, so whoever holds an inference key cannot reshape the cluster.
//! Routers and gateways check them alike.

use std::path::{Path, PathBuf};

use clap::Args;
use tonic::{Request, Status};

use crate::auth::constant_time_eq;

#[derive(Clone, Default)]
pub struct ApiKeys {
    keys: Vec<Vec<u8>>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys)", self.keys.len())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("cannot read the key file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the key file {path} holds no key")]
    Empty { path: PathBuf },
}

impl ApiKeys {
    /// One key per line; blank lines and lines starting with `#` are ignored.
    pub fn from_file(path: &Path) -> Result<Self, KeyFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyFileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let keys: Vec<Vec<u8>> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| l.as_bytes().to_vec())
            .collect();
        if keys.is_empty() {
            return Err(KeyFileError::Empty {
                path: path.to_path_buf(),
            });
        }
        Ok(Self { keys })
    }

    /// Keys given directly (tests, and callers that read them elsewhere).
    pub fn from_keys<'a>(keys: impl IntoIterator<Item = &'a str>) -> Self {
        Self {
            keys: keys.into_iter().map(|k| k.as_bytes().to_vec()).collect(),
        }
    }

    /// The keys of `path`, or none when no file is given.
    pub fn from_optional_file(path: Option<&Path>) -> Result<Self, KeyFileError> {
        path.map(Self::from_file)
            .transpose()
            .map(Option::unwrap_or_default)
    }

    pub fn enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Whether an `Authorization` header value carries a valid key (always true when keys are
    /// off).
    pub fn allows(&self, authorization: Option<&[u8]>) -> bool {
        if !self.enabled() {
            return true;
        }
        let Some(token) = authorization.and_then(|h| h.strip_prefix(b"Bearer ")) else {
            return false;
        };
        // Check every key, so the time does not say which one matched.
        self.keys
            .iter()
            .fold(false, |ok, key| constant_time_eq(key, token) | ok)
    }

    /// A tonic interceptor for the public gRPC services (an edge: it answers a `Status`).
    pub fn intercept(&self, request: Request<()>) -> Result<Request<()>, Status> {
        let header = request
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes());
        if self.allows(header) {
            Ok(request)
        } else {
            Err(Status::unauthenticated(
                "a valid API key is required: `authorization: Bearer <key>`",
            ))
        }
    }
}

/// `--api-key-file` and `--admin-key-file`, shared by routers and gateways.
#[derive(Args, Debug, Clone, Default)]
pub struct KeyFileArgs {
    /// File of API keys (one per line): inference calls, read-only admin calls and the HTTP
    /// API (`/metrics` included) then require `Authorization: Bearer <key>` (health checks
    /// stay open).
    #[arg(long, env = "MOE_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
    /// File of admin keys (one per line), distinct from the API keys: mutating admin calls
    /// (drains) require `Authorization: Bearer <admin key>`; read-only ones accept them too.
    /// Without it, drains are served only to clients on this host (loopback).
    #[arg(long, env = "MOE_ADMIN_KEY_FILE")]
    pub admin_key_file: Option<PathBuf>,
}

impl KeyFileArgs {
    /// Reads both files once, at start-up.
    pub fn load(&self) -> Result<AdminAccess, KeyFileError> {
        Ok(AdminAccess {
            api: ApiKeys::from_optional_file(self.api_key_file.as_deref())?,
            admin: ApiKeys::from_optional_file(self.admin_key_file.as_deref())?,
        })
    }
}

/// Why an admin call was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AccessDenied {
    /// No valid key (UNAUTHENTICATED).
    #[error("{0}")]
    Unauthenticated(&'static str),
    /// A key, but not one that may do this, or not from here (PERMISSION_DENIED).
    #[error("{0}")]
    PermissionDenied(&'static str),
}

impl From<AccessDenied> for Status {
    fn from(denied: AccessDenied) -> Self {
        match denied {
            AccessDenied::Unauthenticated(m) => Status::unauthenticated(m),
            AccessDenied::PermissionDenied(m) => Status::permission_denied(m),
        }
    }
}

/// Who may call admin services: read-only calls with an API key or an admin key; mutating
/// calls (drains) with an admin key only, or, when no admin key file is configured, from a
/// client on this host.
#[derive(Clone, Debug, Default)]
pub struct AdminAccess {
    pub api: ApiKeys,
    pub admin: ApiKeys,
}

fn authorization<T>(request: &Request<T>) -> Option<&[u8]> {
    request
        .metadata()
        .get("authorization")
        .map(|v| v.as_bytes())
}

impl AdminAccess {
    /// Read-only calls.
    pub fn read<T>(&self, request: &Request<T>) -> Result<(), AccessDenied> {
        if !self.api.enabled() && !self.admin.enabled() {
            return Ok(());
        }
        let header = authorization(request);
        let api = self.api.enabled() && self.api.allows(header);
        let admin = self.admin.enabled() && self.admin.allows(header);
        if api | admin {
            Ok(())
        } else {
            Err(AccessDenied::Unauthenticated(
                "a valid API or admin key is required: `authorization: Bearer <key>`",
            ))
        }
    }

    /// Mutating calls (drains).
    pub fn mutate<T>(&self, request: &Request<T>) -> Result<(), AccessDenied> {
        self.mutate_from(request, request.remote_addr())
    }

    fn mutate_from<T>(
        &self,
        request: &Request<T>,
        peer: Option<std::net::SocketAddr>,
    ) -> Result<(), AccessDenied> {
        if self.admin.enabled() {
            return if self.admin.allows(authorization(request)) {
                Ok(())
            } else {
                Err(AccessDenied::PermissionDenied(
                    "an admin key is required (`authorization: Bearer <admin key>`; `moe drain` and `moe drain-router` send MOE_ADMIN_KEY)",
                ))
            };
        }
        if peer.is_some_and(|p| p.ip().is_loopback()) {
            return Ok(());
        }
        Err(AccessDenied::PermissionDenied(
            "drains are served only to clients on the server's host unless it has \
             --admin-key-file",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_keys_are_checked_exactly() {
        let keys = ApiKeys {
            keys: vec![b"k1-secret".to_vec(), b"other".to_vec()],
        };
        assert!(keys.allows(Some(b"Bearer k1-secret")));
        assert!(keys.allows(Some(b"Bearer other")));
        assert!(!keys.allows(Some(b"Bearer k1-secre")));
        assert!(!keys.allows(Some(b"Bearer k1-secret2")));
        assert!(!keys.allows(Some(b"k1-secret")));
        assert!(!keys.allows(None));
        assert!(ApiKeys::default().allows(None));
        assert_eq!(format!("{keys:?}"), "ApiKeys(2 keys)");
    }

    fn keys(list: &[&str]) -> ApiKeys {
        ApiKeys::from_keys(list.iter().copied())
    }

    fn with(key: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(k) = key {
            r.metadata_mut()
                .insert("authorization", format!("Bearer {k}").parse().unwrap());
        }
        r
    }

    #[test]
    fn admin_keys_are_apart_from_api_keys() {
        let here = Some("127.0.0.1:5000".parse().unwrap());
        let remote = Some("10.1.2.3:5000".parse().unwrap());
        let access = AdminAccess {
            api: keys(&["inference"]),
            admin: keys(&["operator"]),
        };
        assert!(access.read(&with(Some("inference"))).is_ok());
        assert!(access.read(&with(Some("operator"))).is_ok());
        assert!(access.read(&with(None)).is_err());
        let denied = access
            .mutate_from(&with(Some("inference")), here)
            .unwrap_err();
        assert!(matches!(denied, AccessDenied::PermissionDenied(_)));
        assert!(access.mutate_from(&with(None), here).is_err());
        assert!(access.mutate_from(&with(Some("operator")), remote).is_ok());
        // No admin key file: drains only from this host, whatever key is sent.
        let local_only = AdminAccess {
            api: keys(&["inference"]),
            admin: ApiKeys::default(),
        };
        assert!(local_only
            .mutate_from(&with(Some("inference")), here)
            .is_ok());
        assert!(local_only
            .mutate_from(&with(Some("inference")), remote)
            .is_err());
        assert!(local_only.mutate_from(&with(None), None).is_err());
        let open = AdminAccess::default();
        assert!(open.read(&with(None)).is_ok());
    }
}
