//! Gateway configuration: a TOML file, then `MP_*` environment variables, then flags.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// gRPC listen address.
    pub listen: String,
    /// Prometheus metrics listen address (HTTP, /metrics); empty = off.
    pub metrics_listen: String,
    pub redis_url: String,
    /// Prefix of every Redis key of this project.
    pub prefix: String,
    /// Directory holding the model checkpoints (shared by every node).
    pub checkpoints: PathBuf,
    /// How long a lease lasts without a heartbeat.
    pub lease_ttl_ms: u64,
    /// Largest accepted request, in bytes.
    pub max_message_bytes: usize,
    /// How often expired leases are returned to the queue.
    pub reaper_interval_ms: u64,
    /// How long `GetImage` waits for the workers to compute a view that is not stored yet
    /// before computing it itself (0: never ask the workers).
    pub view_wait_ms: u64,
    /// `GetImage` computes views for the serving version and the N newest versions only
    /// (each other version would cost a model load): older ones are refused.
    pub view_versions: u64,
    /// Leases one expert may hold at once (0: no limit).
    pub leases_per_expert: u64,
    /// `WatchProposal` streams one expert may hold open at once on this gateway.
    pub watches_per_expert: usize,
    /// `WatchProposal` streams open at once on this gateway, all experts together.
    pub watches_total: usize,
    /// Concurrent HTTP/2 streams per client connection. One expert's client needs a few (a
    /// watch, a lease, a heartbeat); a flood past it waits in the flooder's own client.
    pub max_concurrent_streams: u32,
    /// Requests a second one expert may make (bursts of twice that); 0: no limit. Admins are
    /// exempt. Off by default for the simulated experts of the benchmarks; the deployment
    /// files set it.
    pub requests_per_expert_s: f64,
    /// TLS: the certificate chain (PEM) the gateway serves; with `tls_key`, the gateway
    /// speaks only TLS (clients use `https://`). Unset: plaintext.
    pub tls_cert: Option<PathBuf>,
    /// TLS: the certificate's private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// The web client's bundle (`index.html`, its `.js` and `.wasm`, from
    /// `deploy/build-web.sh`), served from `/` of the gRPC port. Unset: `/` says how to
    /// build it.
    pub web_dir: Option<PathBuf>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            listen: "127.0.0.1:50051".into(),
            metrics_listen: "127.0.0.1:9464".into(),
            redis_url: "redis://127.0.0.1:6379".into(),
            prefix: "mp".into(),
            checkpoints: PathBuf::from("checkpoints"),
            lease_ttl_ms: 60_000,
            max_message_bytes: 4 * 1024 * 1024,
            reaper_interval_ms: 500,
            view_wait_ms: 5_000,
            view_versions: 5,
            leases_per_expert: 2,
            watches_per_expert: 8,
            watches_total: 1024,
            max_concurrent_streams: 32,
            requests_per_expert_s: 0.0,
            tls_cert: None,
            tls_key: None,
            web_dir: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("environment variable {name}: {message}")]
    Env { name: String, message: String },
}

impl GatewayConfig {
    /// Reads `path` if given (unknown keys are an error), then applies `MP_*` overrides.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut cfg = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| ConfigError::File {
                    path: p.into(),
                    message: e.to_string(),
                })?;
                toml::from_str(&text).map_err(|e| ConfigError::File {
                    path: p.into(),
                    message: e.to_string(),
                })?
            }
            None => GatewayConfig::default(),
        };
        cfg.apply_env(|k| std::env::var(k).ok())?;
        Ok(cfg)
    }

    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        fn num<T: std::str::FromStr>(name: &str, v: String) -> Result<T, ConfigError> {
            v.parse().map_err(|_| ConfigError::Env {
                name: name.into(),
                message: format!("{v:?} is not a number"),
            })
        }
        if let Some(v) = get("MP_LISTEN") {
            self.listen = v;
        }
        if let Some(v) = get("MP_METRICS_LISTEN") {
            self.metrics_listen = v;
        }
        if let Some(v) = get("MP_REDIS_URL") {
            self.redis_url = v;
        }
        if let Some(v) = get("MP_PREFIX") {
            self.prefix = v;
        }
        if let Some(v) = get("MP_CHECKPOINTS") {
            self.checkpoints = v.into();
        }
        if let Some(v) = get("MP_LEASE_TTL_MS") {
            self.lease_ttl_ms = num("MP_LEASE_TTL_MS", v)?;
        }
        if let Some(v) = get("MP_MAX_MESSAGE_BYTES") {
            self.max_message_bytes = num("MP_MAX_MESSAGE_BYTES", v)?;
        }
        if let Some(v) = get("MP_REAPER_INTERVAL_MS") {
            self.reaper_interval_ms = num("MP_REAPER_INTERVAL_MS", v)?;
        }
        if let Some(v) = get("MP_VIEW_WAIT_MS") {
            self.view_wait_ms = num("MP_VIEW_WAIT_MS", v)?;
        }
        if let Some(v) = get("MP_LEASES_PER_EXPERT") {
            self.leases_per_expert = num("MP_LEASES_PER_EXPERT", v)?;
        }
        if let Some(v) = get("MP_WATCHES_PER_EXPERT") {
            self.watches_per_expert = num("MP_WATCHES_PER_EXPERT", v)?;
        }
        if let Some(v) = get("MP_WATCHES_TOTAL") {
            self.watches_total = num("MP_WATCHES_TOTAL", v)?;
        }
        if let Some(v) = get("MP_MAX_CONCURRENT_STREAMS") {
            self.max_concurrent_streams = num("MP_MAX_CONCURRENT_STREAMS", v)?;
        }
        if let Some(v) = get("MP_REQUESTS_PER_EXPERT_S") {
            self.requests_per_expert_s = num("MP_REQUESTS_PER_EXPERT_S", v)?;
        }
        if let Some(v) = get("MP_TLS_CERT") {
            self.tls_cert = (!v.is_empty()).then(|| PathBuf::from(v));
        }
        if let Some(v) = get("MP_TLS_KEY") {
            self.tls_key = (!v.is_empty()).then(|| PathBuf::from(v));
        }
        if let Some(v) = get("MP_WEB_DIR") {
            self.web_dir = (!v.is_empty()).then(|| PathBuf::from(v));
        }
        if let Some(v) = get("MP_VIEW_VERSIONS") {
            self.view_versions = num("MP_VIEW_VERSIONS", v)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_env_and_unknown_keys_refused() {
        let dir = std::env::temp_dir().join(format!("mp-gw-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("g.toml");
        std::fs::write(&p, "listen = \"0.0.0.0:1\"\nlease_ttl_ms = 5\n").unwrap();
        let mut c = GatewayConfig::load(Some(&p)).unwrap();
        assert_eq!(
            (c.listen.as_str(), c.lease_ttl_ms, c.prefix.as_str()),
            ("0.0.0.0:1", 5, "mp")
        );
        c.apply_env(|k| (k == "MP_LEASE_TTL_MS").then(|| "77".to_string()))
            .unwrap();
        assert_eq!(c.lease_ttl_ms, 77);
        assert!(c
            .apply_env(|k| (k == "MP_LEASE_TTL_MS").then(|| "x".to_string()))
            .is_err());
        std::fs::write(&p, "listne = \"typo\"\n").unwrap();
        let e = GatewayConfig::load(Some(&p)).unwrap_err().to_string();
        assert!(e.contains("listne"), "{e}");
    }
}
