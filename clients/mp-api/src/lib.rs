//! # Layout
//! - [`Client`]: authenticated stubs of every `mp.v1` service over one channel.
//! - [`sim`]: simulated experts that use the API exactly as a person's client does.
//!
//! No tensors and no Redis here: this crate only speaks the public API. It also compiles to
//! `wasm32` for the web client: there the stubs speak gRPC-web through the browser's `fetch`
//! (`tonic-web-wasm-client`) to the gateway that served the page; `sim` is native only.

#[cfg(not(target_arch = "wasm32"))]
pub mod sim;

use mp_proto::v1 as pb;
#[cfg(not(target_arch = "wasm32"))]
use std::path::Path;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
#[cfg(not(target_arch = "wasm32"))]
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

/// The web client's channel: gRPC-web over the browser's `fetch`.
#[cfg(target_arch = "wasm32")]
pub type Channel = tonic_web_wasm_client::Client;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("bad address {0:?}")]
    Address(String),
    #[error("token is not valid header text")]
    Token,
    #[cfg(not(target_arch = "wasm32"))]
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("TLS: {0}")]
    Tls(String),
}

/// Adds `authorization: Bearer <token>` to every request.
#[derive(Clone)]
pub struct Auth(MetadataValue<Ascii>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

pub type Svc = InterceptedService<Channel, Auth>;

/// Stubs of every service, sharing one HTTP/2 channel. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    pub queue: pb::queue_service_client::QueueServiceClient<Svc>,
    pub images: pb::image_service_client::ImageServiceClient<Svc>,
    pub proposals: pb::proposal_service_client::ProposalServiceClient<Svc>,
    pub models: pb::model_service_client::ModelServiceClient<Svc>,
    pub stats: pb::stats_service_client::StatsServiceClient<Svc>,
    pub admin: pb::admin_service_client::AdminServiceClient<Svc>,
}

#[cfg(not(target_arch = "wasm32"))]
impl Client {
    /// A client for `addr` (`http://host:port`, or `https://host:port` for a gateway that
    /// serves TLS: its certificate is checked against the system's roots and, when
    /// `MP_CA_FILE` names one, that CA). The channel connects lazily and reconnects by
    /// itself, so a client outlives a restart of the gateway.
    pub fn new(addr: &str, token: &str) -> Result<Client, ClientError> {
        Self::with_ca(addr, token, ca_from_env().as_deref())
    }

    /// [`Client::new`] trusting the CA certificate (PEM) in `ca` for `https://`.
    pub fn with_ca(addr: &str, token: &str, ca: Option<&Path>) -> Result<Client, ClientError> {
        let ep = endpoint(addr, ca)?.timeout(std::time::Duration::from_secs(30));
        Self::with_channel(ep.connect_lazy(), token)
    }

    /// Connects now, failing fast when nothing listens.
    pub async fn connect(addr: &str, token: &str) -> Result<Client, ClientError> {
        let ep = endpoint(addr, ca_from_env().as_deref())?;
        let channel = ep.connect().await.map_err(|source| ClientError::Connect {
            addr: addr.into(),
            source,
        })?;
        Self::with_channel(channel, token)
    }
}

/// In the browser: the same stubs over gRPC-web. There is nothing to connect ahead of the
/// first call (each call is one `fetch`), so [`Client::connect`] only checks the address.
#[cfg(target_arch = "wasm32")]
impl Client {
    pub fn new(addr: &str, token: &str) -> Result<Client, ClientError> {
        let addr = addr.trim_end_matches('/');
        if !(addr.starts_with("http://") || addr.starts_with("https://")) {
            return Err(ClientError::Address(addr.into()));
        }
        Self::with_channel(tonic_web_wasm_client::Client::new(addr.to_string()), token)
    }

    pub async fn connect(addr: &str, token: &str) -> Result<Client, ClientError> {
        Self::new(addr, token)
    }
}

impl Client {
    pub fn with_channel(channel: Channel, token: &str) -> Result<Client, ClientError> {
        let value: MetadataValue<Ascii> = format!("Bearer {token}")
            .parse()
            .map_err(|_| ClientError::Token)?;
        let auth = Auth(value);
        let svc = || InterceptedService::new(channel.clone(), auth.clone());
        Ok(Client {
            queue: pb::queue_service_client::QueueServiceClient::new(svc()),
            images: pb::image_service_client::ImageServiceClient::new(svc()),
            proposals: pb::proposal_service_client::ProposalServiceClient::new(svc()),
            models: pb::model_service_client::ModelServiceClient::new(svc()),
            stats: pb::stats_service_client::StatsServiceClient::new(svc()),
            admin: pb::admin_service_client::AdminServiceClient::new(svc()),
        })
    }
}

#[cfg(not(target_arch = "wasm32"))]
/// `MP_CA_FILE`: a CA certificate (PEM) the clients trust for `https://` gateways.
fn ca_from_env() -> Option<std::path::PathBuf> {
    std::env::var_os("MP_CA_FILE")
        .filter(|v| !v.is_empty())
        .map(Into::into)
}

#[cfg(not(target_arch = "wasm32"))]
/// The endpoint of `addr`; TLS for `https://`, trusting the system's roots and `ca`.
fn endpoint(addr: &str, ca: Option<&Path>) -> Result<Endpoint, ClientError> {
    let mut ep = Endpoint::from_shared(addr.to_string())
        .map_err(|_| ClientError::Address(addr.into()))?
        .connect_timeout(std::time::Duration::from_secs(2))
        .tcp_nodelay(true);
    if addr.starts_with("https://") {
        let mut tls = tonic::transport::ClientTlsConfig::new().with_native_roots();
        if let Some(ca) = ca {
            let pem = std::fs::read(ca)
                .map_err(|e| ClientError::Tls(format!("{}: {e}", ca.display())))?;
            tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
        }
        ep = ep
            .tls_config(tls)
            .map_err(|e| ClientError::Tls(e.to_string()))?;
    }
    Ok(ep)
}

/// Statuses worth retrying: the server or the network is away for a moment.
pub fn transient(s: &Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
    )
}

/// A fresh random key (for idempotency keys).
pub fn random_key() -> String {
    let mut b = [0u8; 16];
    #[cfg(not(target_arch = "wasm32"))]
    getrandom::fill(&mut b).expect("operating system random source");
    #[cfg(target_arch = "wasm32")]
    web_sys::window()
        .and_then(|w| w.crypto().ok())
        .and_then(|c| c.get_random_values_with_u8_array(&mut b).ok())
        .expect("the browser's crypto.getRandomValues");
    hex::encode(b)
}

#[cfg(not(target_arch = "wasm32"))]
/// Creates an expert through the admin API, retrying while the gateway is briefly away
/// (for example before its first Redis connection).
pub async fn create_expert(
    admin: &Client,
    name: &str,
    role: &str,
    retry_for: std::time::Duration,
) -> Result<pb::CreateExpertReply, Status> {
    let start = std::time::Instant::now();
    loop {
        let req = pb::CreateExpertRequest {
            name: name.into(),
            role: role.into(),
            ttl_s: 0,
        };
        match admin.admin.clone().create_expert(req).await {
            Ok(r) => return Ok(r.into_inner()),
            Err(s) if transient(&s) && start.elapsed() < retry_for => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await
            }
            Err(s) => return Err(s),
        }
    }
}
