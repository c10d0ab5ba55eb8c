//! Who may call the public Inference service: a client with an API key (when keys are on),
//! or a cluster member proving the cluster token for this router, which is how a gateway
//! reaches every router without holding their API keys. A call admitted on the cluster proof
//! is marked [`ViaGateway`]: its stream moves to another router when this one drains.

use std::sync::Arc;

use moe_cluster::auth::{headers, StreamGate};
use tonic::{Request, Status};

use crate::api_keys::ApiKeys;
use crate::error::RouterError;

/// Request extension: the call proved the cluster token (it came from a gateway).
#[derive(Debug, Clone, Copy)]
pub struct ViaGateway;

#[derive(Clone)]
pub struct InferenceAccess {
    keys: ApiKeys,
    /// Checks cluster openings naming this router (`None` without `--cluster-token-file`).
    members: Option<Arc<StreamGate>>,
}

impl InferenceAccess {
    pub fn new(keys: ApiKeys, members: Option<StreamGate>) -> Self {
        Self {
            keys,
            members: members.map(Arc::new),
        }
    }

    /// A tonic interceptor (an edge: it answers a `Status`).
    pub fn intercept(&self, mut request: Request<()>) -> Result<Request<()>, Status> {
        // A call carrying a cluster opening is judged on it alone: a wrong proof is refused
        // even when keys are off, so a gateway with the wrong token learns it at once.
        if request.metadata().contains_key(headers::PROOF) {
            let Some(gate) = &self.members else {
                return Err(RouterError::Unauthenticated(
                    "this router has no cluster token: a gateway must reach it with an API key",
                )
                .into());
            };
            return match gate.admit(request.metadata()) {
                Ok(_) => {
                    request.extensions_mut().insert(ViaGateway);
                    Ok(request)
                }
                Err(reason) => {
                    tracing::warn!(%reason, "refused a cluster credential on the Inference API");
                    Err(RouterError::Unauthenticated("the cluster credential was refused").into())
                }
            };
        }
        self.keys.intercept(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_cluster::auth::{ClusterToken, StreamOpening};

    fn with_opening(token: &ClusterToken, router: &str) -> Request<()> {
        let mut request = Request::new(());
        StreamOpening::new(token, router).apply(request.metadata_mut());
        request
    }

    #[test]
    fn the_cluster_proof_for_this_router_stands_for_an_api_key() {
        let token = ClusterToken::from_secret(b"cluster-secret-0123456789");
        let keys = ApiKeys::from_keys(["client-key"]);
        let access = InferenceAccess::new(keys, Some(StreamGate::new(token.clone(), "r1".into())));
        let admitted = access.intercept(with_opening(&token, "r1")).unwrap();
        assert!(admitted.extensions().get::<ViaGateway>().is_some());
        // Another router's proof, another token, or none at all: refused.
        assert!(access.intercept(with_opening(&token, "r2")).is_err());
        let other = ClusterToken::from_secret(b"another-secret-0123456789");
        assert!(access.intercept(with_opening(&other, "r1")).is_err());
        assert!(access.intercept(Request::new(())).is_err());
        // A client key still works, and is not taken for a gateway.
        let mut client = Request::new(());
        client
            .metadata_mut()
            .insert("authorization", "Bearer client-key".parse().unwrap());
        let admitted = access.intercept(client).unwrap();
        assert!(admitted.extensions().get::<ViaGateway>().is_none());
        // Without a token, a proof cannot be checked and is refused even with keys off.
        let open = InferenceAccess::new(ApiKeys::default(), None);
        assert!(open.intercept(with_opening(&token, "r1")).is_err());
        assert!(open.intercept(Request::new(())).is_ok());
    }
}
