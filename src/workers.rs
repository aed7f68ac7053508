//! Worker threads for `-threads N` (N > 1): each runs its own single-threaded runtime, and
//! every accepted connection is handed to one of them, round-robin, for its whole life. A
//! connection never moves between threads (no cross-thread wakeups on the data path, which is
//! what made tokio's work-stealing runtime slower for request/response traffic), while
//! different connections use different cores. The control plane (agent watches, accept loops,
//! enforcement) stays on the main runtime.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::Handle;

/// Handles of the worker runtimes.
#[derive(Debug)]
pub struct Workers {
    handles: Vec<Handle>,
    next: AtomicUsize,
}

impl Workers {
    /// Starts `n` worker threads, each with a current-thread runtime that runs until the
    /// process exits.
    pub fn start(n: usize) -> std::io::Result<Arc<Self>> {
        let mut handles = Vec::with_capacity(n);
        for i in 0..n {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(runtime.handle().clone());
            std::thread::Builder::new()
                .name(format!("consul-proxy-worker-{i}"))
                .spawn(move || runtime.block_on(std::future::pending::<()>()))?;
        }
        Ok(Arc::new(Workers {
            handles,
            next: AtomicUsize::new(0),
        }))
    }

    /// The runtime for the next connection, and its index.
    pub fn pick(&self) -> (usize, &Handle) {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        (i, &self.handles[i])
    }

    /// How many workers there are.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }
}
