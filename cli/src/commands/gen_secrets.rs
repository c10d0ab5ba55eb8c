//! `moe gen-secrets --out DIR`: the secrets a deployment mounts, each a random 256-bit hex
//! string in its own file readable only by its owner: `cluster-token` (every router and node:
//! `--cluster-token-file`), `admin-key` (routers: `--admin-key-file`; operators:
//! `MOE_ADMIN_KEY`), `api-key` (routers: `--api-key-file`; clients: `Authorization: Bearer`)
//! and `etcd-password` (the etcd user the cluster's processes log in as). Files that exist are
//! kept, so it can run at every start of a compose project.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;

/// The files written, in order.
pub const SECRETS: [&str; 4] = ["cluster-token", "admin-key", "api-key", "etcd-password"];

#[derive(Args)]
pub struct GenSecretsArgs {
    /// Directory to write the secrets into (created if missing).
    #[arg(long)]
    out: PathBuf,
}

pub fn run(args: GenSecretsArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    for name in SECRETS {
        let path = args.out.join(name);
        if path.exists() {
            println!("{} kept", path.display());
            continue;
        }
        write_private(&path, &format!("{}\n", moe_cluster::auth::generate_token()))
            .with_context(|| format!("writing {}", path.display()))?;
        println!("{} written", path.display());
    }
    Ok(())
}

/// Writes `text` to a new file that only its owner can read.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path)?.write_all(text.as_bytes())
}
