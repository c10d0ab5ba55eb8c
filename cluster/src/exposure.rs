//! Cluster credentials on the command line, and the start-up check that keeps a process from
//! serving beyond its own host without them.
//!
//! On loopback a cluster is one machine's business. Once a router or node listens on another
//! address, or reaches etcd on another host, anyone on that network could dispatch to a
//! node, register as one and be sent rows, or read the collectives' nonces from etcd. So the
//! process refuses to start unless its members authenticate (mutual TLS or the cluster
//! token) and etcd is reached with its own credentials, or the operator says
//! `--insecure-cluster` for a network they trust.

use std::path::PathBuf;

use clap::Args;

use crate::auth::{ClusterToken, TokenError};
use crate::tls::{ClusterTls, ClusterTlsArgs, TlsError};

/// `--cluster-token-file` and `--insecure-cluster`, shared by routers and nodes.
#[derive(Args, Debug, Clone, Default)]
pub struct ClusterAuthArgs {
    /// File whose first line is the cluster token (at least 16 bytes; `openssl rand -hex 32`),
    /// the same on every router and node: every data-plane stream, collective join and
    /// node-facing call then proves it, and only holders are sent rows. Mutual TLS
    /// (`--cluster-ca`...) may be used instead or as well.
    #[arg(long, env = "MOE_CLUSTER_TOKEN_FILE")]
    pub cluster_token_file: Option<PathBuf>,
    /// Start on non-loopback addresses without cluster credentials (neither the token nor
    /// mutual TLS) or with an unauthenticated etcd on another host: only for a network where
    /// every host is trusted.
    #[arg(long, env = "MOE_INSECURE_CLUSTER")]
    pub insecure_cluster: bool,
}

impl ClusterAuthArgs {
    /// Reads the token once, at start-up.
    pub fn token(&self) -> Result<Option<ClusterToken>, TokenError> {
        self.cluster_token_file
            .as_deref()
            .map(ClusterToken::from_file)
            .transpose()
    }
}

/// What a process is about to expose, for [`check`].
#[derive(Debug, Clone, Default)]
pub struct Exposure {
    /// `(flag, address)` of each port the process listens on for cluster members.
    pub listens: Vec<(&'static str, String)>,
    /// Mutual TLS on the data plane (`--cluster-ca`, `--cluster-cert`, `--cluster-key`).
    pub mutual_tls: bool,
    /// `--cluster-token-file` given.
    pub token: bool,
    /// etcd endpoints (`--etcd`).
    pub etcd_endpoints: Vec<String>,
    /// etcd reached with a client certificate or a user and password.
    pub etcd_authenticated: bool,
    /// `--insecure-cluster`.
    pub insecure: bool,
}

impl Exposure {
    /// A process's exposure from its flags: the member ports it listens on, whether it has
    /// mutual TLS and the token, and its etcd settings.
    pub fn of(
        listens: Vec<(&'static str, String)>,
        mutual_tls: bool,
        token: bool,
        etcd: &crate::config::EtcdArgs,
        auth: &ClusterAuthArgs,
    ) -> Self {
        Self {
            listens,
            mutual_tls,
            token,
            etcd_endpoints: etcd.etcd.clone(),
            etcd_authenticated: etcd.authenticates(),
            insecure: auth.insecure_cluster,
        }
    }
}

/// A member's data-plane credentials (mutual TLS, the cluster token), read once at start-up
/// and checked against where the process listens: routers and nodes load them alike.
#[derive(Debug)]
pub struct MemberCredentials {
    pub tls: Option<ClusterTls>,
    pub token: Option<ClusterToken>,
}

/// Why a member's credentials could not be loaded or do not cover its exposure.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    Exposure(#[from] ExposureError),
}

impl MemberCredentials {
    /// Loads the credentials the flags name; refuses them when the ports in `listens` or
    /// etcd would be open to unauthenticated peers (see [`check`]).
    pub fn load(
        tls: &ClusterTlsArgs,
        auth: &ClusterAuthArgs,
        etcd: &crate::config::EtcdArgs,
        listens: Vec<(&'static str, String)>,
    ) -> Result<Self, CredentialsError> {
        let credentials = Self {
            tls: tls.load()?,
            token: auth.token()?,
        };
        check(&Exposure::of(
            listens,
            credentials.tls.is_some(),
            credentials.token.is_some(),
            etcd,
            auth,
        ))?;
        Ok(credentials)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExposureError {
    #[error(
        "{flag} {address} is reachable beyond this host, and cluster members would not \
         authenticate each other: give --cluster-token-file (the same file on every router and \
         node), or mutual TLS with --cluster-ca, --cluster-cert and --cluster-key; or pass \
         --insecure-cluster on a network where every host is trusted"
    )]
    Unauthenticated { flag: &'static str, address: String },
    #[error(
        "etcd at {endpoint} is on another host and would be reached without credentials (it \
         holds every node's address and the collectives' nonces): give --etcd-cert and \
         --etcd-key (etcd with --client-cert-auth), or --etcd-user with --etcd-password-file; \
         or pass --insecure-cluster on a network where every host is trusted"
    )]
    EtcdUnauthenticated { endpoint: String },
}

/// Refuses an exposure that would let unauthenticated peers into the cluster.
pub fn check(exposure: &Exposure) -> Result<(), ExposureError> {
    if exposure.insecure {
        return Ok(());
    }
    if !exposure.mutual_tls && !exposure.token {
        if let Some((flag, address)) = exposure.listens.iter().find(|(_, a)| !is_loopback(a)) {
            return Err(ExposureError::Unauthenticated {
                flag,
                address: address.clone(),
            });
        }
    }
    if !exposure.etcd_authenticated {
        if let Some(endpoint) = exposure.etcd_endpoints.iter().find(|e| !is_loopback(e)) {
            return Err(ExposureError::EtcdUnauthenticated {
                endpoint: endpoint.clone(),
            });
        }
    }
    Ok(())
}

/// Whether an address (`host:port`, `[v6]:port`, or a URL) only reaches this host. A wildcard
/// (`0.0.0.0`, `[::]`) listens on every interface, so it is not loopback; nor is any name but
/// `localhost`.
pub fn is_loopback(address: &str) -> bool {
    let without_scheme = address.split_once("://").map_or(address, |(_, rest)| rest);
    let authority = without_scheme.split('/').next().unwrap_or_default();
    let host = if let Some(rest) = authority.strip_prefix('[') {
        rest.split(']').next().unwrap_or_default()
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) if !host.contains(':') && port.parse::<u16>().is_ok() => host,
            _ => authority,
        }
    };
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    host.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_addresses_are_told_apart() {
        for a in [
            "127.0.0.1:0",
            "127.5.0.1:80",
            "[::1]:50051",
            "localhost:1",
            "http://127.0.0.1:2379",
            "https://localhost:2379/",
            "::1",
        ] {
            assert!(is_loopback(a), "{a}");
        }
        for a in [
            "0.0.0.0:50051",
            "[::]:1",
            "10.0.0.7:9",
            "etcd:2379",
            "http://etcd:2379",
            "https://10.1.2.3:2379",
            "node-0.moe.svc:50061",
        ] {
            assert!(!is_loopback(a), "{a}");
        }
    }

    #[test]
    fn exposure_needs_credentials_beyond_loopback() {
        let local = Exposure {
            listens: vec![("--listen", "127.0.0.1:0".into())],
            etcd_endpoints: vec!["http://127.0.0.1:2379".into()],
            ..Default::default()
        };
        assert_eq!(check(&local), Ok(()));
        let public = Exposure {
            listens: vec![("--listen", "0.0.0.0:50061".into())],
            ..local.clone()
        };
        let err = check(&public).unwrap_err();
        let message = err.to_string();
        for flag in [
            "--listen 0.0.0.0:50061",
            "--cluster-token-file",
            "--cluster-ca",
            "--insecure-cluster",
        ] {
            assert!(message.contains(flag), "{message}");
        }
        assert_eq!(
            check(&Exposure {
                token: true,
                ..public.clone()
            }),
            Ok(())
        );
        assert_eq!(
            check(&Exposure {
                mutual_tls: true,
                ..public.clone()
            }),
            Ok(())
        );
        let remote_etcd = Exposure {
            token: true,
            etcd_endpoints: vec!["http://etcd:2379".into()],
            ..public.clone()
        };
        let err = check(&remote_etcd).unwrap_err();
        assert!(err.to_string().contains("--etcd-user"), "{err}");
        assert_eq!(
            check(&Exposure {
                etcd_authenticated: true,
                ..remote_etcd.clone()
            }),
            Ok(())
        );
        assert_eq!(
            check(&Exposure {
                insecure: true,
                ..Exposure {
                    token: false,
                    ..remote_etcd
                }
            }),
            Ok(())
        );
    }
}
