//! Where the tools find what they run: the bundled fixtures, and programs on `PATH`.

use std::path::{Path, PathBuf};

/// `tests/fixtures/<name>` of this repository; `MOE_FIXTURES_DIR` points elsewhere (a test
/// binary built on one machine and run on another, as `ops/gpu-check.sh` does).
pub fn fixture_dir(name: &str) -> PathBuf {
    match std::env::var_os("MOE_FIXTURES_DIR") {
        Some(dir) => PathBuf::from(dir),
        // This crate's folder sits beside `tests/` in the workspace.
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .with_file_name("tests")
            .join("fixtures"),
    }
    .join(name)
}

/// The program `name` in the first `PATH` directory that has it (etcd, for a local cluster).
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|p| p.join(name))
        .find(|p| p.exists())
}
