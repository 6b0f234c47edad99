//! The admin HTTP endpoints (`/metrics`, `/healthz`, `/readyz`, and the dashboard: `/dashboard` and
//! its JSON `/api/v1/cluster`) on their own thread and runtime, so probes and scrapes answer even while
//! the inference executor is saturated.

use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use crate::api::dashboard::{self, Dashboard};

/// How often recorded histogram samples are drained into their buckets when nothing scrapes (the
/// interval `metrics-exporter-prometheus` gives its own upkeep task).
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Called before each scrape, to refresh gauges that change with time alone.
pub type OnScrape = Arc<dyn Fn() + Send + Sync>;

#[derive(Clone)]
struct AdminState {
    metrics: PrometheusHandle,
    ready: Arc<AtomicBool>,
    on_scrape: OnScrape,
    dashboard: Dashboard,
}

/// The running admin server; dropping it stops the server and joins its thread.
pub struct AdminServer {
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AdminServer {
    /// Serves on an already bound listener, so the caller knows the address before anything runs.
    pub fn start(
        listener: TcpListener,
        tls: Option<Arc<rustls::ServerConfig>>,
        metrics: PrometheusHandle,
        ready: Arc<AtomicBool>,
        on_scrape: OnScrape,
        dashboard: Dashboard,
    ) -> std::io::Result<Self> {
        listener.set_nonblocking(true)?;
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let thread = std::thread::Builder::new().name("admin-http".to_owned()).spawn(move || {
            runtime.block_on(async move {
                // Histogram samples pile up in memory until drained; a scrape drains them, but nothing
                // says meshd is scraped (about 100 bytes a request: gigabytes an hour at 10k req/s).
                let upkeep = tokio::spawn(upkeep(metrics.clone(), UPKEEP_INTERVAL));
                let app = Router::new()
                    .route("/metrics", get(render_metrics))
                    .route("/healthz", get(|| async { "ok\n" }))
                    .route("/readyz", get(readiness))
                    .route("/dashboard", get(|| async { Html(dashboard::PAGE) }))
                    .route("/api/v1/cluster", get(cluster_json))
                    .with_state(AdminState { metrics, ready, on_scrape, dashboard });
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(error = %e, "admin listener unusable");
                        return;
                    }
                };
                let served = match tls {
                    None => {
                        axum::serve(listener, app).with_graceful_shutdown(stopped.cancelled_owned()).await
                    }
                    Some(tls) => {
                        let listener = crate::tls::stream::TlsListener::new(listener, tls);
                        axum::serve(listener, app).with_graceful_shutdown(stopped.cancelled_owned()).await
                    }
                };
                upkeep.abort();
                if let Err(e) = served {
                    tracing::error!(error = %e, "admin server failed");
                }
            });
        })?;
        Ok(Self { stop, thread: Some(thread) })
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Drains histogram samples into their buckets every `interval`, on the admin thread: the recorder
/// keeps every sample recorded since the last drain, and is installed without an upkeep task of its
/// own (`install_recorder`) so that none runs on the inference executor.
async fn upkeep(metrics: PrometheusHandle, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        metrics.run_upkeep();
    }
}

async fn render_metrics(State(state): State<AdminState>) -> String {
    (state.on_scrape)();
    state.metrics.render()
}

/// The dashboard's document; never cached, since the page polls it for live figures.
async fn cluster_json(State(state): State<AdminState>) -> impl IntoResponse {
    match serde_json::to_vec(&state.dashboard.snapshot()) {
        Ok(body) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json"), (header::CACHE_CONTROL, "no-store")],
            body,
        )
            .into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot encode the dashboard document");
            (StatusCode::INTERNAL_SERVER_ERROR, "cannot encode the dashboard document\n").into_response()
        }
    }
}

async fn readiness(State(state): State<AdminState>) -> (StatusCode, &'static str) {
    if state.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}
