//! `otlp-sink [ADDR]`: an OTLP/gRPC trace receiver that only counts spans, for measuring what
//! exporting traces costs (bench/tracing_cost.sh). Prints its address, then the span count
//! every 5 s.

use std::time::Duration;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let (addr, sink) = moe_tests::otlp::start_receiver().await?;
    println!("otlp-sink listening on {addr}");
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        eprintln!("otlp-sink: {} spans received", sink.count());
    }
}
