//! Long-lived UDP sockets to one upstream, shared by concurrent queries.
//!
//! Part of the forwarder (the miss path): opening a socket per query costs
//! socket, bind, connect, close and a reactor registration each time, which
//! dominated the uncached path. Instead each UDP upstream gets a small pool
//! of connected sockets, each bound to its own kernel-chosen (random)
//! ephemeral port, and every socket is replaced after a number of queries
//! or an age, so the source ports in use keep changing.
//!
//! Off-path spoofing defences stay what they were with one socket per
//! query: a fresh random 16-bit ID per attempt, never two queries in flight
//! with the same ID on one socket, a connected socket (the kernel drops
//! datagrams from any other address), and an answer delivered only when its
//! ID *and* question (name case-insensitive, type, class) match what was
//! asked. Anything else on the socket is ignored and counted in
//! [`DnsStats::upstream_mismatched`]; the query keeps waiting for its real
//! answer until the attempt timeout.
//!
//! One reader task per socket demultiplexes answers to the waiting queries
//! through a small table of oneshot senders keyed by ID. A retired socket's
//! reader stays until its last waiting query is answered or gives up, then
//! exits and the socket closes.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hickory_proto::op::{Message, Query};
use tokio::net::UdpSocket;
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

use super::{ForwardError, check_answer};
use crate::dns::audit::DnsStats;

/// Receive buffer for one upstream UDP answer. Upstreams are told Sluice
/// takes 1232-byte answers (`udp_payload`); 4 KiB covers any sane setting.
/// A larger datagram arrives cut short, fails to parse, and is ignored.
const UDP_ANSWER_BUFFER: usize = 4_096;
/// Random IDs tried before giving up on a socket whose ID space is crowded.
const ID_TRIES: usize = 16;

/// The answer as parsed and as received.
type Outcome = Result<(Message, Vec<u8>), ForwardError>;

/// The pooled sockets of one UDP upstream.
pub(crate) struct UdpPool {
    addr: SocketAddr,
    slots: Box<[Mutex<Option<Slot>>]>,
    next: AtomicUsize,
    max_queries: u32,
    max_age: Duration,
    stats: Arc<DnsStats>,
}

struct Slot {
    socket: Arc<PooledSocket>,
    uses: u32,
    born: Instant,
}

struct PooledSocket {
    io: UdpSocket,
    waiters: Mutex<HashMap<u16, Waiter, foldhash::fast::RandomState>>,
    /// Tells registrations apart when an ID is reused on this socket.
    seq: AtomicU64,
    retired: AtomicBool,
    /// Wakes the reader to check whether a retired socket may close.
    wake: Notify,
}

struct Waiter {
    seq: u64,
    question: Query,
    tx: oneshot::Sender<Outcome>,
}

/// A query waiting on a socket; removes its table entry when dropped (the
/// attempt timed out or was cancelled).
struct Registration {
    socket: Arc<PooledSocket>,
    id: u16,
    seq: u64,
}

impl std::fmt::Debug for UdpPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpPool")
            .field("addr", &self.addr)
            .field("sockets", &self.slots.len())
            .finish_non_exhaustive()
    }
}

impl UdpPool {
    pub(crate) fn new(
        addr: SocketAddr,
        sockets: usize,
        max_queries: u32,
        max_age: Duration,
        stats: Arc<DnsStats>,
    ) -> Self {
        Self {
            addr,
            slots: (0..sockets.max(1)).map(|_| Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
            max_queries: max_queries.max(1),
            max_age,
            stats,
        }
    }

    /// One UDP exchange: writes a fresh random ID into `query`, sends it on
    /// a pooled socket and waits for the matching answer. Bounded by the
    /// caller's attempt timeout.
    pub(crate) async fn exchange(&self, query: &mut [u8], question: &Query) -> Outcome {
        let addr = self.addr;
        let socket = self.pick()?;
        let (registration, answer) = socket.register(question).ok_or_else(|| ForwardError::Io {
            addr,
            source: std::io::Error::from(std::io::ErrorKind::WouldBlock),
        })?;
        if let Some(head) = query.get_mut(..2) {
            head.copy_from_slice(&registration.id.to_be_bytes());
        }
        socket
            .io
            .send(query)
            .await
            .map_err(|source| ForwardError::Io { addr, source })?;
        let outcome = answer.await.unwrap_or_else(|_| {
            Err(ForwardError::Io {
                addr,
                source: std::io::Error::from(std::io::ErrorKind::ConnectionAborted),
            })
        });
        drop(registration);
        outcome
    }

    /// The next socket in turn, replaced first if it has served its queries
    /// or its time.
    fn pick(&self) -> Result<Arc<PooledSocket>, ForwardError> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let mut slot = lock(&self.slots[i]);
        let now = Instant::now();
        if let Some(s) = slot.as_mut()
            && s.uses < self.max_queries
            && now.saturating_duration_since(s.born) < self.max_age
        {
            s.uses += 1;
            return Ok(Arc::clone(&s.socket));
        }
        // Opened before the old one closes, so the kernel gives it another port.
        let fresh = PooledSocket::open(self.addr, Arc::clone(&self.stats)).map_err(|source| ForwardError::Io {
            addr: self.addr,
            source,
        })?;
        let old = slot.replace(Slot {
            socket: Arc::clone(&fresh),
            uses: 1,
            born: now,
        });
        drop(slot);
        if let Some(old) = old {
            old.socket.retire();
        }
        Ok(fresh)
    }
}

impl Drop for UdpPool {
    fn drop(&mut self) {
        for slot in &self.slots {
            if let Some(s) = lock(slot).take() {
                s.socket.retire();
            }
        }
    }
}

impl PooledSocket {
    /// Binds a random ephemeral port, connects it to `addr` (the kernel then
    /// drops datagrams from anyone else, and an ICMP "port unreachable"
    /// surfaces as an error instead of a timeout) and starts its reader.
    fn open(addr: SocketAddr, stats: Arc<DnsStats>) -> std::io::Result<Arc<Self>> {
        let local: SocketAddr = match addr {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let std_socket = std::net::UdpSocket::bind(local)?;
        std_socket.connect(addr)?;
        std_socket.set_nonblocking(true)?;
        let socket = Arc::new(Self {
            io: UdpSocket::from_std(std_socket)?,
            waiters: Mutex::new(HashMap::default()),
            seq: AtomicU64::new(0),
            retired: AtomicBool::new(false),
            wake: Notify::new(),
        });
        tokio::spawn(read_loop(Arc::clone(&socket), addr, stats));
        Ok(socket)
    }

    /// Takes a random ID no other query on this socket is waiting with.
    fn register(self: &Arc<Self>, question: &Query) -> Option<(Registration, oneshot::Receiver<Outcome>)> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let mut waiters = lock(&self.waiters);
        for _ in 0..ID_TRIES {
            let id: u16 = rand::random();
            if let Entry::Vacant(slot) = waiters.entry(id) {
                let (tx, rx) = oneshot::channel();
                slot.insert(Waiter {
                    seq,
                    question: question.clone(),
                    tx,
                });
                let registration = Registration {
                    socket: Arc::clone(self),
                    id,
                    seq,
                };
                return Some((registration, rx));
            }
        }
        None
    }

    /// Hands a datagram to the query it answers, if any.
    fn deliver(&self, addr: SocketAddr, bytes: &[u8], stats: &DnsStats) {
        let Some(&[hi, lo]) = bytes.get(..2) else {
            DnsStats::bump(&stats.upstream_mismatched);
            return;
        };
        let id = u16::from_be_bytes([hi, lo]);
        let Some(waiter) = lock(&self.waiters).remove(&id) else {
            // Late (its query gave up) or forged.
            DnsStats::bump(&stats.upstream_mismatched);
            return;
        };
        match check_answer(addr, bytes, id, &waiter.question) {
            Ok(message) => {
                let _ = waiter.tx.send(Ok((message, bytes.to_vec())));
            }
            Err(_) => {
                // Right ID, wrong question (or garbage): not our answer. The
                // query keeps waiting for the real one.
                DnsStats::bump(&stats.upstream_mismatched);
                lock(&self.waiters).entry(id).or_insert(waiter);
            }
        }
    }

    /// An error on the socket (an ICMP "port unreachable" from the one
    /// upstream it is connected to): every query waiting on it fails over.
    fn fail_all(&self, addr: SocketAddr, error: &std::io::Error) {
        let waiters: Vec<Waiter> = lock(&self.waiters).drain().map(|(_, w)| w).collect();
        for w in waiters {
            let _ = w.tx.send(Err(ForwardError::Io {
                addr,
                source: std::io::Error::new(error.kind(), error.to_string()),
            }));
        }
    }

    fn retire(&self) {
        self.retired.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    fn finished(&self) -> bool {
        self.retired.load(Ordering::Acquire) && lock(&self.waiters).is_empty()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut waiters = lock(&self.socket.waiters);
        if waiters.get(&self.id).is_some_and(|w| w.seq == self.seq) {
            waiters.remove(&self.id);
        }
        let empty = waiters.is_empty();
        drop(waiters);
        if empty && self.socket.retired.load(Ordering::Acquire) {
            self.socket.wake.notify_one();
        }
    }
}

async fn read_loop(socket: Arc<PooledSocket>, addr: SocketAddr, stats: Arc<DnsStats>) {
    let mut buf = vec![0u8; UDP_ANSWER_BUFFER];
    while !socket.finished() {
        tokio::select! {
            r = socket.io.recv(&mut buf) => match r {
                Ok(n) => socket.deliver(addr, &buf[..n], &stats),
                Err(e) => socket.fail_all(addr, &e),
            },
            () = socket.wake.notified() => {}
        }
    }
}

/// A poisoned table still holds valid entries (see `bindings::lock`).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
