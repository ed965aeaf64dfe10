//! Dynamic batching: a bounded queue (counted in images) in front of one engine thread.
//!
//! Handlers preprocess images in parallel, then [`BatchQueue::submit`] them. A dedicated OS
//! thread owns the [`Engine`], cuts batches (up to `max_batch_size` images; when the engine is
//! free and the queue runs dry it waits at most `max_queue_delay` for more), skips images whose
//! caller has gone or whose deadline has passed, runs the model and answers each image on its
//! own oneshot channel. The model never runs on the async runtime.

use crate::engine::Engine;
use crate::metrics::Metrics;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Batching limits.
#[derive(Debug, Clone)]
pub struct BatchConfig {
    /// Most images per model run.
    pub max_batch_size: usize,
    /// Longest wait for more images once the first is taken.
    pub max_queue_delay: Duration,
    /// Most images waiting at once; beyond it `submit` refuses.
    pub max_queue_images: usize,
}

/// Why one image got no probability.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum JobError {
    #[error("the request deadline passed while the image was queued")]
    DeadlineExceeded,
    #[error("inference failed: {0}")]
    Inference(String),
    #[error("the server is shutting down")]
    ShuttingDown,
}

/// What the engine thread reports for one image.
#[derive(Debug, Clone)]
pub struct JobOutput {
    /// Probability of leukemia.
    pub probability: f32,
    /// The features the card's OOD statistics are of, when it has statistics.
    pub features: Option<Vec<f32>>,
    /// Grad-CAM grid, when the job asked for it and the graph has it.
    pub gradcam: Option<Vec<f32>>,
    /// Time spent queued before its batch started.
    pub queue_time: Duration,
    /// Run time of the batch it was in.
    pub inference_time: Duration,
    /// Images in that batch.
    pub batch_size: usize,
}

/// One preprocessed image waiting for the model.
pub struct Job {
    /// `image_len` f32 values, NCHW for one image.
    pub tensor: Vec<f32>,
    /// The caller's deadline; past it the image is dropped before inference.
    pub deadline: Instant,
    /// Whether the caller wants the Grad-CAM map.
    pub explain: bool,
    enqueued: Instant,
    reply: oneshot::Sender<Result<JobOutput, JobError>>,
}

/// The queue is full: the caller should retry later.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("queue full: {queued} images waiting, limit {limit}")]
pub struct QueueFull {
    /// Images waiting when refused.
    pub queued: usize,
    /// The configured limit.
    pub limit: usize,
}

/// The handlers' side of the queue. Cheap to clone.
#[derive(Clone)]
pub struct BatchQueue {
    tx: mpsc::Sender<Job>,
    queued: Arc<AtomicUsize>,
    limit: usize,
    metrics: Arc<Metrics>,
}

/// Runs every batch size from 1 to `max_batch_size` through the engine so the first real request pays no set-up cost.
pub fn warm_up(
    engine: &mut Engine,
    max_batch_size: usize,
) -> Result<(), crate::engine::EngineError> {
    for batch in 1..=max_batch_size {
        engine.run_detailed(vec![0.5; batch * engine.image_len()], batch, true)?;
    }
    Ok(())
}

impl BatchQueue {
    /// Starts the engine thread and returns the queue handle and the thread's join handle.
    /// The thread ends when every `BatchQueue` clone is dropped and the queue is empty.
    /// The thread first warms up every batch size and reports the outcome through `on_warm`
    /// (images submitted meanwhile wait in the queue); if warm-up fails it stops serving.
    pub fn start(
        engine: Engine,
        config: BatchConfig,
        metrics: Arc<Metrics>,
        on_warm: impl FnOnce(Result<Duration, crate::engine::EngineError>) + Send + 'static,
    ) -> std::io::Result<(Self, std::thread::JoinHandle<()>)> {
        let (tx, rx) = mpsc::channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let worker = Worker {
            engine,
            rx,
            queued: queued.clone(),
            config: config.clone(),
            metrics: metrics.clone(),
        };
        let handle = std::thread::Builder::new()
            .name("leuknet-engine".into())
            .spawn(move || worker.run(on_warm))?;
        Ok((
            Self {
                tx,
                queued,
                limit: config.max_queue_images,
                metrics,
            },
            handle,
        ))
    }

    /// Images waiting now.
    pub fn depth(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }

    /// Queues all `tensors` of one request, or none of them if they do not fit. Returns one
    /// receiver per image, in order.
    #[allow(clippy::type_complexity)]
    pub fn submit(
        &self,
        tensors: Vec<Vec<f32>>,
        deadline: Instant,
        explain: bool,
    ) -> Result<Vec<oneshot::Receiver<Result<JobOutput, JobError>>>, QueueFull> {
        let n = tensors.len();
        let mut current = self.queued.load(Ordering::SeqCst);
        loop {
            if current + n > self.limit {
                return Err(QueueFull {
                    queued: current,
                    limit: self.limit,
                });
            }
            match self.queued.compare_exchange(
                current,
                current + n,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => break,
                Err(now) => current = now,
            }
        }
        self.metrics.queue_depth.add(n as i64);
        let now = Instant::now();
        let mut receivers = Vec::with_capacity(n);
        for tensor in tensors {
            let (reply, rx) = oneshot::channel();
            let job = Job {
                tensor,
                deadline,
                explain,
                enqueued: now,
                reply,
            };
            if let Err(mpsc::SendError(job)) = self.tx.send(job) {
                // The engine thread is gone: answer at once.
                self.queued.fetch_sub(1, Ordering::SeqCst);
                self.metrics.queue_depth.sub(1);
                let _ = job.reply.send(Err(JobError::ShuttingDown));
            }
            receivers.push(rx);
        }
        Ok(receivers)
    }
}

struct Worker {
    engine: Engine,
    rx: mpsc::Receiver<Job>,
    queued: Arc<AtomicUsize>,
    config: BatchConfig,
    metrics: Arc<Metrics>,
}

impl Worker {
    fn run(mut self, on_warm: impl FnOnce(Result<Duration, crate::engine::EngineError>)) {
        let start = Instant::now();
        match warm_up(&mut self.engine, self.config.max_batch_size) {
            Ok(()) => on_warm(Ok(start.elapsed())),
            Err(e) => {
                on_warm(Err(e));
                return;
            }
        }
        while let Some(batch) = self.next_batch() {
            self.execute(batch);
        }
        tracing::debug!("engine thread: queue closed, exiting");
    }

    /// Blocks for the first live job, then gathers up to the batch size, waiting at most the
    /// queue delay for stragglers. `None` when the queue is closed and empty.
    fn next_batch(&mut self) -> Option<Vec<Job>> {
        let mut batch = Vec::with_capacity(self.config.max_batch_size);
        loop {
            let first = self.rx.recv().ok()?;
            self.take(first, &mut batch);
            if !batch.is_empty() {
                break;
            }
        }
        let fill_until = Instant::now() + self.config.max_queue_delay;
        while batch.len() < self.config.max_batch_size {
            let job = match self.rx.try_recv() {
                Ok(job) => job,
                Err(mpsc::TryRecvError::Disconnected) => break,
                Err(mpsc::TryRecvError::Empty) => {
                    let now = Instant::now();
                    if now >= fill_until {
                        break;
                    }
                    match self.rx.recv_timeout(fill_until - now) {
                        Ok(job) => job,
                        Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                    }
                }
            };
            self.take(job, &mut batch);
        }
        Some(batch)
    }

    /// Moves a job out of the queue into the batch, unless its caller left or its deadline
    /// passed.
    fn take(&mut self, job: Job, batch: &mut Vec<Job>) {
        self.queued.fetch_sub(1, Ordering::SeqCst);
        self.metrics.queue_depth.sub(1);
        if job.reply.is_closed() {
            self.metrics
                .failures
                .with_label_values(&["client_gone"])
                .inc();
            return;
        }
        if Instant::now() >= job.deadline {
            self.metrics
                .failures
                .with_label_values(&["deadline_exceeded_queued"])
                .inc();
            let _ = job.reply.send(Err(JobError::DeadlineExceeded));
            return;
        }
        batch.push(job);
    }

    fn execute(&mut self, batch: Vec<Job>) {
        let n = batch.len();
        let image_len = self.engine.image_len();
        let mut input = Vec::with_capacity(n * image_len);
        let start = Instant::now();
        for job in &batch {
            input.extend_from_slice(&job.tensor);
        }
        let explain = batch.iter().any(|job| job.explain);
        let result = self.engine.run_detailed(input, n, explain);
        let inference_time = start.elapsed();
        self.metrics.batch_executions.inc();
        self.metrics.batch_size.observe(n as f64);
        self.metrics
            .inference_duration
            .observe(inference_time.as_secs_f64());
        match result {
            Ok(outputs) => {
                self.metrics.images_inferred.inc_by(n as u64);
                for (job, output) in batch.into_iter().zip(outputs) {
                    let queue_time = start.saturating_duration_since(job.enqueued);
                    self.metrics
                        .queue_duration
                        .observe(queue_time.as_secs_f64());
                    let _ = job.reply.send(Ok(JobOutput {
                        probability: output.probability,
                        features: output.vectors.into_iter().next(),
                        gradcam: output.gradcam.filter(|_| job.explain),
                        queue_time,
                        inference_time,
                        batch_size: n,
                    }));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, batch = n, "batch failed");
                self.metrics
                    .failures
                    .with_label_values(&["engine_error_images"])
                    .inc_by(n as u64);
                let message = e.to_string();
                for job in batch {
                    let _ = job.reply.send(Err(JobError::Inference(message.clone())));
                }
            }
        }
    }
}
