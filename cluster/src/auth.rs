//! Cluster membership credentials: the shared cluster token (`--cluster-token-file`) and the
//! proofs built from it.
//!
//! The token itself never crosses the network. Each side proves it holds the token with an
//! HMAC-SHA256 over a context that names what is being proved (which stream, which node,
//! which epoch's nonce, a fresh random challenge), so a proof captured by an eavesdropper or a
//! rogue process cannot be replayed anywhere else. Every comparison runs in constant time.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::hmac;

/// Shortest token accepted: 128 bits of secret, if the file holds random bytes.
pub const MIN_TOKEN_BYTES: usize = 16;
/// Bytes of one proof (HMAC-SHA256).
pub const PROOF_BYTES: usize = 32;

/// The shared secret of a cluster's members. Cheap to clone; `Debug` never prints it.
#[derive(Clone)]
pub struct ClusterToken {
    key: Arc<hmac::Key>,
}

impl std::fmt::Debug for ClusterToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterToken(<redacted>)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read the cluster token file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the cluster token in {path} has {len} bytes; it needs at least {MIN_TOKEN_BYTES} \
         (e.g. `openssl rand -hex 32 > {path}`)"
    )]
    TooShort { path: PathBuf, len: usize },
}

impl ClusterToken {
    /// The first line of `path`, trimmed.
    pub fn from_file(path: &Path) -> Result<Self, TokenError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let secret = text.lines().next().unwrap_or_default().trim();
        if secret.len() < MIN_TOKEN_BYTES {
            return Err(TokenError::TooShort {
                path: path.to_path_buf(),
                len: secret.len(),
            });
        }
        Ok(Self::from_secret(secret.as_bytes()))
    }

    /// A token from its secret bytes (tests, and tokens generated in process).
    pub fn from_secret(secret: &[u8]) -> Self {
        Self {
            key: Arc::new(hmac::Key::new(hmac::HMAC_SHA256, secret)),
        }
    }

    /// HMAC-SHA256 of the context's parts (each length-prefixed, so no two different
    /// contexts can concatenate to the same bytes).
    pub fn prove(&self, context: &[&[u8]]) -> [u8; PROOF_BYTES] {
        let mut ctx = hmac::Context::with_key(&self.key);
        for part in context {
            ctx.update(&(part.len() as u64).to_le_bytes());
            ctx.update(part);
        }
        let tag = ctx.sign();
        let mut out = [0u8; PROOF_BYTES];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// Whether `proof` is this token's proof of `context`, in constant time.
    pub fn verify(&self, context: &[&[u8]], proof: &[u8]) -> bool {
        constant_time_eq(&self.prove(context), proof)
    }
}

/// Equality whose time depends only on the lengths involved, never on the contents.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() != b.len()) as u8;
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

/// Unpredictable bytes from the operating system (nonces, challenges, generated tokens).
pub fn random_bytes<const N: usize>() -> [u8; N] {
    use ring::rand::SecureRandom;
    let mut out = [0u8; N];
    if ring::rand::SystemRandom::new().fill(&mut out).is_err() {
        // ring reads getrandom(2); it does not fail on a working Linux. Fall back to std's
        // randomly keyed hasher rather than to zeros.
        use std::hash::{BuildHasher, Hasher};
        for (i, chunk) in out.chunks_mut(8).enumerate() {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_usize(i);
            chunk.copy_from_slice(&h.finish().to_le_bytes()[..chunk.len()]);
        }
    }
    out
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes of a hex string; `None` unless it is exactly `N` bytes of hex.
pub fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let text = text.as_bytes();
    if text.len() != 2 * N {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; N];
    for (i, pair) in text.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

/// A fresh random token, hex-encoded (what `moe up` writes for its local cluster).
pub fn generate_token() -> String {
    hex(&random_bytes::<32>())
}

/// gRPC metadata of a data-plane stream's opening (router to node) and of the node's answer.
pub mod headers {
    /// The node the router means to reach: a proof for one node is worthless at another.
    pub const NODE: &str = "moe-cluster-node";
    /// Unix milliseconds when the router made the proof.
    pub const TIME: &str = "moe-cluster-time";
    /// 16 random bytes, hex: the node accepts each challenge once.
    pub const CHALLENGE: &str = "moe-cluster-challenge";
    /// The router's proof over node, time and challenge, hex.
    pub const PROOF: &str = "moe-cluster-proof";
    /// The node's proof over the router's challenge, hex, in its response headers.
    pub const ANSWER: &str = "moe-cluster-answer";
}

/// How long a stream proof stays valid (clock skew between hosts included). Within it, a
/// node remembers every challenge it accepted, so a captured proof cannot open a second stream.
pub const PROOF_LIFETIME: Duration = Duration::from_secs(60);
/// Challenges a node remembers at most; past it (only reachable with the token) it refuses
/// new streams until old challenges expire.
const MAX_REMEMBERED_CHALLENGES: usize = 65_536;

/// Why a stream or call was refused. Callers answer UNAUTHENTICATED and log the reason; the
/// peer learns only that it was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthFailure {
    #[error("no cluster credential (moe-cluster-* metadata)")]
    Missing,
    #[error("the credential names another node")]
    OtherNode,
    #[error("the credential is older than {PROOF_LIFETIME:?} or from the future")]
    Expired,
    #[error("the credential was already used")]
    Replayed,
    #[error("the credential does not prove the cluster token")]
    Wrong,
    #[error("too many recent streams to remember their challenges")]
    Busy,
}

fn unix_millis(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn header<'a>(metadata: &'a tonic::metadata::MetadataMap, name: &str) -> Option<&'a str> {
    metadata.get(name).and_then(|v| v.to_str().ok())
}

/// What a router sends when it opens a stream to `node_id`, and checks the answer against.
#[derive(Debug, Clone)]
pub struct StreamOpening {
    node_id: String,
    time: String,
    challenge: [u8; 16],
    proof: [u8; PROOF_BYTES],
}

impl StreamOpening {
    pub fn new(token: &ClusterToken, node_id: &str) -> Self {
        Self::at(token, node_id, SystemTime::now(), random_bytes())
    }

    fn at(token: &ClusterToken, node_id: &str, now: SystemTime, challenge: [u8; 16]) -> Self {
        let time = unix_millis(now).to_string();
        let proof = token.prove(&[
            b"moe-stream-open",
            node_id.as_bytes(),
            time.as_bytes(),
            &challenge,
        ]);
        Self {
            node_id: node_id.to_string(),
            time,
            challenge,
            proof,
        }
    }

    /// Adds the opening's headers to a request.
    pub fn apply(&self, metadata: &mut tonic::metadata::MetadataMap) {
        let values = [
            (headers::NODE, self.node_id.clone()),
            (headers::TIME, self.time.clone()),
            (headers::CHALLENGE, hex(&self.challenge)),
            (headers::PROOF, hex(&self.proof)),
        ];
        for (name, value) in values {
            // Node ids come from etcd: one that is not a valid header value simply fails
            // the node's check instead of the router's.
            if let Ok(value) = value.parse() {
                metadata.insert(name, value);
            }
        }
    }

    /// Whether the node's response headers prove it holds the token (so rows never go to a
    /// process that merely registered itself in etcd).
    pub fn check_answer(
        &self,
        token: &ClusterToken,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<(), AuthFailure> {
        let answer = header(metadata, headers::ANSWER).ok_or(AuthFailure::Missing)?;
        let answer = unhex::<PROOF_BYTES>(answer).ok_or(AuthFailure::Wrong)?;
        if token.verify(&answer_context(&self.node_id, &self.challenge), &answer) {
            Ok(())
        } else {
            Err(AuthFailure::Wrong)
        }
    }
}

fn answer_context<'a>(node_id: &'a str, challenge: &'a [u8; 16]) -> [&'a [u8]; 3] {
    [b"moe-stream-answer", node_id.as_bytes(), challenge]
}

/// A node's side: admits a stream whose opening proves the token, names this node, is fresh
/// and was never used before; answers with the node's own proof.
pub struct StreamGate {
    token: ClusterToken,
    node_id: String,
    /// Accepted challenges and when they may be forgotten.
    seen: std::sync::Mutex<HashMap<[u8; 16], SystemTime>>,
}

impl std::fmt::Debug for StreamGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamGate")
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

impl StreamGate {
    pub fn new(token: ClusterToken, node_id: String) -> Self {
        Self {
            token,
            node_id,
            seen: Default::default(),
        }
    }

    /// Checks a stream's opening; on success returns the answer header's value.
    pub fn admit(&self, metadata: &tonic::metadata::MetadataMap) -> Result<String, AuthFailure> {
        self.admit_at(metadata, SystemTime::now())
    }

    fn admit_at(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        now: SystemTime,
    ) -> Result<String, AuthFailure> {
        let node = header(metadata, headers::NODE).ok_or(AuthFailure::Missing)?;
        let time = header(metadata, headers::TIME).ok_or(AuthFailure::Missing)?;
        let challenge = header(metadata, headers::CHALLENGE).ok_or(AuthFailure::Missing)?;
        let proof = header(metadata, headers::PROOF).ok_or(AuthFailure::Missing)?;
        let challenge = unhex::<16>(challenge).ok_or(AuthFailure::Wrong)?;
        let proof = unhex::<PROOF_BYTES>(proof).ok_or(AuthFailure::Wrong)?;
        let context: [&[u8]; 4] = [
            b"moe-stream-open",
            node.as_bytes(),
            time.as_bytes(),
            &challenge,
        ];
        // The proof first: nothing about the rest is revealed to whoever lacks the token.
        if !self.token.verify(&context, &proof) {
            return Err(AuthFailure::Wrong);
        }
        if !constant_time_eq(node.as_bytes(), self.node_id.as_bytes()) {
            return Err(AuthFailure::OtherNode);
        }
        let made = time
            .parse::<u64>()
            .map(|ms| UNIX_EPOCH + Duration::from_millis(ms))
            .map_err(|_| AuthFailure::Wrong)?;
        let age = now.duration_since(made).unwrap_or_else(|e| e.duration());
        if age > PROOF_LIFETIME {
            return Err(AuthFailure::Expired);
        }
        {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            if seen.len() >= MAX_REMEMBERED_CHALLENGES {
                seen.retain(|_, forget_at| *forget_at > now);
            }
            if seen.contains_key(&challenge) {
                return Err(AuthFailure::Replayed);
            }
            if seen.len() >= MAX_REMEMBERED_CHALLENGES {
                return Err(AuthFailure::Busy);
            }
            // Remembered until the proof could no longer pass the age check from either side.
            seen.insert(challenge, made + 2 * PROOF_LIFETIME);
        }
        Ok(hex(&self
            .token
            .prove(&answer_context(&self.node_id, &challenge))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_bind_their_context_and_token() {
        let token = ClusterToken::from_secret(b"0123456789abcdef0123");
        let other = ClusterToken::from_secret(b"0123456789abcdef0124");
        let proof = token.prove(&[b"stream", b"node-1"]);
        assert!(token.verify(&[b"stream", b"node-1"], &proof));
        assert!(!token.verify(&[b"stream", b"node-2"], &proof));
        assert!(!other.verify(&[b"stream", b"node-1"], &proof));
        // Length prefixes: moving a byte between parts changes the proof.
        assert_ne!(proof, token.prove(&[b"strea", b"mnode-1"]));
        assert!(!token.verify(&[b"stream", b"node-1"], &proof[..31]));
        assert_eq!(format!("{token:?}"), "ClusterToken(<redacted>)");
    }

    #[test]
    fn token_files_are_read_and_checked() {
        let dir = std::env::temp_dir().join(format!("moe-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good");
        std::fs::write(&good, format!("{}\nignored\n", generate_token())).unwrap();
        assert!(ClusterToken::from_file(&good).is_ok());
        let short = dir.join("short");
        std::fs::write(&short, "abc\n").unwrap();
        let err = ClusterToken::from_file(&short).unwrap_err();
        assert!(err.to_string().contains("at least 16"), "{err}");
        let err = ClusterToken::from_file(&dir.join("missing")).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_stream_opens_once_at_its_node_with_the_token() {
        let token = ClusterToken::from_secret(b"shared-secret-0123456789");
        let gate = StreamGate::new(token.clone(), "node-1".into());
        let now = SystemTime::now();
        let opening = StreamOpening::at(&token, "node-1", now, [7; 16]);
        let mut request = tonic::metadata::MetadataMap::new();
        opening.apply(&mut request);
        let answer = gate.admit_at(&request, now).unwrap();
        let mut response = tonic::metadata::MetadataMap::new();
        response.insert(headers::ANSWER, answer.parse().unwrap());
        assert_eq!(opening.check_answer(&token, &response), Ok(()));
        // The same opening again: refused.
        assert_eq!(gate.admit_at(&request, now), Err(AuthFailure::Replayed));
        // Another node's opening, a stale one, one without the token, none at all.
        let mut other = tonic::metadata::MetadataMap::new();
        StreamOpening::at(&token, "node-2", now, [8; 16]).apply(&mut other);
        assert_eq!(gate.admit_at(&other, now), Err(AuthFailure::OtherNode));
        let mut stale = tonic::metadata::MetadataMap::new();
        StreamOpening::at(&token, "node-1", now - 2 * PROOF_LIFETIME, [9; 16]).apply(&mut stale);
        assert_eq!(gate.admit_at(&stale, now), Err(AuthFailure::Expired));
        let rogue = ClusterToken::from_secret(b"not-the-cluster-secret");
        let mut forged = tonic::metadata::MetadataMap::new();
        StreamOpening::at(&rogue, "node-1", now, [10; 16]).apply(&mut forged);
        assert_eq!(gate.admit_at(&forged, now), Err(AuthFailure::Wrong));
        assert_eq!(
            gate.admit_at(&tonic::metadata::MetadataMap::new(), now),
            Err(AuthFailure::Missing)
        );
        // A node without the token cannot answer.
        let rogue_gate = StreamGate::new(rogue, "node-1".into());
        let mut fresh = tonic::metadata::MetadataMap::new();
        let opening = StreamOpening::at(&token, "node-1", now, [11; 16]);
        opening.apply(&mut fresh);
        assert!(rogue_gate.admit_at(&fresh, now).is_err());
        let mut fake = tonic::metadata::MetadataMap::new();
        fake.insert(headers::ANSWER, hex(&[0u8; 32]).parse().unwrap());
        assert_eq!(opening.check_answer(&token, &fake), Err(AuthFailure::Wrong));
    }

    #[test]
    fn hex_round_trips() {
        let bytes = random_bytes::<16>();
        assert_eq!(unhex::<16>(&hex(&bytes)), Some(bytes));
        assert_eq!(unhex::<16>("zz"), None);
        assert_eq!(unhex::<1>("zz"), None);
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
