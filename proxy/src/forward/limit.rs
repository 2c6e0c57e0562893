//! Per-listener connection limit: the accept loop's back-pressure.
//!
//! A listener takes a permit *before* calling `accept`, and the permit lives
//! as long as the flow. At the limit the accept loop simply waits for a flow
//! to end; new connections queue in the kernel's backlog (and beyond it the
//! kernel drops SYNs, so clients retry) instead of the proxy running out of
//! descriptors or memory. Nothing errors and nothing crashes.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A cloneable limit on concurrent flows for one listener.
#[derive(Debug, Clone)]
pub struct ConnLimit {
    sem: Arc<Semaphore>,
    max: usize,
}

/// Held by a flow for its whole life; dropping it frees a slot.
#[derive(Debug)]
pub struct ConnPermit {
    _permit: OwnedSemaphorePermit,
}

impl ConnLimit {
    /// A limit of `max` concurrent flows; `0` means unlimited.
    pub fn new(max: usize) -> Self {
        let max = if max == 0 {
            Semaphore::MAX_PERMITS
        } else {
            max.min(Semaphore::MAX_PERMITS)
        };
        Self {
            sem: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    /// Waits for a free slot.
    pub async fn acquire(&self) -> ConnPermit {
        // The semaphore is never closed (we own it and never call `close`),
        // so acquisition cannot fail; fall back to an unbounded wait anyway
        // rather than panicking.
        match Arc::clone(&self.sem).acquire_owned().await {
            Ok(permit) => ConnPermit { _permit: permit },
            Err(_) => std::future::pending().await,
        }
    }

    /// A slot if one is free right now.
    pub fn try_acquire(&self) -> Option<ConnPermit> {
        Arc::clone(&self.sem)
            .try_acquire_owned()
            .ok()
            .map(|permit| ConnPermit { _permit: permit })
    }

    /// Waits for a slot, then accepts one connection. At the limit this does
    /// not call `accept` at all, which is what pauses accepting.
    pub async fn accept(&self, listener: &TcpListener) -> std::io::Result<(TcpStream, SocketAddr, ConnPermit)> {
        let permit = self.acquire().await;
        let (stream, peer) = listener.accept().await?;
        Ok((stream, peer, permit))
    }

    /// Changes the maximum (a reload changed `max_connections`). Raising it
    /// frees slots at once; lowering it takes slots away as flows end, so
    /// no open flow is cut and no new one starts until the count is under
    /// the new maximum.
    pub fn resize(&mut self, max: usize) {
        let max = if max == 0 {
            Semaphore::MAX_PERMITS
        } else {
            max.min(Semaphore::MAX_PERMITS)
        };
        if max > self.max {
            self.sem.add_permits(max - self.max);
        } else if max < self.max {
            let excess = self.max - max;
            let taken = self.sem.forget_permits(excess);
            if taken < excess {
                let sem = Arc::clone(&self.sem);
                let rest = u32::try_from(excess - taken).unwrap_or(u32::MAX);
                tokio::spawn(async move {
                    if let Ok(p) = sem.acquire_many_owned(rest).await {
                        p.forget();
                    }
                });
            }
        }
        self.max = max;
    }

    /// Flows currently holding a slot.
    pub fn in_use(&self) -> usize {
        self.max.saturating_sub(self.sem.available_permits())
    }

    /// The configured maximum (`Semaphore::MAX_PERMITS` when unlimited).
    pub fn max(&self) -> usize {
        self.max
    }
}
