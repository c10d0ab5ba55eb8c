//! `moe generate --router`: the same request and the same output as offline, over gRPC.

use anyhow::{bail, Context};
use moe_model::FinishReason;
use moe_proto::v1::inference_client::InferenceClient;
use moe_proto::v1::{GenerateRequest, TokenizeRequest};

use super::generate::{GenerateArgs, GenerateJson};

pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

pub fn endpoint(router: &str) -> String {
    if router.contains("://") {
        router.to_string()
    } else {
        format!("http://{router}")
    }
}

/// Where the CA and client certificate for TLS routers are (set once from the global flags).
static TLS: std::sync::OnceLock<RouterTls> = std::sync::OnceLock::new();

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

pub fn generate(router: &str, args: GenerateArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let mut client = channel(router)
            .await
            .map(InferenceClient::new)
            .with_context(|| format!("connecting to {router}"))?;
        let input_ids = match (&args.prompt, &args.input_ids) {
            (Some(text), _) => {
                client
                    .tokenize(with_key(TokenizeRequest { text: text.clone() }))
                    .await
                    .map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?
                    .into_inner()
                    .input_ids
            }
            (None, Some(ids)) => ids.clone(),
            (None, None) => bail!("give --prompt or --input-ids"),
        };
        let request = GenerateRequest {
            top_logprobs: None,
            prompt: None,
            input_ids: input_ids.clone(),
            max_new_tokens: args.max_new_tokens as u32,
            temperature: Some(args.temperature),
            top_p: Some(args.top_p),
            top_k: args.top_k.map(|k| k as u32),
            seed: args.seed,
            stop: args.stop.clone(),
            ignore_eos: args.ignore_eos,
            logprobs: true,
        };
        let mut stream = client
            .generate(with_key(request))
            .await
            .map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?
            .into_inner();
        let (mut ids, mut logprobs, mut text, mut finish) =
            (Vec::new(), Vec::new(), String::new(), None);
        while let Some(msg) = stream
            .message()
            .await
            .map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?
        {
            ids.extend_from_slice(&msg.token_ids);
            logprobs.extend_from_slice(&msg.logprobs);
            text.push_str(&msg.text);
            if !msg.finish_reason.is_empty() {
                finish = Some(if msg.finish_reason == "stop" {
                    FinishReason::Stop
                } else {
                    FinishReason::Length
                });
            }
        }
        let Some(finish_reason) = finish else {
            bail!("the stream ended without a finish reason")
        };
        if args.json {
            let json = GenerateJson {
                input_ids: &input_ids,
                output_ids: &ids,
                logprobs: &logprobs,
                text,
                finish_reason,
                step_logits: None,
            };
            println!("{}", serde_json::to_string(&json)?);
        } else {
            println!("{text}");
        }
        Ok(())
    })
}
