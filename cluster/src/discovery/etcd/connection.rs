//! How to reach etcd: endpoints, TLS, user, read once at start-up (see
//! [`crate::config::EtcdArgs::connection`]).

use etcd_client::{Client, ConnectOptions};
use tonic::transport::ClientTlsConfig;

use crate::discovery::kv::CALL_TIMEOUT;

/// Endpoints, TLS and user of the cluster's etcd. Cheap to clone; the password never prints.
#[derive(Clone)]
pub struct EtcdConnection {
    endpoints: Vec<String>,
    tls: Option<ClientTlsConfig>,
    /// User and password, for etcd clusters with authentication enabled.
    user: Option<(String, String)>,
}

impl std::fmt::Debug for EtcdConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdConnection")
            .field("endpoints", &self.endpoints)
            .field("tls", &self.tls.is_some())
            .field("user", &self.user.as_ref().map(|(user, _)| user))
            .finish()
    }
}

impl EtcdConnection {
    pub fn new(
        endpoints: Vec<String>,
        tls: Option<ClientTlsConfig>,
        user: Option<(String, String)>,
    ) -> Self {
        Self {
            endpoints,
            tls,
            user,
        }
    }

    /// Plaintext, no authentication (tests and local clusters).
    pub fn plain(endpoints: Vec<String>) -> Self {
        Self::new(endpoints, None, None)
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// The password, for tests of how it is read.
    #[cfg(test)]
    pub(crate) fn password(&self) -> Option<&str> {
        self.user.as_ref().map(|(_, password)| password.as_str())
    }

    fn options(&self) -> ConnectOptions {
        let mut options =
            ConnectOptions::new().with_connect_timeout(std::time::Duration::from_secs(2));
        if let Some(tls) = &self.tls {
            options = options.with_tls(tls.clone());
        }
        if let Some((user, password)) = &self.user {
            options = options
                .with_user(user.clone(), password.clone())
                .with_auto_token_refresh(true);
        }
        options
    }

    /// A client whose unary calls time out (do not use it for long-lived streams).
    pub(crate) async fn connect(&self) -> Result<Client, etcd_client::Error> {
        Client::connect(
            &self.endpoints,
            Some(self.options().with_timeout(CALL_TIMEOUT)),
        )
        .await
    }

    /// A client without a request timeout, for watches and lease keep-alive streams.
    pub(crate) async fn connect_for_streams(&self) -> Result<Client, etcd_client::Error> {
        Client::connect(&self.endpoints, Some(self.options())).await
    }

    /// Turns authentication on in a fresh etcd: a `root` user with `root_password` and the
    /// root role, then `auth enable` (what `etcdctl user add root; etcdctl auth enable` do, for
    /// set-ups without etcdctl).
    pub async fn enable_auth(&self, root_password: &str) -> Result<(), etcd_client::Error> {
        let mut client = self.connect().await?;
        client.user_add("root", root_password, None).await?;
        client.user_grant_role("root", "root").await?;
        client.auth_enable().await?;
        Ok(())
    }
}
