//! Compiles `moe/v1/*.proto` with tonic and writes the file descriptor set that server
//! reflection serves.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = [
        "moe/v1/inference.proto",
        "moe/v1/admin.proto",
        "moe/v1/expert.proto",
        "moe/v1/gateway.proto",
    ];
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("moe_descriptor.bin"))
        // Tensor payloads stay as reference-counted bytes: no copy when decoding.
        .bytes(".moe.v1.DispatchBatch")
        .bytes(".moe.v1.CombineBatch")
        .compile_protos(&protos, &["."])?;
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}
