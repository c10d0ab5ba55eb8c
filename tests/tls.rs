//! TLS everywhere, with certificates from `ops/tls/make-test-certs.sh`: etcd over TLS with
//! client certificates and password authentication, mutual TLS on the data plane, TLS on the
//! router's public gRPC and HTTP ports. The cluster answers exactly as offline; plaintext,
//! certificate-less and foreign-CA clients are refused where they must be.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use moe_cluster::discovery::{Discovery, EtcdConnection};
use moe_model::Engine;
use moe_proto::v1::admin_client::AdminClient;
use moe_proto::v1::expert_data_client::ExpertDataClient;
use moe_proto::v1::inference_client::InferenceClient;
use moe_proto::v1::{ClusterStatusRequest, ClusterStatusResponse, DispatchBatch};
use moe_tests::harness;
use moe_tests::{fixture_dir, golden_cases, FIXTURES};
use moe_tooling::{greedy, EtcdServerTls, LocalCluster, LocalEtcd};
use serde_json::Value;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

const ETCD_PASSWORD: &str = "s3cret-for-tests";

fn make_pki(dir: &Path) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../ops/tls/make-test-certs.sh");
    let out = Command::new("bash")
        .arg(script)
        .arg(dir)
        .output()
        .expect("bash runs");
    assert!(
        out.status.success(),
        "make-test-certs.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn pem(path: PathBuf) -> Vec<u8> {
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A TLS client config trusting `ca`, presenting `identity` (`(cert, key)` files) if given.
fn client_tls(ca: &Path, identity: Option<(&Path, &Path)>) -> ClientTlsConfig {
    let config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem(ca.into())));
    match identity {
        Some((cert, key)) => config.identity(Identity::from_pem(pem(cert.into()), pem(key.into()))),
        None => config,
    }
}

async fn connect(uri: String, tls: Option<ClientTlsConfig>) -> Result<Channel, String> {
    let mut endpoint = Endpoint::from_shared(uri).map_err(|e| e.to_string())?;
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls).map_err(|e| e.to_string())?;
    }
    tokio::time::timeout(Duration::from_secs(10), endpoint.connect())
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| format!("{e:?}"))
}

/// Creates the root user and turns authentication on, over TLS with a member certificate.
async fn enable_etcd_auth(url: &str, pki: &Path) {
    let tls = client_tls(
        &pki.join("cluster-ca.pem"),
        Some((&pki.join("member.pem"), &pki.join("member.key"))),
    );
    let member = EtcdConnection::new(vec![url.to_string()], Some(tls), None);
    member
        .enable_auth(ETCD_PASSWORD)
        .await
        .expect("etcd over TLS with a member certificate");
    // Authentication is really on: without the password the same certificate cannot write.
    let anonymous = Discovery::etcd(member, "probe");
    assert!(
        anonymous.request_drain("probe").await.is_err(),
        "etcd accepted a write without credentials"
    );
}

async fn wait_serving_tls(channel: &Channel, nodes: usize) -> ClusterStatusResponse {
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut admin = AdminClient::new(channel.clone());
    loop {
        if let Ok(s) = admin.cluster_status(ClusterStatusRequest {}).await {
            let s = s.into_inner();
            if harness::serving_nodes(&s).len() == nodes {
                return s;
            }
            assert!(Instant::now() < deadline, "not serving in time: {s:?}");
        }
        assert!(Instant::now() < deadline, "router unreachable over TLS");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_everywhere_and_refusals() {
    let dir = std::env::temp_dir().join(format!("moe-tls-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (pki, rogue) = (dir.join("pki"), dir.join("rogue"));
    make_pki(&pki);
    make_pki(&rogue);
    let file = |name: &str| pki.join(name).display().to_string();
    let password_file = dir.join("etcd-password");
    std::fs::write(&password_file, format!("{ETCD_PASSWORD}\n")).unwrap();

    // etcd over TLS, client certificates required, then password authentication on.
    let etcd = LocalEtcd::start_with(
        &harness::etcd_binary(),
        Some(&EtcdServerTls {
            cert: pki.join("etcd.pem"),
            key: pki.join("etcd.key"),
            client_ca: pki.join("cluster-ca.pem"),
        }),
    )
    .unwrap();
    assert!(etcd.url().starts_with("https://"));
    enable_etcd_auth(&etcd.url(), &pki).await;

    let fixture = FIXTURES[0];
    let model = fixture_dir(fixture);
    let shared: Vec<String> = [
        "--etcd-ca",
        &file("cluster-ca.pem"),
        "--etcd-cert",
        &file("member.pem"),
        "--etcd-key",
        &file("member.key"),
        "--etcd-user",
        "root",
        "--etcd-password-file",
        &password_file.display().to_string(),
        "--cluster-ca",
        &file("cluster-ca.pem"),
        "--cluster-cert",
        &file("member.pem"),
        "--cluster-key",
        &file("member.key"),
    ]
    .map(String::from)
    .to_vec();
    let mut spec = harness::spec(model.clone(), 2);
    spec.node_args.extend(shared.iter().cloned());
    spec.router_args.extend(shared);
    spec.router_args.extend(
        [
            "--tls-cert",
            &file("public.pem"),
            "--tls-key",
            &file("public.key"),
            "--http-listen",
            "127.0.0.1:0",
            "--served-model-name",
            "tiny-ds",
        ]
        .map(String::from),
    );
    let mut cluster = LocalCluster::start_on(spec, etcd).unwrap();
    let router = cluster.router_addr.clone();
    let public_ca = pki.join("public-ca.pem");
    let channel = connect(
        format!("https://{router}"),
        Some(client_tls(&public_ca, None)),
    )
    .await
    .expect("TLS gRPC to the router");
    let status = wait_serving_tls(&channel, 2).await;

    // 1. Over TLS end to end (etcd, data plane, public port), the offline engine's tokens.
    let engine = Engine::load(&model).unwrap();
    let case = &golden_cases(fixture)[0];
    let expected = harness::expected_answers(&engine, &[(case.input_ids.clone(), 8)]);
    let mut inference = InferenceClient::new(channel.clone());
    let got = harness::generate(&mut inference, greedy(&case.input_ids, 8))
        .await
        .expect("generate over TLS");
    assert_eq!(got.ids, expected[0].output_ids);

    // 1b. A gateway reaches the TLS routers with their CA (and etcd as the members do), and
    //     serves TLS itself: the same tokens through it.
    let gateway_args: Vec<String> = [
        "--etcd-ca",
        &file("cluster-ca.pem"),
        "--etcd-cert",
        &file("member.pem"),
        "--etcd-key",
        &file("member.key"),
        "--etcd-user",
        "root",
        "--etcd-password-file",
        &password_file.display().to_string(),
        "--router-tls-ca",
        &file("public-ca.pem"),
        "--tls-cert",
        &file("public.pem"),
        "--tls-key",
        &file("public.key"),
    ]
    .map(String::from)
    .to_vec();
    let gateway = cluster
        .add_gateway(&harness::binary("moe-gateway"), &gateway_args)
        .expect("gateway starts")
        .grpc;
    let through = connect(
        format!("https://{gateway}"),
        Some(client_tls(&public_ca, None)),
    )
    .await
    .expect("TLS gRPC to the gateway");
    let mut inference_via_gateway = InferenceClient::new(through);
    let deadline = Instant::now() + Duration::from_secs(60);
    let via = loop {
        match harness::generate(&mut inference_via_gateway, greedy(&case.input_ids, 8)).await {
            Ok(got) => break got,
            // Until the gateway has read the router from etcd.
            Err(e) if Instant::now() < deadline && e.code() == tonic::Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => panic!("generate through the TLS gateway: {e}"),
        }
    };
    assert_eq!(via.ids, expected[0].output_ids);

    // 2. The public gRPC port refuses plaintext.
    let plaintext = match connect(format!("http://{router}"), None).await {
        Ok(channel) => InferenceClient::new(channel)
            .generate(greedy(&case.input_ids, 2))
            .await
            .map(|_| ())
            .map_err(|s| s.to_string()),
        Err(e) => Err(e),
    };
    assert!(plaintext.is_err(), "plaintext gRPC was served");

    // 3. The HTTP port refuses plaintext HTTP: no HTTP answer comes back.
    let http = cluster.router_http_addr.clone().expect("HTTP address");
    let (code, _) = harness::http(&http, "GET", "/v1/models", None, b"").await;
    assert_eq!(code, 0, "plaintext HTTP got an HTTP answer");

    // 4. The official openai client over HTTPS trusting the test CA gets the same text; one
    //    that does not trust it is refused.
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/openai_tls.py");
    let args = [
        script.to_string(),
        http.clone(),
        "tiny-ds".into(),
        public_ca.display().to_string(),
        case.prompt.clone(),
        "8".into(),
    ];
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .args(&args)
            .output()
            .expect("python3 runs")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "openai over HTTPS failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["models"][0], "tiny-ds");
    let tokenizer = moe_model::tokenizer::Tokenizer::from_dir(&model).unwrap();
    assert_eq!(
        answer["text"].as_str().unwrap(),
        tokenizer.decode(&expected[0].output_ids).unwrap()
    );
    assert_eq!(answer["untrusted_refused"], true, "{answer}");

    // 5. A node's data plane: only holders of a cluster-CA certificate get in.
    let node = status
        .nodes
        .iter()
        .find(|n| !n.experts.is_empty())
        .expect("a serving node");
    let node_uri = format!("https://{}", node.address);
    let cluster_ca = pki.join("cluster-ca.pem");
    let refused = |what: &'static str, result: Result<(), String>| match result {
        Ok(()) => panic!("node accepted a dispatch stream {what}"),
        Err(e) => eprintln!("dispatch stream {what}: refused: {e}"),
    };
    refused(
        "in plaintext",
        exchange(format!("http://{}", node.address), None).await,
    );
    refused(
        "without a client certificate",
        exchange(node_uri.clone(), Some(client_tls(&cluster_ca, None))).await,
    );
    refused(
        "with a certificate from another CA",
        exchange(
            node_uri.clone(),
            Some(client_tls(
                &cluster_ca,
                Some((&rogue.join("member.pem"), &rogue.join("member.key"))),
            )),
        )
        .await,
    );
    refused(
        "with the router's public certificate",
        exchange(
            node_uri.clone(),
            Some(client_tls(
                &cluster_ca,
                Some((&pki.join("public.pem"), &pki.join("public.key"))),
            )),
        )
        .await,
    );
    let member_tls = || {
        Some(client_tls(
            &cluster_ca,
            Some((&pki.join("member.pem"), &pki.join("member.key"))),
        ))
    };
    // The certificate gets past TLS; the stream still needs the cluster token's proof.
    let without_token = exchange(node_uri.clone(), member_tls()).await.unwrap_err();
    assert!(without_token.contains("Unauthenticated"), "{without_token}");
    let token = cluster.token_file().token().unwrap();
    exchange_with(node_uri, member_tls(), Some((&token, &node.node_id)))
        .await
        .expect("a cluster member's dispatch stream is accepted");

    // 6. `moe generate --router https://... --tls-ca` (the CLI over TLS).
    let moe = harness::binary("moe");
    let ids: Vec<String> = case.input_ids.iter().map(|i| i.to_string()).collect();
    let out = Command::new(moe)
        .args(["generate", "--router", &format!("https://{router}")])
        .args(["--tls-ca", &public_ca.display().to_string()])
        .args([
            "--input-ids",
            &ids.join(","),
            "--max-new-tokens",
            "8",
            "--ignore-eos",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "moe generate over TLS: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap();
    let cli_ids: Vec<u32> = json["output_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(cli_ids, expected[0].output_ids);

    // 7. A second router requiring client certificates on its public port (--tls-client-ca).
    let strict = cluster
        .add_router(&["--tls-client-ca".into(), public_ca.display().to_string()])
        .unwrap();
    let anonymous = match connect(
        format!("https://{strict}"),
        Some(client_tls(&public_ca, None)),
    )
    .await
    {
        Ok(channel) => InferenceClient::new(channel)
            .generate(greedy(&case.input_ids, 2))
            .await
            .map(|_| ()),
        Err(e) => Err(tonic::Status::unavailable(e)),
    };
    assert!(anonymous.is_err(), "client without a certificate served");
    let with_cert = connect(
        format!("https://{strict}"),
        Some(client_tls(
            &public_ca,
            Some((&pki.join("client.pem"), &pki.join("client.key"))),
        )),
    )
    .await
    .expect("client with a certificate connects");
    wait_serving_tls(&with_cert, 2).await;
    let got = harness::generate(
        &mut InferenceClient::new(with_cert),
        greedy(&case.input_ids, 8),
    )
    .await
    .expect("generate with a client certificate");
    assert_eq!(got.ids, expected[0].output_ids);

    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Opens an `Exchange` stream to a node and sends one empty dispatch. `Ok` only when the
/// node's own handler answered: it refuses an empty frame with INVALID_ARGUMENT, which proves
/// the connection was let in; any transport or handshake failure is `Err`.
/// Opens a data-plane stream (proving `token` for `node_id` when given) and sends an empty
/// dispatch: `Ok` when it reached the handler (which refuses the empty frame), else why not.
async fn exchange(uri: String, tls: Option<ClientTlsConfig>) -> Result<(), String> {
    exchange_with(uri, tls, None).await
}

async fn exchange_with(
    uri: String,
    tls: Option<ClientTlsConfig>,
    token: Option<(&moe_cluster::auth::ClusterToken, &str)>,
) -> Result<(), String> {
    let channel = connect(uri, tls).await?;
    let mut client = ExpertDataClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(DispatchBatch::default())
        .await
        .map_err(|e| e.to_string())?;
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    if let Some((token, node_id)) = token {
        moe_cluster::auth::StreamOpening::new(token, node_id).apply(request.metadata_mut());
    }
    let answer = tokio::time::timeout(Duration::from_secs(10), async move {
        let mut stream = client.exchange(request).await?.into_inner();
        stream.message().await
    })
    .await
    .map_err(|_| "exchange timed out".to_string())?;
    match answer {
        Err(status) if status.code() == tonic::Code::InvalidArgument => Ok(()),
        other => Err(format!("{other:?}")),
    }
}
