//! Wiring: load the model, start the engine thread, serve HTTP until the shutdown signal,
//! then drain. [`run`] takes its listener and shutdown future so tests can drive both.

use crate::batching::{BatchConfig, BatchQueue};
use crate::config::ServerConfig;
use crate::engine::{self, Engine, EngineError, EngineOptions};
use crate::http::{self, AppState, RequestLimits, RuntimeInfo};
use crate::metrics::Metrics;
use crate::model_card::ModelCard;
use crate::shutdown::Shutdown;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// Why the server could not start or did not stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(
        "no model card at {0}: the trained LeukNet model is not in this checkout yet. \
         For tests and benchmarks, write a random-weight fixture with \
         `cargo run --release --bin leuknet-fixture -- --out /tmp/leuknet-fixture` and start with \
         `--model-card /tmp/leuknet-fixture/leuknet.json` (its answers are meaningless)"
    )]
    NoModel(std::path::PathBuf),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("cannot start the engine or decoding threads: {0}")]
    Thread(std::io::Error),
    #[error("warm-up failed: {0}")]
    WarmUp(EngineError),
    #[error("configuration: {0}")]
    Config(String),
    #[error("cannot open the audit log {0}: {1}")]
    Audit(std::path::PathBuf, std::io::Error),
    #[error("API keys: {0}")]
    ApiKeys(String),
    #[error("HTTP server failed: {0}")]
    Serve(std::io::Error),
    #[error("requests were still running after the drain timeout of {0:?}")]
    DrainTimeout(Duration),
}

/// Loads the ONNX Runtime library, the card and the model, checking sha256 and graph.
pub fn load(config: &ServerConfig) -> Result<(ModelCard, Engine), ServerError> {
    if !config.model_card.exists() {
        return Err(ServerError::NoModel(config.model_card.clone()));
    }
    engine::init_runtime(&config.resolved_ort_library())?;
    let options = EngineOptions {
        device: config.device,
        intra_threads: config.intra_threads,
    };
    Ok(engine::load_from_card_tuned(
        &config.model_card,
        &options,
        &config.session_tuning(),
    )?)
}

/// Serves until `signal` resolves, then drains: readiness turns false, the listener closes,
/// every accepted request is answered (within the drain timeout), the engine thread ends.
pub async fn run(
    config: &ServerConfig,
    card: ModelCard,
    engine: Engine,
    listener: TcpListener,
    signal: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let api_keys = config.api_keys().map_err(ServerError::ApiKeys)?;
    let cors_allow_origins = config
        .cors_allow_origins
        .iter()
        .map(|o| {
            axum::http::HeaderValue::from_str(o.trim())
                .map_err(|_| ServerError::Config(format!("--cors-allow-origins: bad origin {o:?}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(keys) = &api_keys {
        tracing::info!(names = ?keys.names(), "API keys required (all routes but health, metrics and the page)");
    }
    let metrics = Arc::new(Metrics::new());
    let shutdown = Shutdown::new();
    let provider = engine.provider();
    metrics
        .model_info
        .with_label_values(&[&card.name, &card.version, &card.sha256, provider])
        .set(1);

    let warmed = Arc::new(AtomicBool::new(false));
    let (warm_tx, mut warm_rx) = tokio::sync::oneshot::channel();
    let batch = BatchConfig {
        max_batch_size: config.effective_max_batch_size(provider) as usize,
        max_queue_delay: Duration::from_millis(config.max_queue_delay_ms),
        max_queue_images: config.max_queue_images,
    };
    let on_warm = {
        let warmed = warmed.clone();
        let metrics = metrics.clone();
        move |outcome: Result<Duration, EngineError>| {
            if let Ok(took) = &outcome {
                warmed.store(true, Ordering::SeqCst);
                metrics.ready.set(1);
                tracing::info!(took_ms = took.as_millis() as u64, "warm-up done: ready");
            }
            let _ = warm_tx.send(outcome);
        }
    };
    let (queue, engine_thread) = BatchQueue::start(engine, batch.clone(), metrics.clone(), on_warm)
        .map_err(ServerError::Thread)?;

    let color_norm = card.color_normalization().map_err(EngineError::Card)?;
    let band = config.band(&card).map_err(ServerError::Config)?;
    let band = crate::http::classify::Band {
        low: band.0,
        high: band.1,
    };
    let audit = match config.audit() {
        Some(a) => {
            let path = a.path.clone();
            let log = crate::audit::AuditLog::open(a, metrics.clone())
                .map_err(|e| ServerError::Audit(path.clone(), e))?;
            tracing::info!(path = %path.display(), "audit log open");
            Some(log)
        }
        None => None,
    };
    let card_summary = card.summary_json();
    let decode_threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let decoder =
        crate::decode_pool::DecodePool::new(decode_threads).map_err(ServerError::Thread)?;
    let state = Arc::new(AppState {
        card_summary,
        color_norm,
        card,
        queue,
        metrics: metrics.clone(),
        shutdown: shutdown.clone(),
        warmed,
        limits: RequestLimits {
            max_body_bytes: config.max_body_bytes,
            max_pixels: config.max_pixels,
            max_images: config.max_images_per_request,
            request_timeout: Duration::from_millis(config.request_timeout_ms),
            body_read_timeout: Duration::from_millis(config.body_read_timeout_ms),
        },
        runtime: RuntimeInfo {
            execution_provider: provider,
            max_batch_size: batch.max_batch_size,
            max_queue_delay_ms: config.max_queue_delay_ms,
            max_queue_images: batch.max_queue_images,
            max_images_per_request: config.max_images_per_request,
            max_body_bytes: config.max_body_bytes,
            max_pixels: config.max_pixels,
            request_timeout_ms: config.request_timeout_ms,
            intra_threads: config.intra_threads,
        },
        decode_permits: tokio::sync::Semaphore::new(decode_threads),
        decoder,
        active_classify: std::sync::atomic::AtomicUsize::new(0),
        api_keys,
        cors_allow_origins,
        audit,
        band,
    });

    // Turn the outside signal, or a failed warm-up, into the drain signal.
    let warm_failure = Arc::new(std::sync::Mutex::new(None));
    {
        let shutdown = shutdown.clone();
        let metrics = metrics.clone();
        let warm_failure = warm_failure.clone();
        tokio::spawn(async move {
            let mut signal = Box::pin(signal);
            tokio::select! {
                _ = &mut signal => tracing::info!("shutdown signal: draining"),
                outcome = &mut warm_rx => {
                    match outcome {
                        Ok(Ok(_)) => {
                            // Warmed up; now wait for the real signal.
                            signal.await;
                            tracing::info!("shutdown signal: draining");
                        }
                        Ok(Err(e)) => {
                            tracing::error!(error = %e, "warm-up failed: stopping");
                            if let Ok(mut slot) = warm_failure.lock() { *slot = Some(e); }
                        }
                        Err(_) => tracing::error!("engine thread ended before warm-up"),
                    }
                }
            }
            metrics.ready.set(0);
            shutdown.trigger();
        });
    }

    let local = listener.local_addr().ok();
    tracing::info!(addr = ?local, provider, "listening");
    let app = http::app(state.clone());
    // Draining keeps the listener open, answering new classify requests with 503 and readiness
    // with 503, until every accepted classify request is answered; then the listener closes.
    let stop_listening = {
        let shutdown = shutdown.clone();
        let state = state.clone();
        async move {
            shutdown.wait().await;
            while state.active_classify.load(Ordering::SeqCst) > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    let mut serve = tokio::spawn(crate::accept::serve(
        listener,
        app,
        config.conn_limits(),
        stop_listening,
    ));
    let drain = Duration::from_millis(config.drain_timeout_ms);
    let drained = tokio::select! {
        r = &mut serve => r,
        _ = async { shutdown.wait().await; tokio::time::sleep(drain).await } => {
            return Err(ServerError::DrainTimeout(drain));
        }
    };
    match drained {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(ServerError::Serve(e)),
        Err(e) => return Err(ServerError::Serve(std::io::Error::other(e.to_string()))),
    }
    // Every accepted request is answered: write out and sync the audit log.
    if state.audit.is_some() {
        let s = state.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(a) = &s.audit {
                a.close();
            }
        })
        .await;
    }
    // Every connection is closed: release the queue so the engine thread ends.
    drop(state);
    let _ = tokio::task::spawn_blocking(move || engine_thread.join()).await;
    if let Some(e) = warm_failure.lock().ok().and_then(|mut s| s.take()) {
        return Err(ServerError::WarmUp(e));
    }
    tracing::info!("drained: every accepted request was answered");
    Ok(())
}
