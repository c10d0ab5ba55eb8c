//! The cluster token a local cluster's members share (`--cluster-token-file`), as a
//! deployment's would.

use std::path::{Path, PathBuf};

use moe_cluster::auth::{self, ClusterToken, TokenError};

/// A cluster token written to a private file, removed when dropped.
#[derive(Debug)]
pub struct ClusterTokenFile {
    /// The directory only this user can read, made for the file (removed with it).
    dir: PathBuf,
    /// The token file inside it.
    path: PathBuf,
}

impl ClusterTokenFile {
    /// A new random token in a fresh directory only this user can read.
    pub fn generate() -> std::io::Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "moe-cluster-token-{}-{}",
            std::process::id(),
            auth::hex(&auth::random_bytes::<6>())
        ));
        std::fs::create_dir_all(&dir)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        }
        let path = dir.join("cluster-token");
        std::fs::write(&path, format!("{}\n", auth::generate_token()))?;
        Ok(Self { dir, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The token as the members read it.
    pub fn token(&self) -> Result<ClusterToken, TokenError> {
        ClusterToken::from_file(&self.path)
    }
}

impl Drop for ClusterTokenFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
