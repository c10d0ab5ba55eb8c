//! The client side of a router, for every command that talks to one: the channel (TLS from
//! the global flags), API and admin keys as bearer tokens, and the runtime that drives it.

use anyhow::{bail, Context};

/// A runtime for one command's calls (the commands are synchronous; the clients are not).
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// `router` as a URI (`host:port` is plain HTTP/2).
pub fn endpoint(router: &str) -> String {
    if router.contains("://") {
        router.to_string()
    } else {
        format!("http://{router}")
    }
}

/// Where the CA and client certificate for TLS routers are (set once from the global flags).
static TLS: std::sync::OnceLock<RouterTls> = std::sync::OnceLock::new();

/// The global TLS flags for reaching routers.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RouterTls {
    /// CA (PEM) that signed the router's certificate; implies TLS (`https://`).
    #[arg(long, global = true, env = "MOE_TLS_CA")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for routers that require one (`--tls-client-ca`).
    #[arg(long, global = true, env = "MOE_TLS_CLIENT_CERT")]
    pub tls_client_cert: Option<std::path::PathBuf>,
    /// Private key (PEM) of `--tls-client-cert`.
    #[arg(long, global = true, env = "MOE_TLS_CLIENT_KEY")]
    pub tls_client_key: Option<std::path::PathBuf>,
}

/// Keeps the global TLS flags for every [`channel`] (once, from `main`).
pub fn set_tls(tls: RouterTls) {
    let _ = TLS.set(tls);
}

/// A channel to the router: TLS when the address says `https://` or a CA was given.
pub async fn channel(router: &str) -> anyhow::Result<tonic::transport::Channel> {
    let tls = TLS.get().cloned().unwrap_or_default();
    let secure = router.starts_with("https://") || tls.tls_ca.is_some();
    let uri = match (secure, router.split_once("://")) {
        (true, Some((_, rest))) => format!("https://{rest}"),
        (true, None) => format!("https://{router}"),
        (false, _) => endpoint(router),
    };
    let mut endpoint = tonic::transport::Endpoint::from_shared(uri.clone())
        .with_context(|| format!("bad router address {router}"))?;
    if secure {
        let identity = moe_cluster::tls::identity_from_flags(
            tls.tls_client_cert.as_deref(),
            tls.tls_client_key.as_deref(),
            ("--tls-client-cert", "--tls-client-key"),
        )?;
        let Some(config) = moe_cluster::tls::client_tls(tls.tls_ca.as_deref(), identity)? else {
            bail!("{router} is https: give the CA that signed its certificate with --tls-ca");
        };
        endpoint = endpoint.tls_config(config)?;
    }
    endpoint
        .connect()
        .await
        .with_context(|| format!("connecting to {uri}"))
}

/// A request carrying `MOE_API_KEY` as a bearer token, for routers started with
/// `--api-key-file`.
pub fn with_key<T>(message: T) -> tonic::Request<T> {
    with_key_from(message, "MOE_API_KEY")
}

/// A request carrying the key in the environment variable `var` (never a flag: `ps` would
/// show it) as a bearer token, when it is set.
pub fn with_key_from<T>(message: T, var: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Ok(key) = std::env::var(var) {
        if let Ok(value) = format!("Bearer {key}").parse() {
            request.metadata_mut().insert("authorization", value);
        }
    }
    request
}

/// A failed call as an error that says its gRPC code and message.
pub fn rpc_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}: {}", status.code(), status.message())
}
