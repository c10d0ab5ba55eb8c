//! Compiles the CUDA kernels' own source for the host, with the emulated thread model around
//! them (src/prelude.h, src/runtime.cpp), and lists its kernels for the launcher.

use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let gpu_dir = manifest.join("../model/src/gpu");
    let source = gpu_dir.join("kernels.cu");
    let text = std::fs::read_to_string(&source).expect("model/src/gpu/kernels.cu is readable");
    // Every `extern "C" __global__ void name(`: the entry points NVRTC would export.
    let tests = std::fs::read_to_string(manifest.join("src/test_kernels.cu"))
        .expect("src/test_kernels.cu is readable");
    let mut table = String::new();
    for piece in [text.as_str(), tests.as_str()]
        .iter()
        .flat_map(|t| t.split("extern \"C\" __global__ void ").skip(1))
    {
        // The name is the last word before the parameters (a launch-bounds macro may come
        // first).
        let head = piece.split('(').next().unwrap_or_default();
        let name: String = head
            .split_whitespace()
            .last()
            .unwrap_or_default()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        table.push_str(&format!("KERNEL({name})\n"));
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets it"));
    std::fs::write(out.join("kernel_table.inc"), table).expect("OUT_DIR is writable");
    let mut build = cc::Build::new();
    // Without FMA instructions nothing is contracted: the kernels then round as written.
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("fma") {
        build.flag("-mfma");
    } else {
        println!("cargo:warning=no FMA on this CPU: the emulated kernels fuse no multiply-add");
    }
    build
        .cpp(true)
        .std("c++17")
        .file(manifest.join("src/runtime.cpp"))
        .include(&gpu_dir)
        .include(manifest.join("src"))
        .include(&out)
        // NVRTC contracts a plain `a * b + c` into one fused multiply-add (its default
        // --fmad=true), so the host compile does too (a kernel whose results a test takes as
        // bitwise must spell its roundings out, as the exact and race kernels do); the `_rn`
        // intrinsics are never fused (prelude.h).
        .flag("-ffp-contract=fast")
        .flag("-fno-fast-math")
        // Every load and store checked for its type's alignment, as the device faults on one
        // that is not aligned; runtime.cpp handles the check's calls (no sanitizer runtime).
        .flag("-fsanitize=alignment")
        .warnings(false)
        .opt_level(2)
        .compile("moe_cuda_kernels");
    println!("cargo:rerun-if-changed={}", source.display());
    println!("cargo:rerun-if-changed=src/runtime.cpp");
    println!("cargo:rerun-if-changed=src/prelude.h");
    println!("cargo:rerun-if-changed=src/test_kernels.cu");
}
