//! TLS for every port the cluster opens, from PEM files named by flags.
//!
//! - [`PublicTlsArgs`]: the router's public gRPC and HTTP ports (server certificate; optionally
//!   client certificates required).
//! - [`ClusterTlsArgs`]: mutual TLS on the data plane. Routers and expert nodes each hold a
//!   certificate signed by the cluster CA; a node accepts only clients presenting one, so only
//!   cluster members can dispatch tokens to it, and a router talks only to genuine nodes.
//!
//! Files are read and checked once at start-up, so a missing file, a key that does not parse or
//! a certificate without its key is a clear error before any port opens. rustls with the `ring`
//! provider, the one tonic uses.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Args;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} holds no PEM private key")]
    NoKey { path: PathBuf },
    #[error("{given} needs {missing} as well")]
    Incomplete {
        given: &'static str,
        missing: &'static str,
    },
    #[error("TLS settings rejected: {0}")]
    Rejected(String),
}

/// A certificate chain and its private key, as PEM, checked to parse.
#[derive(Clone)]
pub struct PemIdentity {
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl std::fmt::Debug for PemIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PemIdentity { .. }")
    }
}

impl PemIdentity {
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let cert_pem = read(cert)?;
        certificates(&cert_pem, cert)?;
        let key_pem = read(key)?;
        PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| TlsError::NoKey {
            path: key.to_path_buf(),
        })?;
        Ok(Self {
            cert: cert_pem,
            key: key_pem,
        })
    }

    pub fn tonic(&self) -> Identity {
        Identity::from_pem(&self.cert, &self.key)
    }

    fn rustls(&self) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
        let certs = CertificateDer::pem_slice_iter(&self.cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Rejected(format!("certificate: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(&self.key)
            .map_err(|e| TlsError::Rejected(format!("private key: {e}")))?;
        Ok((certs, key))
    }
}

/// CA certificates (PEM), checked to hold at least one certificate.
#[derive(Clone, Debug)]
pub struct PemCa(Vec<u8>);

impl PemCa {
    pub fn load(path: &Path) -> Result<Self, TlsError> {
        let pem = read(path)?;
        certificates(&pem, path)?;
        Ok(Self(pem))
    }

    pub fn tonic(&self) -> Certificate {
        Certificate::from_pem(&self.0)
    }

    fn roots(&self) -> Result<rustls::RootCertStore, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&self.0) {
            let cert = cert.map_err(|e| TlsError::Rejected(format!("CA certificate: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| TlsError::Rejected(format!("CA certificate: {e}")))?;
        }
        Ok(roots)
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn certificates(pem: &[u8], path: &Path) -> Result<usize, TlsError> {
    let count = CertificateDer::pem_slice_iter(pem)
        .filter(|c| c.is_ok())
        .count();
    if count == 0 {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(count)
}

/// TLS on the router's public ports (gRPC Inference/Admin and the OpenAI HTTP API).
#[derive(Args, Debug, Clone, Default)]
pub struct PublicTlsArgs {
    /// Certificate chain (PEM) for the public gRPC and HTTP ports; with `--tls-key` it turns
    /// TLS on, and those ports then refuse plaintext.
    #[arg(long, env = "MOE_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of `--tls-cert`.
    #[arg(long, env = "MOE_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Require clients of the public ports to present a certificate signed by this CA (PEM).
    #[arg(long, env = "MOE_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
}

/// The loaded public TLS settings.
#[derive(Clone, Debug)]
pub struct PublicTls {
    identity: PemIdentity,
    client_ca: Option<PemCa>,
}

impl PublicTlsArgs {
    /// `None` when TLS is off.
    pub fn load(&self) -> Result<Option<PublicTls>, TlsError> {
        match (&self.tls_cert, &self.tls_key) {
            (None, None) if self.tls_client_ca.is_some() => Err(TlsError::Incomplete {
                given: "--tls-client-ca",
                missing: "--tls-cert and --tls-key",
            }),
            (None, None) => Ok(None),
            (Some(_), None) => Err(TlsError::Incomplete {
                given: "--tls-cert",
                missing: "--tls-key",
            }),
            (None, Some(_)) => Err(TlsError::Incomplete {
                given: "--tls-key",
                missing: "--tls-cert",
            }),
            (Some(cert), Some(key)) => Ok(Some(PublicTls {
                identity: PemIdentity::load(cert, key)?,
                client_ca: self.tls_client_ca.as_deref().map(PemCa::load).transpose()?,
            })),
        }
    }
}

impl PublicTls {
    /// For tonic's server.
    pub fn grpc(&self) -> ServerTlsConfig {
        let config = ServerTlsConfig::new().identity(self.identity.tonic());
        match &self.client_ca {
            Some(ca) => config.client_ca_root(ca.tonic()),
            None => config,
        }
    }

    /// For the HTTP server: HTTP/1.1 and HTTP/2 by ALPN.
    pub fn rustls(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        server_config(
            &self.identity,
            self.client_ca.as_ref(),
            &[b"h2", b"http/1.1"],
        )
    }

    /// For the public gRPC server (HTTP/2 only), terminated by [`crate::listener`], which
    /// bounds handshakes where tonic's own TLS does not.
    pub fn rustls_grpc(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        server_config(&self.identity, self.client_ca.as_ref(), &[b"h2"])
    }
}

/// Mutual TLS on the data plane between routers and expert nodes.
#[derive(Args, Debug, Clone, Default)]
pub struct ClusterTlsArgs {
    /// The cluster CA (PEM). With `--cluster-cert` and `--cluster-key`, the data plane runs
    /// over mutual TLS: nodes accept dispatches only from holders of a certificate this CA
    /// signed, and routers verify nodes the same way.
    #[arg(long, env = "MOE_CLUSTER_CA")]
    pub cluster_ca: Option<PathBuf>,
    /// This process's certificate (PEM), signed by the cluster CA, usable as server and client.
    #[arg(long, env = "MOE_CLUSTER_CERT")]
    pub cluster_cert: Option<PathBuf>,
    /// Private key (PEM) of `--cluster-cert`.
    #[arg(long, env = "MOE_CLUSTER_KEY")]
    pub cluster_key: Option<PathBuf>,
    /// Name to verify in the nodes' certificates instead of the host of their address (for
    /// certificates issued to one shared name).
    #[arg(long, env = "MOE_CLUSTER_TLS_NAME")]
    pub cluster_tls_name: Option<String>,
}

/// The loaded data-plane TLS settings.
#[derive(Clone, Debug)]
pub struct ClusterTls {
    ca: PemCa,
    identity: PemIdentity,
    server_name: Option<String>,
}

impl ClusterTlsArgs {
    /// `None` when the data plane is plaintext; all three files or none.
    pub fn load(&self) -> Result<Option<ClusterTls>, TlsError> {
        match (&self.cluster_ca, &self.cluster_cert, &self.cluster_key) {
            (None, None, None) => Ok(None),
            (Some(ca), Some(cert), Some(key)) => Ok(Some(ClusterTls {
                ca: PemCa::load(ca)?,
                identity: PemIdentity::load(cert, key)?,
                server_name: self.cluster_tls_name.clone(),
            })),
            (ca, cert, _) => Err(TlsError::Incomplete {
                given: if ca.is_some() {
                    "--cluster-ca"
                } else if cert.is_some() {
                    "--cluster-cert"
                } else {
                    "--cluster-key"
                },
                missing: "all of --cluster-ca, --cluster-cert and --cluster-key",
            }),
        }
    }
}

impl ClusterTls {
    /// The node's side: its own certificate, and a client certificate from the cluster CA
    /// required of every connection.
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity.tonic())
            .client_ca_root(self.ca.tonic())
    }

    /// The node's side for [`crate::listener`]: a client certificate from the cluster CA
    /// required of every connection, HTTP/2 only.
    pub fn server_rustls(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        server_config(&self.identity, Some(&self.ca), &[b"h2"])
    }

    /// The router's side: trusts only the cluster CA and presents its own certificate.
    pub fn client(&self) -> ClientTlsConfig {
        let config = ClientTlsConfig::new()
            .ca_certificate(self.ca.tonic())
            .identity(self.identity.tonic());
        match &self.server_name {
            Some(name) => config.domain_name(name.clone()),
            None => config,
        }
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server configuration offering the `alpn` protocols.
pub fn server_config(
    identity: &PemIdentity,
    client_ca: Option<&PemCa>,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let rejected = |e: rustls::Error| TlsError::Rejected(e.to_string());
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(rejected)?;
    let builder = match client_ca {
        Some(ca) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(ca.roots()?),
                provider(),
            )
            .build()
            .map_err(|e| TlsError::Rejected(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let (certs, key) = identity.rustls()?;
    let mut config = builder.with_single_cert(certs, key).map_err(rejected)?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// A certificate and key given by two flags: both or neither.
pub fn identity_from_flags(
    cert: Option<&Path>,
    key: Option<&Path>,
    flags: (&'static str, &'static str),
) -> Result<Option<PemIdentity>, TlsError> {
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some(PemIdentity::load(cert, key)?)),
        (None, None) => Ok(None),
        (Some(_), None) => Err(TlsError::Incomplete {
            given: flags.0,
            missing: flags.1,
        }),
        (None, Some(_)) => Err(TlsError::Incomplete {
            given: flags.1,
            missing: flags.0,
        }),
    }
}

/// Client settings (for etcd, or the CLI talking to a TLS router): the CA to trust and an
/// optional client certificate; `None` when neither is given.
pub fn client_tls(
    ca: Option<&Path>,
    identity: Option<PemIdentity>,
) -> Result<Option<ClientTlsConfig>, TlsError> {
    if ca.is_none() && identity.is_none() {
        return Ok(None);
    }
    let mut config = ClientTlsConfig::new();
    if let Some(ca) = ca {
        config = config.ca_certificate(PemCa::load(ca)?.tonic());
    }
    if let Some(identity) = identity {
        config = config.identity(identity.tonic());
    }
    Ok(Some(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str, body: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("moe-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, body).unwrap();
        path
    }

    #[test]
    fn half_settings_are_refused_by_name() {
        let args = PublicTlsArgs {
            tls_cert: Some("/nonexistent/cert.pem".into()),
            ..Default::default()
        };
        let err = args.load().unwrap_err().to_string();
        assert!(err.contains("--tls-cert needs --tls-key"), "{err}");
        let args = ClusterTlsArgs {
            cluster_ca: Some("/x".into()),
            ..Default::default()
        };
        assert!(args
            .load()
            .unwrap_err()
            .to_string()
            .contains("--cluster-ca"));
        assert!(PublicTlsArgs::default().load().unwrap().is_none());
        assert!(ClusterTlsArgs::default().load().unwrap().is_none());
    }

    #[test]
    fn missing_and_garbage_files_are_clear_errors() {
        let err = PemCa::load(Path::new("/nonexistent/ca.pem")).unwrap_err();
        assert!(matches!(err, TlsError::Read { .. }), "{err}");
        let garbage = temp("garbage.pem", "not a certificate\n");
        let err = PemCa::load(&garbage).unwrap_err();
        assert!(matches!(err, TlsError::NoCertificate { .. }), "{err}");
        assert!(err.to_string().contains("garbage.pem"));
    }
}
