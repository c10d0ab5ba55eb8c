//! Graceful shutdown as one small type every binary passes to its tasks (as mini-redis's
//! `Shutdown`): `main` keeps the [`Stopper`], each task a clone of [`Shutdown`] it can wait on
//! or check between rounds. The process-level triggers live here too: [`signal`] (Ctrl-C or
//! SIGTERM; on a node SIGTERM means drain) and [`within_deadline`] (wait for something, e.g.
//! a drain, at most so long, cut short by a second signal).

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;

/// What a task holds to learn that the process is stopping.
#[derive(Debug, Clone)]
pub struct Shutdown {
    stopped: watch::Receiver<bool>,
}

/// What `main` holds to stop every task that holds a [`Shutdown`].
#[derive(Debug)]
pub struct Stopper {
    stopped: watch::Sender<bool>,
}

impl Shutdown {
    /// A new shutdown and the stopper that triggers it.
    pub fn new() -> (Stopper, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (Stopper { stopped: tx }, Shutdown { stopped: rx })
    }

    pub fn is_shutdown(&self) -> bool {
        *self.stopped.borrow()
    }

    /// Resolves once the process is stopping (at once if it already is, or if the stopper
    /// is gone: nobody can keep the process running then).
    pub async fn wait(&mut self) {
        let _ = self.stopped.wait_for(|stopped| *stopped).await;
    }
}

impl Stopper {
    /// Tells every [`Shutdown`] to stop; idempotent.
    pub fn stop(&self) {
        self.stopped.send_replace(true);
    }
}

/// Ctrl-C or SIGTERM.
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// Runs `server` until it ends or a signal comes; then tells every task to stop and lets the
/// server finish its open calls, for at most `grace` when given (`None` once it has run out).
/// Either way every task is told to stop before this returns.
pub async fn serve_until_signal<O>(
    server: impl Future<Output = O>,
    stopper: &Stopper,
    grace: Option<Duration>,
) -> Option<O> {
    tokio::pin!(server);
    let served = tokio::select! {
        served = &mut server => Some(served),
        () = signal() => {
            tracing::info!("signal received: stopping");
            stopper.stop();
            match grace {
                Some(grace) => tokio::time::timeout(grace, &mut server).await.ok(),
                None => Some(server.await),
            }
        }
    };
    stopper.stop();
    served
}

/// How waiting for something within a deadline ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Waited<T> {
    Done(T),
    /// The deadline passed first.
    TimedOut,
    /// A second signal came first: the operator does not want to wait.
    Interrupted,
}

/// Waits for `done` at most `deadline`; a signal meanwhile cuts the wait short.
pub async fn within_deadline<F: Future>(done: F, deadline: Duration) -> Waited<F::Output> {
    tokio::select! {
        out = tokio::time::timeout(deadline, done) => match out {
            Ok(out) => Waited::Done(out),
            Err(_) => Waited::TimedOut,
        },
        _ = signal() => Waited::Interrupted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_clone_sees_the_stop() {
        let (stopper, shutdown) = Shutdown::new();
        let mut a = shutdown.clone();
        let b = shutdown.clone();
        assert!(!b.is_shutdown());
        let waiting = tokio::spawn(async move {
            a.wait().await;
            a.is_shutdown()
        });
        stopper.stop();
        stopper.stop();
        assert!(waiting.await.unwrap());
        assert!(b.is_shutdown());
        let (gone, mut orphan) = Shutdown::new();
        drop(gone);
        tokio::time::timeout(Duration::from_secs(1), orphan.wait())
            .await
            .expect("a shutdown whose stopper is gone does not hang");
    }

    #[tokio::test]
    async fn a_deadline_bounds_the_wait() {
        let quick = within_deadline(async { 7 }, Duration::from_secs(5)).await;
        assert_eq!(quick, Waited::Done(7));
        let slow = within_deadline(std::future::pending::<()>(), Duration::from_millis(20)).await;
        assert_eq!(slow, Waited::TimedOut);
    }
}
