//! Optional API keys (`--api-key-file`): requests must carry `Authorization: Bearer <key>`.
//! Keys are compared in constant time (no early exit on the first differing byte, on length,
//! or on which key matched) and never logged.

use std::path::Path;

use tonic::{Request, Status};

#[derive(Clone, Default)]
pub struct ApiKeys {
    keys: Vec<Vec<u8>>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys)", self.keys.len())
    }
}

/// Equality whose time depends only on the lengths involved, not on the contents.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() != b.len()) as u8;
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

impl ApiKeys {
    /// One key per line; blank lines and lines starting with `#` are ignored.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read the API key file {}: {e}", path.display()))?;
        let keys: Vec<Vec<u8>> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| l.as_bytes().to_vec())
            .collect();
        if keys.is_empty() {
            anyhow::bail!("the API key file {} holds no key", path.display());
        }
        Ok(Self { keys })
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

    /// A tonic interceptor for the public gRPC services.
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
}
