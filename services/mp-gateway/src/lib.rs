//! # Layout
//! The gateway: the one gRPC service clients talk to.
//! - [`config`]: file → `MP_*` environment → flags.
//! - [`service`]: the tonic services (queue, images, proposals, models, stats, admin), thin
//!   shells over `mp-store`, with the one error mapping to `tonic::Status`.
//! - [`views`]: predictions and saliency for the image view, on a thread that owns models.
//!
//! [`run`] takes the listener and a shutdown future; [`Spawned`] runs one on the current
//! tokio runtime until stopped (tests, benchmarks).
//! Health starts NotServing and flips to Serving while Redis answers.
//! The gateway holds no state of its own beyond caches: everything lives in Redis.

pub mod auth;
pub mod config;
pub mod review;
pub mod service;
pub mod views;
pub mod web;

pub use config::GatewayConfig;
pub use service::Gateway;

use mp_proto::v1 as pb;
use std::future::Future;
use std::time::Duration;
use tokio::net::TcpListener;
use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("serving: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("metrics on {addr}: {message}")]
    Metrics { addr: String, message: String },
    #[error("TLS: {0}")]
    Tls(String),
}

/// The server's TLS settings: both `tls_cert` and `tls_key` (PEM files), or neither.
fn tls_config(
    config: &GatewayConfig,
) -> Result<Option<tonic::transport::ServerTlsConfig>, GatewayError> {
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|e| GatewayError::Tls(format!("{}: {e}", p.display())))
    };
    match (&config.tls_cert, &config.tls_key) {
        (None, None) => Ok(None),
        (Some(cert), Some(key)) => {
            let identity = tonic::transport::Identity::from_pem(read(cert)?, read(key)?);
            Ok(Some(
                tonic::transport::ServerTlsConfig::new().identity(identity),
            ))
        }
        _ => Err(GatewayError::Tls(
            "tls_cert and tls_key go together (MP_TLS_CERT, MP_TLS_KEY)".into(),
        )),
    }
}

const SERVICES: [&str; 6] = [
    "mp.v1.QueueService",
    "mp.v1.ImageService",
    "mp.v1.ProposalService",
    "mp.v1.ModelService",
    "mp.v1.StatsService",
    "mp.v1.AdminService",
];

/// A gateway running as a task on the current tokio runtime.
pub struct Spawned {
    /// The address it listens on.
    pub local_addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Spawned {
    /// Starts [`run`] on `listener` with `config` in a task.
    pub fn start(listener: TcpListener, config: GatewayConfig) -> std::io::Result<Spawned> {
        let local_addr = listener.local_addr()?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            if let Err(e) = run(listener, config, async {
                let _ = rx.await;
            })
            .await
            {
                warn!(error = %e, "gateway stopped with an error");
            }
        });
        Ok(Spawned {
            local_addr,
            stop: Some(tx),
            task: Some(task),
        })
    }

    /// Shuts the gateway down and waits until it has stopped.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

/// How often the gateway refreshes the agreement gauges.
const AGREEMENT_EVERY: Duration = Duration::from_secs(60);

/// Prometheus gauges of the agreement report: the project's means and each expert's
/// (against the others); NaN where nothing could be measured.
fn agreement_gauges(r: &mp_core::agreement::Report) {
    let v = |x: Option<f64>| x.unwrap_or(f64::NAN);
    metrics::gauge!("mp_agreement_red_iou").set(v(r.overall.red_iou));
    metrics::gauge!("mp_agreement_green_iou").set(v(r.overall.green_iou));
    metrics::gauge!("mp_agreement_kappa").set(v(r.overall.kappa));
    metrics::gauge!("mp_agreement_images").set(r.overall.n as f64);
    for (expert, f) in &r.experts {
        let e = expert.clone();
        metrics::gauge!("mp_agreement_expert_red_iou", "expert" => e.clone()).set(v(f.red_iou));
        metrics::gauge!("mp_agreement_expert_kappa", "expert" => e).set(v(f.kappa));
    }
}

fn install_metrics(addr: &str) -> Result<(), GatewayError> {
    let sock: std::net::SocketAddr = addr.parse().map_err(|e| GatewayError::Metrics {
        addr: addr.into(),
        message: format!("{e}"),
    })?;
    match metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(sock)
        .install()
    {
        Ok(()) => Ok(()),
        // A second gateway in one process (tests) shares the first recorder.
        Err(e) if e.to_string().contains("already") => Ok(()),
        Err(e) => Err(GatewayError::Metrics {
            addr: addr.into(),
            message: e.to_string(),
        }),
    }
}

/// Serves the gateway on `listener` until `shutdown` completes.
pub async fn run(
    listener: TcpListener,
    config: GatewayConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), GatewayError> {
    if !config.metrics_listen.is_empty() {
        install_metrics(&config.metrics_listen)?;
    }
    let (reporter, health) = tonic_health::server::health_reporter();
    for s in SERVICES.iter().chain(std::iter::once(&"")) {
        reporter
            .set_service_status(*s, tonic_health::ServingStatus::NotServing)
            .await;
    }
    let gw = Gateway::new(config.clone(), views::ViewPool::start(3));

    // Connect (retrying), then keep health in step with Redis and return expired leases.
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let bg = {
        let gw = gw.clone();
        let cfg = config.clone();
        tokio::spawn(async move {
            let store = loop {
                match mp_store::Store::connect(&cfg.redis_url, &cfg.prefix).await {
                    Ok(s) => break s,
                    Err(e) => {
                        warn!(error = %e, url = %cfg.redis_url, "redis not answering; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                            _ = stop_rx.changed() => return,
                        }
                    }
                }
            };
            gw.set_store(store.clone());
            let mut serving = None;
            let metrics_on = !cfg.metrics_listen.is_empty();
            let mut agreement_at: Option<std::time::Instant> = None;
            let mut tick =
                tokio::time::interval(Duration::from_millis(cfg.reaper_interval_ms.max(50)));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop_rx.changed() => return,
                }
                let ok = store.ping().await.is_ok();
                if serving != Some(ok) {
                    let st = if ok {
                        tonic_health::ServingStatus::Serving
                    } else {
                        tonic_health::ServingStatus::NotServing
                    };
                    for s in SERVICES.iter().chain(std::iter::once(&"")) {
                        reporter.set_service_status(*s, st).await;
                    }
                    info!(serving = ok, "health changed");
                    serving = Some(ok);
                }
                if ok {
                    match store.reclaim().await {
                        Ok(n) if n > 0 => {
                            info!(reclaimed = n, "expired leases returned to the queue")
                        }
                        Ok(_) => {}
                        Err(e) => warn!(error = %e, "reaper failed"),
                    }
                    match review::sweep(&store).await {
                        Ok(n) if n > 0 => {
                            info!(images = n, "unsettled images settled or queued for review")
                        }
                        Ok(_) => {}
                        Err(e) => warn!(error = %e, "settlement sweep failed"),
                    }
                    metrics::gauge!("mp_up").set(1.0);
                    if let Ok(c) = store.counts().await {
                        metrics::gauge!("mp_queue_depth").set(c.queue_depth as f64);
                        metrics::gauge!("mp_leases_out").set(c.leases_out as f64);
                        metrics::gauge!("mp_experts_online").set(c.experts_online as f64);
                        metrics::gauge!("mp_marks_total").set(c.marks_total as f64);
                        metrics::gauge!("mp_refine_backlog").set(c.refine_pending as f64);
                    }
                    if let Ok(r) = store.review_counts().await {
                        metrics::gauge!("mp_review_queued").set(r.queued as f64);
                        metrics::gauge!("mp_review_leased").set(r.leased as f64);
                        metrics::gauge!("mp_review_unsettled").set(r.unsettled as f64);
                        metrics::gauge!("mp_review_settled").set(r.settled as f64);
                    }
                    // Agreement (overlap > 1) once a minute: it reads the marks of every
                    // image several experts marked.
                    if metrics_on && agreement_at.is_none_or(|t| t.elapsed() >= AGREEMENT_EVERY) {
                        agreement_at = Some(std::time::Instant::now());
                        if store.overlap().await.is_ok_and(|n| n > 1) {
                            match service::agreement_report(&store).await {
                                Ok(r) => agreement_gauges(&r),
                                Err(e) => warn!(error = %e, "agreement report failed"),
                            }
                        }
                    }
                } else {
                    metrics::gauge!("mp_up").set(0.0);
                }
            }
        })
    };

    let n = config.max_message_bytes;
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    info!(%addr, "gateway listening");
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = tls_config(&config)? {
        server = server.tls_config(tls)?;
        info!("serving TLS");
    }
    let grpc = tonic::service::Routes::new(health)
        .add_service(
            pb::queue_service_server::QueueServiceServer::new(gw.clone())
                .max_decoding_message_size(n),
        )
        .add_service(
            pb::image_service_server::ImageServiceServer::new(gw.clone())
                .max_decoding_message_size(n),
        )
        .add_service(
            pb::proposal_service_server::ProposalServiceServer::new(gw.clone())
                .max_decoding_message_size(n),
        )
        .add_service(
            pb::model_service_server::ModelServiceServer::new(gw.clone())
                .max_decoding_message_size(n),
        )
        .add_service(
            pb::stats_service_server::StatsServiceServer::new(gw.clone())
                .max_decoding_message_size(n),
        )
        .add_service(
            pb::admin_service_server::AdminServiceServer::new(gw.clone())
                .max_decoding_message_size(n),
        );
    if let Some(dir) = &config.web_dir {
        info!(dir = %dir.display(), "serving the web client at /");
    }
    let routes = web::with_bundle(grpc, config.web_dir.clone()).prepare();
    let result = server
        .max_concurrent_streams(Some(gw.config.max_concurrent_streams.max(1)))
        .trace_fn(|req| tracing::info_span!("grpc", path = %req.uri().path()))
        // Browsers: gRPC-web over HTTP/1.1 (or 2) on the same port, and the bundle at `/`.
        .accept_http1(true)
        .layer(web::GrpcWebOrPlain)
        .add_routes(routes)
        .serve_with_incoming_shutdown(
            // Small replies must not wait for Nagle's algorithm.
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await;
    let _ = stop_tx.send(true);
    let _ = bg.await;
    info!("gateway stopped");
    Ok(result?)
}
