//! The drain signal shared by the listener, the batcher and the readiness probe.
//!
//! One [`Shutdown`] is cloned everywhere: `trigger` flips readiness to false at once and wakes
//! everything waiting in [`Shutdown::wait`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::watch;

/// A cloneable, one-way "we are draining" flag with async waiting.
#[derive(Clone, Debug)]
pub struct Shutdown {
    draining: Arc<AtomicBool>,
    tx: Arc<watch::Sender<bool>>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    /// A flag that is not yet triggered.
    pub fn new() -> Self {
        let (tx, _) = watch::channel(false);
        Self {
            draining: Arc::new(AtomicBool::new(false)),
            tx: Arc::new(tx),
        }
    }

    /// Starts draining; idempotent.
    pub fn trigger(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.tx.send_replace(true);
    }

    /// True once [`Shutdown::trigger`] has been called.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Resolves when draining starts (at once if it already has).
    pub async fn wait(&self) {
        let mut rx = self.tx.subscribe();
        // The sender lives in `self`, so `wait_for` cannot fail while we hold it.
        let _ = rx.wait_for(|draining| *draining).await;
    }
}

/// Resolves on SIGTERM or ctrl-c (SIGINT).
pub async fn os_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
