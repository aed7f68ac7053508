//! One listener's life as a task on the process's tracker: it accepts until told to stop and
//! closes its socket; then its connections either drain (for up to the drain timeout, then
//! the rest are cut) or, when the same address was bound again in its place (a move on its own
//! port that was undone), carry on as the connections of that new listener.
//!
//! Closing the socket and deciding what becomes of the connections are separate steps, so a
//! listener can be stopped to free its port before it is known whether it comes back.

use std::future::Future;

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Shared;
use crate::net::{self, Listener};

/// The connections of one listener (or of the listeners that took them over in turn): the
/// tracker they run on and the token that cuts them at the drain deadline.
#[derive(Clone, Default)]
pub(super) struct Conns {
    tracker: TaskTracker,
    kill: CancellationToken,
}

impl Conns {
    /// No connection yet.
    pub(super) fn new() -> Self {
        Self::default()
    }

    /// Lets the connections finish for up to `deadline`, or until `cut`, then cuts the rest.
    async fn drain(
        self,
        kind: &'static str,
        deadline: std::time::Duration,
        cut: CancellationToken,
    ) {
        self.tracker.close();
        let why = tokio::select! {
            () = self.tracker.wait() => return,
            () = tokio::time::sleep(deadline) => "drain deadline reached",
            () = cut.cancelled() => "told to stop at once",
        };
        tracing::warn!(
            listener = kind,
            open = self.tracker.len(),
            "{why}; closing the remaining connections"
        );
        self.kill.cancel();
        self.tracker.wait().await;
    }
}

/// A running listener's controls.
pub(super) struct ListenerHandle {
    stop: CancellationToken,
    closed: CancellationToken,
    conns: Conns,
    /// Kept until the fate of the connections is known: dropping it lets them drain once the
    /// socket is closed; sending on it hands them to a listener bound in its place.
    hand_over: oneshot::Sender<()>,
}

impl ListenerHandle {
    /// Stops accepting; the socket closes and the connections drain.
    pub(super) fn retire(self) {
        self.stop.cancel();
    }

    /// Stops accepting and closes the socket, but keeps the connections as they are until the
    /// returned [`Closing`] decides what becomes of them.
    pub(super) fn close(self) -> Closing {
        self.stop.cancel();
        Closing {
            closed: self.closed,
            conns: self.conns,
            hand_over: self.hand_over,
        }
    }
}

/// A listener told to stop whose connections wait for a decision: dropped, they drain (from
/// that moment); [`Closing::hand_over`] gives them to a listener bound again in its place.
pub(super) struct Closing {
    closed: CancellationToken,
    conns: Conns,
    hand_over: oneshot::Sender<()>,
}

impl Closing {
    /// Cancelled once the listening socket is closed.
    pub(super) fn closed(&self) -> &CancellationToken {
        &self.closed
    }

    /// The connections, for the listener bound again in this one's place: they are drained or
    /// cut with that listener's, never on this one's timer.
    pub(super) fn hand_over(self) -> Conns {
        // Err: the task has ended already, which it does not before a decision.
        let _ = self.hand_over.send(());
        self.conns
    }
}

/// Serves `listener` as a task on the shared tracker; each accepted connection runs `handle`
/// with the kill token of `conns`, and is tracked there.
pub(super) fn spawn<F, Fut>(
    shared: &Shared,
    listener: Listener,
    kind: &'static str,
    conns: Conns,
    handle: F,
) -> ListenerHandle
where
    F: Fn(net::Stream, CancellationToken) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let stop = CancellationToken::new();
    let closed = CancellationToken::new();
    let (hand_over, handed_over) = oneshot::channel();
    let workers = shared.workers.clone();
    let (deadline, cut) = (shared.drain_timeout, shared.cut.clone());
    let (accept_stop, released, task_conns) = (stop.clone(), closed.clone(), conns.clone());
    shared.tracker.spawn(async move {
        let kill = task_conns.kill.clone();
        net::accept_loop(
            listener,
            kind,
            accept_stop,
            task_conns.tracker.clone(),
            workers,
            move |s| handle(s, kill.clone()),
        )
        .await;
        // accept_loop owned the listener: its socket is closed now.
        released.cancel();
        if handed_over.await.is_err() {
            task_conns.drain(kind, deadline, cut).await;
        }
        // Otherwise the listener bound in its place owns them now.
    });
    ListenerHandle {
        stop,
        closed,
        conns,
        hand_over,
    }
}
