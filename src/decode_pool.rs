//! The server's image-decoding threads: a fixed set of long-lived threads, each its own
//! one-thread rayon pool.
//!
//! Uploads are already decoded in parallel, one per thread. jpeg-decoder also splits one JPEG
//! of more than 128x128 pixels (a 224x224 ALL-Aria field, say) over rayon; from a plain thread
//! that means handing each piece to rayon's global pool and waking its threads, which costs
//! CPU time beside the model for no gain. On a thread that is itself the only worker of its
//! own rayon pool ([`on_local_rayon`]) the same pieces run inline, in order, with the same
//! result.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{mpsc, Arc, Mutex};

type Job = Box<dyn FnOnce() + Send + 'static>;

/// Why a job did not return a value.
#[derive(Debug, thiserror::Error)]
pub enum DecodePoolError {
    #[error("the decoding threads have stopped")]
    Stopped,
    #[error("decoding panicked: {0}")]
    Panicked(String),
}

/// Runs `f` with the current thread as the only worker of a rayon pool of its own, so rayon
/// work started inside `f` (jpeg-decoder's) runs on this thread instead of the global pool.
/// Falls back to calling `f` directly where that pool cannot be made (e.g. on a thread of
/// another rayon pool, as in the trainer). rayon leaks such a pool's registry (a few KB) when
/// the thread ends: call this on long-lived threads only.
pub fn on_local_rayon<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    match rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .use_current_thread()
        .build()
    {
        Ok(pool) => pool.install(f),
        Err(_) => f(),
    }
}

/// A fixed number of decoding threads fed from one queue; dropping the pool (its sender) lets
/// them finish their current job and exit.
pub struct DecodePool {
    sender: mpsc::Sender<Job>,
    threads: usize,
}

impl DecodePool {
    /// Starts `threads` (at least 1) decoding threads named `leuknet-decode-N`.
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let threads = threads.max(1);
        let (sender, receiver) = mpsc::channel::<Job>();
        let receiver = Arc::new(Mutex::new(receiver));
        for i in 0..threads {
            let receiver = receiver.clone();
            std::thread::Builder::new()
                .name(format!("leuknet-decode-{i}"))
                .spawn(move || on_local_rayon(|| worker(&receiver)))?;
        }
        Ok(Self { sender, threads })
    }

    /// How many decoding threads there are.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f` on a decoding thread and waits (asynchronously) for its value; a panic in `f`
    /// is returned as an error and the thread goes on with the next job.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, DecodePoolError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let out = catch_unwind(AssertUnwindSafe(f)).map_err(|p| {
                DecodePoolError::Panicked(
                    p.downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| p.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "unknown panic".into()),
                )
            });
            let _ = tx.send(out);
        });
        self.sender
            .send(job)
            .map_err(|_| DecodePoolError::Stopped)?;
        rx.await.map_err(|_| DecodePoolError::Stopped)?
    }
}

fn worker(receiver: &Mutex<mpsc::Receiver<Job>>) {
    loop {
        let job = match receiver.lock() {
            Ok(r) => r.recv(),
            Err(_) => return,
        };
        match job {
            Ok(job) => job(),
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_jobs_and_survives_a_panic() {
        let pool = DecodePool::new(2).unwrap();
        assert_eq!(pool.threads(), 2);
        let name = pool
            .run(|| std::thread::current().name().map(str::to_string))
            .await
            .unwrap();
        assert!(name.unwrap().starts_with("leuknet-decode-"));
        let err = pool.run(|| panic!("boom")).await.unwrap_err();
        assert!(err.to_string().contains("boom"), "{err}");
        // Both threads still work after the panic.
        let sums = futures::future::join_all((0..8u64).map(|i| pool.run(move || i * 2))).await;
        let sums: Vec<u64> = sums.into_iter().map(Result::unwrap).collect();
        assert_eq!(sums, (0..8u64).map(|i| i * 2).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn rayon_work_inside_a_job_stays_on_the_decoding_thread() {
        let pool = DecodePool::new(1).unwrap();
        let (outer, inner) = pool
            .run(|| {
                let outer = std::thread::current().id();
                let mut inner = Vec::new();
                rayon::in_place_scope(|s| {
                    for _ in 0..4 {
                        s.spawn(|_| {});
                    }
                });
                use rayon::prelude::*;
                inner.extend(
                    (0..64)
                        .into_par_iter()
                        .map(|_| std::thread::current().id())
                        .collect::<Vec<_>>(),
                );
                (outer, inner)
            })
            .await
            .unwrap();
        assert!(inner.iter().all(|id| *id == outer), "rayon ran elsewhere");
    }
}
