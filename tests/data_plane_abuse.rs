//! A hostile or broken peer on a running expert node's gRPC data plane: each abuse is answered
//! with its typed code (within 30 s, so a hang fails instead of blocking CI), counted in the
//! node's metrics, and costs nothing else: requests running through the router meanwhile keep
//! producing the offline engine's tokens and log-probabilities, bit for bit. docs/security.md
//! lists the same cases.

use std::sync::Arc;
use std::time::Duration;

use moe_cluster::auth::{ClusterToken, StreamOpening};
use moe_cluster::discovery::{Discovery, EtcdConnection};
use moe_cluster::frames::{encode_dispatch, DispatchTag};
use moe_model::routes::ExpertRoutes;
use moe_model::{Engine, ModelConfig};
use moe_proto::v1::expert_data_client::ExpertDataClient;
use moe_proto::v1::{CombineBatch, DispatchBatch, Refusal};
use moe_tests::harness::{self, expected_answers, wait_serving};
use moe_tests::{fixture_dir, golden_cases, FIXTURES};
use moe_tooling::{free_port, greedy, GreedyLoad, LocalCluster};
use tonic::Code;

/// Longest any one abuse may take to be answered.
const WAIT: Duration = Duration::from_secs(30);

/// Opens a stream to `node_id` at `address` (proving `token` when given, or replaying
/// `opening`), sends `batches` and reads one answer per batch: the answers, or the status the
/// stream ended with.
async fn exchange(
    address: &str,
    node_id: &str,
    token: Option<&ClusterToken>,
    opening: Option<&StreamOpening>,
    batches: Vec<DispatchBatch>,
) -> Result<Vec<CombineBatch>, tonic::Status> {
    let run = async {
        let channel = tonic::transport::Channel::from_shared(format!("http://{address}"))
            .expect("uri")
            .connect()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let mut client = ExpertDataClient::new(channel)
            .max_encoding_message_size(64 << 20)
            .max_decoding_message_size(64 << 20);
        let (tx, rx) = tokio::sync::mpsc::channel(batches.len().max(1));
        let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        let fresh = token.map(|t| StreamOpening::new(t, node_id));
        if let Some(o) = opening.or(fresh.as_ref()) {
            o.apply(request.metadata_mut());
        }
        let count = batches.len();
        for b in batches {
            tx.send(b).await.expect("queued");
        }
        let mut inbound = client.exchange(request).await?.into_inner();
        let mut answers = Vec::new();
        while answers.len() < count {
            match inbound.message().await? {
                Some(a) => answers.push(a),
                None => return Err(tonic::Status::internal("stream ended without answers")),
            }
        }
        Ok(answers)
    };
    tokio::time::timeout(WAIT, run)
        .await
        .unwrap_or_else(|_| panic!("no answer from {node_id} within {WAIT:?}"))
}

/// Rows as given (the pairs of each row in the order listed, unsorted, unchecked).
fn batch(epoch: u64, layer: u32, hidden: usize, rows: &[Vec<(u32, f32)>]) -> DispatchBatch {
    let routes = ExpertRoutes::from_rows_as_given(rows);
    let values: Vec<f32> = (0..rows.len() * hidden)
        .map(|i| (i % 7) as f32 / 7.0)
        .collect();
    let tag = DispatchTag {
        epoch,
        step: 1,
        layer,
        micro_batch: 0,
    };
    encode_dispatch(tag, hidden, &values, &routes)
}

/// The value of `name{reason="..."}` (or of `name` alone) in a Prometheus text page.
fn counter(page: &str, name: &str, reason: Option<&str>) -> u64 {
    let key = match reason {
        Some(r) => format!("{name}{{reason=\"{r}\"}} "),
        None => format!("{name} "),
    };
    page.lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{key:?} missing from the node's metrics"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_abuse_is_refused_with_its_code_while_requests_keep_their_tokens() {
    let fixture = FIXTURES[0];
    let dir = fixture_dir(fixture);
    let config = ModelConfig::from_dir(&dir).unwrap();
    let hidden = config.hidden_size;
    let top_k = config.moe.top_k as u32;
    let moe_layer = config.moe_layer_indices().next().unwrap() as u32;
    let dense_layer = (0..config.num_layers)
        .find(|&l| !config.is_moe_layer(l))
        .expect("deepseek-v3-tiny has a dense first layer") as u32;

    let mut spec = harness::spec(dir.clone(), 1);
    // No load rebalancing: the test checks that the epoch stays the same.
    spec.router_args
        .extend(["--rebalance-threshold".into(), "0".into()]);
    let mut cluster = LocalCluster::start(spec).unwrap();
    let metrics_addr = format!("127.0.0.1:{}", free_port().unwrap());
    let victim = cluster
        .add_node_with(&["--metrics-listen".into(), metrics_addr.clone()])
        .unwrap();
    let status = wait_serving(&cluster, 2).await;
    let epoch = status.serving_epoch;
    let node = status
        .nodes
        .iter()
        .find(|n| n.node_id == victim)
        .expect("the victim is placed");
    let address = node.address.clone();
    let held: Vec<u32> = node
        .experts
        .iter()
        .filter(|e| e.layer == moe_layer)
        .map(|e| e.expert)
        .collect();
    let not_held = (0..config.moe.num_experts as u32)
        .find(|e| !held.contains(e))
        .expect("two nodes split the experts");
    assert!(held.len() > top_k as usize, "{held:?}");
    let token = cluster.token_file().token().unwrap();

    // Requests stream through the router the whole time.
    let engine = Engine::load(&dir).unwrap();
    let prompts: Vec<(Vec<u32>, u32)> = golden_cases(fixture)
        .iter()
        .map(|c| (c.input_ids.clone(), 24))
        .collect();
    let answers = Arc::new(expected_answers(&engine, &prompts));
    let load = GreedyLoad::start(vec![cluster.router_addr.clone()], answers, 3, None);
    let started = std::time::Instant::now();
    while load
        .progress
        .tokens
        .load(std::sync::atomic::Ordering::Relaxed)
        < 8
    {
        assert!(started.elapsed() < WAIT, "the load did not start");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // A well-formed batch is answered, and one for an epoch the node does not serve is
    // refused in-band with the typed code, naming nothing else.
    let one = |e: u32| vec![(e, 0.5f32)];
    let good = exchange(
        &address,
        &victim,
        Some(&token),
        None,
        vec![batch(epoch, moe_layer, hidden, &[one(held[0])])],
    )
    .await
    .expect("a valid batch is served");
    assert_eq!(good[0].pairs, 1);
    assert_eq!(good[0].outputs.len(), hidden * 4);
    let stale = exchange(
        &address,
        &victim,
        Some(&token),
        None,
        vec![batch(epoch + 1000, moe_layer, hidden, &[one(held[0])])],
    )
    .await
    .expect("a stale epoch is refused in-band");
    assert_eq!(stale[0].refusal, Refusal::StaleEpoch as i32);
    // It names the batch's epoch only, not the ones the node serves.
    assert_eq!(
        stale[0].error,
        format!(
            "FAILED_PRECONDITION: epoch {} is not served here",
            epoch + 1000
        )
    );

    // (what, batch, expected code, metric reason)
    let top_k_plus_one: Vec<(u32, f32)> =
        held[..=top_k as usize].iter().map(|&e| (e, 0.1)).collect();
    let mut truncated = batch(epoch, moe_layer, hidden, &[one(held[0])]);
    truncated.hidden_states = truncated.hidden_states.slice(..hidden * 4 - 3);
    let mut short_routes = batch(
        epoch,
        moe_layer,
        hidden,
        &[vec![(held[0], 0.5), (held[1], 0.5)]],
    );
    short_routes.pair_weights = short_routes.pair_weights.slice(..4);
    let mut huge_row = batch(epoch, moe_layer, hidden, &[one(held[0])]);
    let million = 1_000_000u32;
    huge_row.pair_offsets = [0u32, million]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect::<Vec<u8>>()
        .into();
    huge_row.pair_experts = vec![0u8; million as usize * 4].into();
    huge_row.pair_weights = vec![0u8; million as usize * 4].into();
    let mut long_row = huge_row.clone();
    let many = 4_000u32;
    long_row.pair_offsets = [0u32, many]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect::<Vec<u8>>()
        .into();
    long_row.pair_experts = vec![0u8; many as usize * 4].into();
    long_row.pair_weights = vec![0u8; many as usize * 4].into();
    let over_bound: Vec<Vec<(u32, f32)>> = (0..513).map(|_| one(held[0])).collect();
    let cases: Vec<(&str, DispatchBatch, Code, Option<&str>)> = vec![
        (
            "more pairs than top-k in a row",
            batch(epoch, moe_layer, hidden, &[top_k_plus_one]),
            Code::InvalidArgument,
            Some("pairs"),
        ),
        (
            "a duplicated expert",
            batch(
                epoch,
                moe_layer,
                hidden,
                &[vec![(held[0], 0.5), (held[0], 0.5)]],
            ),
            Code::InvalidArgument,
            Some("duplicate_expert"),
        ),
        (
            "an expert not held here",
            batch(epoch, moe_layer, hidden, &[one(not_held)]),
            Code::InvalidArgument,
            Some("expert_not_held"),
        ),
        (
            "a dense layer",
            batch(epoch, dense_layer, hidden, &[one(held[0])]),
            Code::InvalidArgument,
            Some("layer"),
        ),
        (
            "a NaN weight",
            batch(epoch, moe_layer, hidden, &[vec![(held[0], f32::NAN)]]),
            Code::InvalidArgument,
            Some("weight"),
        ),
        (
            "one row with 4,000 pairs",
            long_row,
            Code::InvalidArgument,
            Some("pairs"),
        ),
        (
            "rows over the node's bound (512)",
            batch(epoch, moe_layer, hidden, &over_bound),
            Code::InvalidArgument,
            Some("rows"),
        ),
        (
            "truncated hidden states",
            truncated,
            Code::InvalidArgument,
            Some("length"),
        ),
        (
            "truncated weights",
            short_routes,
            Code::InvalidArgument,
            Some("length"),
        ),
        // Past the message limit derived from the batch bound: refused by the transport
        // before the message is read, let alone decoded.
        (
            "one row with a million pairs",
            huge_row,
            Code::OutOfRange,
            Some("message_size"),
        ),
    ];
    let before = harness::http(&metrics_addr, "GET", "/metrics", None, b"")
        .await
        .1;
    for (what, b, code, _) in &cases {
        let err = exchange(&address, &victim, Some(&token), None, vec![b.clone()])
            .await
            .expect_err(what);
        assert_eq!(err.code(), *code, "{what}: {err:?}");
    }

    // Streams without the cluster credential: none, a forged one, a replayed one.
    let valid = || vec![batch(epoch, moe_layer, hidden, &[one(held[0])])];
    let err = exchange(&address, &victim, None, None, valid())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "no token: {err:?}");
    let forged = ClusterToken::from_secret(b"not the cluster's token at all");
    let err = exchange(&address, &victim, Some(&forged), None, valid())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "forged: {err:?}");
    let opening = StreamOpening::new(&token, &victim);
    exchange(&address, &victim, None, Some(&opening), valid())
        .await
        .expect("first use of an opening");
    let err = exchange(&address, &victim, None, Some(&opening), valid())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "replayed: {err:?}");
    let other = StreamOpening::new(&token, "node-0");
    let err = exchange(&address, &victim, None, Some(&other), valid())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "another node's: {err:?}");

    // Each refusal was counted under its reason.
    let after = harness::http(&metrics_addr, "GET", "/metrics", None, b"")
        .await
        .1;
    let name = "moe_node_invalid_frames_total";
    let reasons = [
        "pairs",
        "duplicate_expert",
        "expert_not_held",
        "layer",
        "weight",
        "rows",
        "length",
        "message_size",
    ];
    for reason in reasons {
        let expected = cases.iter().filter(|c| c.3 == Some(reason)).count() as u64;
        assert_eq!(
            counter(&after, name, Some(reason)) - counter(&before, name, Some(reason)),
            expected,
            "{reason}"
        );
    }
    assert!(
        counter(&after, "moe_node_unauthenticated_total", None)
            >= counter(&before, "moe_node_unauthenticated_total", None) + 4
    );

    // The node still serves, and nothing running through the router noticed.
    exchange(&address, &victim, Some(&token), None, valid())
        .await
        .expect("the node keeps serving");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let report = tokio::time::timeout(Duration::from_secs(120), load.stop())
        .await
        .expect("the load finishes");
    assert!(report.completed > 0, "{report:?}");
    assert_eq!(report.failed, 0, "{:?}", report.problems);
    assert_eq!(report.mismatched, 0, "{:?}", report.problems);
    let now = harness::status(&cluster).await;
    assert_eq!(now.serving_epoch, epoch, "no abuse made the router re-plan");
    drop(cluster);
}

/// Resident memory of a process, in bytes (Linux).
fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// Plays a rank 0 of the TCP collective that the running node joins (a record in etcd under
/// `key`, naming the node), and returns the node's socket once its handshake is done. The
/// rogue's registration is given up then: held, it could win the planner election the next
/// time the real router's short lease lapses on a loaded machine, and nobody would plan.
async fn joined_by(
    cluster: &LocalCluster,
    rogue_id: &str,
    epoch: u64,
    node_id: &str,
    token: &ClusterToken,
) -> std::net::TcpStream {
    use moe_cluster::collective::tcp::{TcpLimits, TcpRoot, TcpSettings};
    use moe_cluster::collective::CollectiveRecord;
    let root = TcpRoot::bind(
        "127.0.0.1:0",
        None,
        2,
        TcpSettings {
            limits: TcpLimits::for_frames(1 << 20),
            token: Some(token.clone()),
        },
    )
    .unwrap();
    let record = CollectiveRecord::tcp(
        epoch,
        vec![node_id.to_string()],
        root.rendezvous(),
        Duration::from_secs(10),
    );
    // Whoever holds etcd's credentials can register as a router and publish a collective.
    let discovery = Discovery::etcd(
        EtcdConnection::plain(vec![cluster.etcd_url.clone()]),
        "test",
    );
    let rogue = discovery
        .register_router(rogue_id, "127.0.0.1:9", Duration::from_secs(10))
        .await
        .unwrap();
    rogue.set_collective(&record);
    let mut sockets = tokio::task::spawn_blocking(move || root.accept_sockets(WAIT))
        .await
        .unwrap()
        .expect("the node joins the published collective");
    rogue.shutdown().await;
    sockets[1].take().expect("rank 1 joined")
}

/// Waits until the node closes `socket` (reads return end of stream or an error); panics
/// after [`WAIT`].
fn closed_by_the_node(socket: &mut std::net::TcpStream) {
    use std::io::Read;
    socket.set_read_timeout(Some(WAIT)).expect("read timeout");
    let mut sink = [0u8; 4096];
    loop {
        match socket.read(&mut sink) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                panic!("the node did not cut the connection off within {WAIT:?}")
            }
            Err(_) => return,
        }
    }
}

/// A rank 0 of the TCP collective that announces a 2 GiB frame is cut off before any payload
/// is read or allocated (the node's memory does not grow by it); one that floods frames is cut
/// off too; the node keeps serving the router over gRPC with offline's tokens meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_collective_root_is_cut_off_while_the_node_keeps_serving() {
    use std::io::Write;

    let fixture = FIXTURES[0];
    let dir = fixture_dir(fixture);
    let mut cluster = LocalCluster::start(harness::spec(dir.clone(), 1)).unwrap();
    let metrics_addr = format!("127.0.0.1:{}", free_port().unwrap());
    let victim = cluster
        .add_node_with(&["--metrics-listen".into(), metrics_addr.clone()])
        .unwrap();
    let status = wait_serving(&cluster, 2).await;
    let epoch = status.serving_epoch;
    let token = cluster.token_file().token().unwrap();
    let pid = cluster.node_pid(&victim).unwrap();

    let engine = Engine::load(&dir).unwrap();
    let prompts: Vec<(Vec<u32>, u32)> = golden_cases(fixture)
        .iter()
        .map(|c| (c.input_ids.clone(), 24))
        .collect();
    let answers = Arc::new(expected_answers(&engine, &prompts));
    let load = GreedyLoad::start(vec![cluster.router_addr.clone()], answers, 2, None);
    let before = harness::http(&metrics_addr, "GET", "/metrics", None, b"")
        .await
        .1;

    // 1. A 2 GiB length prefix, and nothing after it.
    let rss_before = rss_bytes(pid);
    let mut socket = joined_by(&cluster, "rogue-a", epoch, &victim, &token).await;
    socket.write_all(&(2u64 << 30).to_le_bytes()).unwrap();
    tokio::task::block_in_place(|| closed_by_the_node(&mut socket));
    let grown = rss_bytes(pid).saturating_sub(rss_before);
    assert!(grown < 256 << 20, "the node grew by {grown} bytes");

    // 2. A flood of frames within the bound, as fast as the socket takes them.
    let mut socket = joined_by(&cluster, "rogue-b", epoch, &victim, &token).await;
    let flooder = std::thread::spawn(move || {
        let frame = vec![7u8; 64 << 10];
        socket
            .set_write_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut sent = 0u64;
        for _ in 0..10_000 {
            let ok = socket
                .write_all(&(frame.len() as u64).to_le_bytes())
                .and_then(|()| socket.write_all(&frame));
            if ok.is_err() {
                return (sent, socket);
            }
            sent += 1;
        }
        (sent, socket)
    });
    let (sent, mut socket) = tokio::task::spawn_blocking(move || flooder.join().unwrap())
        .await
        .unwrap();
    assert!(
        sent < 10_000,
        "the node took all {sent} frames instead of cutting the flood off"
    );
    tokio::task::block_in_place(|| closed_by_the_node(&mut socket));
    let grown = rss_bytes(pid).saturating_sub(rss_before);
    assert!(grown < 256 << 20, "the node grew by {grown} bytes");

    // The oversized frame was counted; the node serves on, and nothing running noticed.
    let after = harness::http(&metrics_addr, "GET", "/metrics", None, b"")
        .await
        .1;
    let name = "moe_node_invalid_frames_total";
    assert_eq!(
        counter(&after, name, Some("message_size")) - counter(&before, name, Some("message_size")),
        1
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let report = tokio::time::timeout(Duration::from_secs(120), load.stop())
        .await
        .expect("the load finishes");
    assert!(report.completed > 0, "{report:?}");
    assert_eq!(report.failed, 0, "{:?}", report.problems);
    assert_eq!(report.mismatched, 0, "{:?}", report.problems);
    assert!(cluster.node_ids().contains(&victim));
    let mut client = harness::inference(&cluster).await;
    let case = &golden_cases(fixture)[0];
    let got = harness::generate(&mut client, greedy(&case.input_ids, 4))
        .await
        .unwrap();
    assert_eq!(got.ids.len(), 4);
}
