//! `quic` listeners: QUIC on UDP, decided like TLS over TCP without
//! decrypting anything but the ClientHello.
//!
//! ```text
//! datagram ─► flow by (client address, original destination)
//!   new flow ─► quic: block → refused (`quic-blocked`)
//!            ─► hold datagrams, feed them to `classify::QuicInitial` until
//!               the ClientHello is whole (bounded in datagrams, bytes and
//!               `peek_timeout`)
//!            ─► the pipeline every TCP flow runs (`pipeline::Flow`):
//!               SNI/ALPN/ECH, chain, anti-evasion, policy, destination
//!               (SNI resolved, or the original destination held against
//!               the SNI), SSRF guard
//!            ─► allowed: a connected UDP socket to the upstream, the held
//!               datagrams sent, then datagrams relayed both ways until the
//!               flow idles for `idle_timeout`
//!            ─► refused: its record is written at once; its later
//!               datagrams are dropped until it idles, so a client's
//!               retransmitted Initials make no second record
//! ```
//!
//! UDP has no connection to accept or close: a flow is a 4-tuple, it starts
//! with its first datagram and ends when no datagram crossed it for
//! `idle_timeout` (or on a drain, a forced close, or a policy change that
//! denies it). One task reads the listener's socket and hands each datagram
//! to its flow's task through a short queue; a full queue drops the
//! datagram, as a congested network would, so one flow cannot stall the
//! others. A client whose NAT gives it a new port keeps its flow: the
//! connection ids its server chose are seen in the server's long-header
//! packets, and a short-header datagram from the same address and a new
//! port that carries one of them is taken as that flow's (a new address is
//! not: the flow was decided on its source; nor is a new port on a
//! listener whose filter chains match `source_ports`). Ids a client
//! switches to when it moves on purpose are announced encrypted and cannot
//! be read: such a datagram starts a flow of its own, refused
//! `quic-not-initial`, and the client reconnects, unless the listener says
//! `migration: same-address` and the address has exactly one flow relayed
//! to that destination (off by default: any host sharing the address
//! could take the flow's replies).
//! Under `TPROXY`
//! (`transparent: true`) each datagram's original
//! destination comes from `IP_ORIGDSTADDR`, and replies leave from that
//! address through a socket bound to it with `IP_TRANSPARENT`, so the
//! client sees its server answer.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sluice_api::Protocol;
use sluice_api::reason::ReasonCode;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::chain::{FilterChain, Front, Transport};
use super::pipeline::{Flow, Forward, Stop};
use super::{ActiveGuard, ListenerPlan, RelayedFlow, Shared, Snapshot};
use crate::classify::{Progress, QuicInitial, QuicLimits};
use crate::telemetry::metrics;

/// The largest UDP payload.
const MAX_DATAGRAM: usize = 65_535;
/// Datagrams waiting between the listener's task and one flow's; past
/// this, the flow's datagrams are dropped until it catches up.
const FLOW_QUEUE: usize = 128;
/// Bytes queued between the listener's task and one flow's, besides the
/// count: a flow waiting on a lookup reads nothing meanwhile, and each of
/// its 128 queued datagrams could be 64 KiB.
const FLOW_QUEUE_BYTES: usize = 256 * 1024;
/// Bytes queued to all the flows of one listener at once, beyond each
/// flow's [`FLOW_RESERVE_BYTES`]: past it a datagram is dropped, so flows
/// that stall cannot hold the process's memory (at most
/// `max_connections` × [`FLOW_QUEUE_BYTES`] otherwise).
const LISTENER_QUEUE_BYTES: usize = 32 << 20;
/// What every flow may queue whatever the others hold: a few datagrams of
/// a usual size, so flows stalled on purpose (a name that resolves
/// slowly, flooded meanwhile) cannot fill the listener's bound and stop
/// everyone else's.
const FLOW_RESERVE_BYTES: usize = 8 * 1024;
/// What an undecided flow may make Sluice hold for replay: a ClientHello
/// takes one to three Initials in practice (a post-quantum key share,
/// two), but a listener may accept hellos up to `peek.max_client_hello`,
/// and clients may add 0-RTT datagrams meanwhile. The bounds follow the
/// largest hello accepted (see [`HeldLimits`]); beyond them the flow is
/// refused (`classify-oversized`).
const MIN_HELD_DATAGRAMS: usize = 32;
const MIN_HELD_BYTES: usize = 64 * 1024;
/// The ClientHello bytes an Initial packet is taken to carry at least
/// when sizing the bounds: a 1,200-byte Initial has room for about 1,150.
const HELLO_PER_INITIAL: usize = 1000;
/// Datagrams held beyond those the hello needs (0-RTT, retransmissions).
const EXTRA_HELD_DATAGRAMS: usize = 16;
/// A held datagram's size when sizing the byte bound: the largest UDP
/// payload on an Ethernet path.
const HELD_DATAGRAM_SIZE: usize = 1500;
/// The socket buffer asked for (best effort): a relay of bulk QUIC
/// through one socket drops datagrams with the default ~200 KiB.
const SOCKET_BUFFER: usize = 4 << 20;

/// A flow: who sent, and to where before `TPROXY` (`None` when not
/// transparent: every datagram went to the listener).
type Key = (SocketAddr, Option<SocketAddr>);

/// Binds the UDP socket of a `quic` listener. A transparent one asks for
/// `IP_TRANSPARENT` (without the capability only datagrams addressed to
/// the listener arrive, and they have no original destination) and for
/// each datagram's original destination.
pub fn bind(plan: &ListenerPlan) -> io::Result<UdpSocket> {
    let addr = plan.spec.address;
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::DGRAM, None)?;
    socket.set_nonblocking(true)?;
    if addr.is_ipv6() {
        // `[::]` takes IPv4 too, as users expect of a wildcard.
        let _ = socket.set_only_v6(false);
    }
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    receive_options(&socket, &plan.spec.name, addr, plan.spec.transparent)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

/// Sets a `quic` listener's socket up to receive as `transparent` says,
/// and turns the other way's options off, so a reload that changes
/// `transparent` keeps the bound socket (binding a second one to the same
/// address would fail while the first serves).
///
/// Transparent: `IP_TRANSPARENT` (without the capability only datagrams
/// addressed to the listener arrive, and they have no original
/// destination) and each datagram's original destination. Otherwise, on a
/// wildcard address, the local address each datagram was sent to: the
/// listener answers from it (a VIP, another interface's address), not
/// from whatever the route back picks, as a QUIC client drops datagrams
/// from another address.
///
/// The option the new way needs is set first: when it fails, nothing has
/// changed and the error says why. The old way's options are cleared after
/// (clearing needs no capability; a leftover would only add a control
/// message that the new way's reads skip).
fn receive_options(socket: &impl AsFd, name: &str, addr: SocketAddr, transparent: bool) -> io::Result<()> {
    let fd = socket.as_fd();
    let v6 = addr.is_ipv6();
    if transparent {
        crate::sys::set_recv_orig_dst(fd, v6, true)?;
        if let Err(e) = crate::sys::set_ip_transparent_to(&fd, true) {
            tracing::warn!(listener = %name, error = %e, "IP_TRANSPARENT not set; TPROXY datagrams will not arrive");
        }
        #[cfg(target_os = "linux")]
        let _ = crate::sys::set_pktinfo(fd, v6, false);
    } else {
        #[cfg(target_os = "linux")]
        if addr.ip().is_unspecified() {
            crate::sys::set_pktinfo(fd, v6, true)?;
        }
        let _ = crate::sys::set_ip_transparent_to(&fd, false);
        let _ = crate::sys::set_recv_orig_dst(fd, v6, false);
    }
    Ok(())
}

/// How a listener bound to `bound` reads its socket.
fn receive_mode(transparent: bool, bound: Option<SocketAddr>) -> Receive {
    if transparent {
        Receive::Transparent
    } else if bound.is_some_and(|b| b.ip().is_unspecified()) {
        Receive::WithLocal
    } else {
        Receive::Plain
    }
}

/// A datagram on its way to its flow, with who sent it (a client behind a
/// NAT that rebinds keeps its flow from a new port).
#[derive(Debug)]
struct Datagram {
    from: SocketAddr,
    data: Vec<u8>,
    /// The local address it was sent to, on a wildcard listener.
    to: Option<IpAddr>,
    /// Its bytes, counted against its flow's queue and its listener's
    /// while it waits; `None` until it is queued.
    charge: Option<Charge>,
}

/// The bytes waiting in one flow's queue, and in all its listener's.
#[derive(Debug, Default)]
struct Queued {
    flow: AtomicUsize,
    listener: Arc<AtomicUsize>,
}

impl Queued {
    fn new(listener: &Arc<AtomicUsize>) -> Arc<Self> {
        Arc::new(Self {
            flow: AtomicUsize::new(0),
            listener: listener.clone(),
        })
    }
}

/// A queued datagram's share of [`Queued`], given back when the flow takes
/// its bytes (or drops it).
#[derive(Debug)]
struct Charge {
    to: Arc<Queued>,
    len: usize,
    /// The part counted against the listener's bound: what lay past the
    /// flow's reserve when it was queued.
    shared: usize,
}

impl Charge {
    /// Charges `d` to `to`; `false` when either bound would be passed. Only
    /// the listener's task charges, so a check then an add cannot race
    /// another charge (a flow's task only gives back).
    fn charge(to: &Arc<Queued>, d: &mut Datagram) -> bool {
        let len = d.data.len();
        let held = to.flow.load(Ordering::Relaxed);
        if held + len > FLOW_QUEUE_BYTES {
            return false;
        }
        let shared = (held + len).saturating_sub(FLOW_RESERVE_BYTES) - held.saturating_sub(FLOW_RESERVE_BYTES);
        if shared > 0 && to.listener.load(Ordering::Relaxed) + shared > LISTENER_QUEUE_BYTES {
            return false;
        }
        to.flow.fetch_add(len, Ordering::Relaxed);
        to.listener.fetch_add(shared, Ordering::Relaxed);
        d.charge = Some(Charge {
            to: to.clone(),
            len,
            shared,
        });
        true
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.to.flow.fetch_sub(self.len, Ordering::Relaxed);
        self.to.listener.fetch_sub(self.shared, Ordering::Relaxed);
    }
}

/// How much an undecided flow may make Sluice hold, for a listener that
/// accepts hellos of up to `max_client_hello` bytes: enough Initials to
/// carry one, some datagrams more, and their bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct HeldLimits {
    initials: usize,
    datagrams: usize,
    bytes: usize,
}

impl HeldLimits {
    fn for_hello(max_client_hello: usize) -> Self {
        let initials = max_client_hello
            .div_ceil(HELLO_PER_INITIAL)
            .max(QuicLimits::default().max_initial_packets);
        let datagrams = (initials + EXTRA_HELD_DATAGRAMS).max(MIN_HELD_DATAGRAMS);
        Self {
            initials,
            datagrams,
            bytes: (datagrams * HELD_DATAGRAM_SIZE).max(MIN_HELD_BYTES),
        }
    }
}

/// What a flow's task tells the listener's.
#[derive(Debug)]
enum Event {
    /// The flow ended: its key, and its serial (the key may already name
    /// a later flow).
    Ended { key: Key, serial: u64 },
    /// The server named a connection id of its own (the Source Connection
    /// ID of a long-header packet): the client's short-header packets
    /// carry it, which is how they are recognised from a new port.
    ServerCid { key: Key, serial: u64, cid: Vec<u8> },
    /// The flow was refused and recorded; it only swallows its client's
    /// retransmissions now, so its slot may go to a new flow.
    Refused { key: Key, serial: u64 },
    /// The flow was allowed and is relayed: its slot is no longer one a
    /// new flow may take.
    Decided { key: Key, serial: u64 },
}

/// Connection ids remembered per flow, and flows a rebinding client may
/// reach under other keys: enough for the server's first ids.
const MAX_CIDS_PER_FLOW: usize = 4;
const MAX_ALIASES_PER_FLOW: usize = 4;
/// The shortest server connection id a rebinding client is followed by.
/// A shorter one is too easy to guess or to cover: a server a policy
/// allows could hand out one-byte ids and catch other clients' datagrams.
const MIN_FOLLOWED_CID: usize = 8;
/// How long a flow's client port must have been silent before replies go
/// to a new port the client's datagrams came from: a NAT that rebinds
/// never uses the old port again, while a sender that merely knows the
/// server's connection id cannot take the replies of a client still
/// talking.
const REBIND_QUIET: Duration = Duration::from_secs(1);

/// What the listener's task keeps of a flow.
#[derive(Debug)]
struct Entry {
    tx: mpsc::Sender<Datagram>,
    /// Tells this flow from a later one of the same key.
    serial: u64,
    /// The key the flow started under, for a key a rebinding client
    /// reached it by; `None` for that first key.
    alias_of: Option<Key>,
    /// Other keys that reach this flow (first key only).
    aliases: Vec<Key>,
    /// Classified and allowed or refused: no longer in its Initial phase.
    decided: bool,
    /// The server's connection ids seen on this flow (first key only).
    cids: Vec<Vec<u8>>,
    /// What its queue holds (shared by every key of the flow).
    queued: Arc<Queued>,
}

/// The listener's flows, by key, and the server connection ids that let a
/// client whose NAT changed its port keep its flow.
#[derive(Debug, Default)]
struct Table {
    flows: HashMap<Key, Entry>,
    /// Each id's flow: its first key and serial.
    cids: HashMap<Vec<u8>, (Key, u64)>,
    /// The lengths of the ids in `cids` (a short header does not say how
    /// long its connection id is).
    cid_lens: Vec<usize>,
    /// Refused flows still swallowing, oldest first: the slots a new flow
    /// takes when the table is full, so datagrams that do not classify
    /// (a flood from spoofed sources, say) cannot keep real clients out
    /// for a whole idle timeout.
    refused: std::collections::VecDeque<(Key, u64)>,
    /// The first keys of the flows being relayed, by client address and
    /// destination, for `migration: same-address`.
    relaying: HashMap<(IpAddr, Option<SocketAddr>), Vec<Key>>,
    /// Every flow in the order it started, for the oldest still in its
    /// Initial phase: the slot a new flow takes when no refused flow is
    /// left (Initials that never complete a ClientHello, forged from
    /// spoofed sources, then cannot fill the table for a `peek_timeout`).
    pending: std::collections::VecDeque<(Key, u64)>,
}

impl Table {
    fn len(&self) -> usize {
        self.flows.len()
    }

    fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// Applies what a flow's task reported.
    fn event(&mut self, e: Event) {
        match e {
            Event::Ended { key, serial } => self.remove_flow(key, serial),
            Event::Decided { key, serial } => {
                if let Some(e) = self.flows.get_mut(&key).filter(|e| e.serial == serial) {
                    e.decided = true;
                    self.relaying.entry((key.0.ip(), key.1)).or_default().push(key);
                }
            }
            Event::Refused { key, serial } => {
                if let Some(e) = self.flows.get_mut(&key).filter(|e| e.serial == serial) {
                    e.decided = true;
                    self.refused.push_back((key, serial));
                    self.not_relaying(key);
                }
                // Flows that ended on their own leave stale entries: drop
                // them once they outnumber the table, so this stays
                // bounded by it (amortised, one pass per doubling).
                if self.refused.len() > 2 * self.flows.len() + 16 {
                    let flows = &self.flows;
                    self.refused
                        .retain(|(k, s)| flows.get(k).is_some_and(|e| e.serial == *s));
                }
            }
            Event::ServerCid { key, serial, cid } => {
                let Some(entry) = self.flows.get_mut(&key).filter(|e| e.serial == serial) else {
                    return;
                };
                if cid.len() < MIN_FOLLOWED_CID || entry.cids.len() >= MAX_CIDS_PER_FLOW || self.cids.contains_key(&cid)
                {
                    return;
                }
                if !self.cid_lens.contains(&cid.len()) {
                    self.cid_lens.push(cid.len());
                }
                entry.cids.push(cid.clone());
                self.cids.insert(cid, (key, serial));
            }
        }
    }

    /// Forgets the flow first seen as `key` (if `serial` is still its):
    /// every key that reaches it and every connection id it had.
    fn remove_flow(&mut self, key: Key, serial: u64) {
        if self.flows.get(&key).is_none_or(|e| e.serial != serial) {
            return;
        }
        if let Some(entry) = self.flows.remove(&key) {
            self.not_relaying(key);
            for a in entry.aliases {
                if self.flows.get(&a).is_some_and(|e| e.serial == serial) {
                    self.flows.remove(&a);
                }
            }
            for c in entry.cids {
                self.cids.remove(&c);
            }
        }
    }

    /// `key` no longer names a flow being relayed.
    fn not_relaying(&mut self, key: Key) {
        let at = (key.0.ip(), key.1);
        if let Some(keys) = self.relaying.get_mut(&at) {
            keys.retain(|k| *k != key);
            if keys.is_empty() {
                self.relaying.remove(&at);
            }
        }
    }

    /// The first key of the flow a short-header datagram from a new key
    /// belongs to. It comes from the same address (only the port changed)
    /// to the same destination, and carries a connection id the flow's
    /// server chose in the handshake (a NAT that rebinds: the client does
    /// not know it moved). A new address is not taken for the same
    /// client: the flow was decided on its source. A client that moves on
    /// purpose switches to an id it was given encrypted, which cannot be
    /// read: with `by_address` (`migration: same-address`) it is followed
    /// when its address has exactly one flow relayed to that destination;
    /// otherwise its datagrams start a flow of their own, refused
    /// `quic-not-initial`, and it reconnects. (Following by address alone
    /// lets any host that shares the address, behind the same NAT say,
    /// take the flow's replies: hence off by default.)
    fn rebound(&self, key: Key, data: &[u8], by_address: bool) -> Option<Key> {
        let first = *data.first()?;
        if first & 0x80 != 0 {
            return None;
        }
        // The longest id that matches: a shorter one that happens to be
        // a prefix of it names another flow.
        let mut lens = self.cid_lens.clone();
        lens.sort_unstable_by(|a, b| b.cmp(a));
        let by_cid = lens.iter().find_map(|len| {
            let id = data.get(1..1 + len)?;
            let (owner, serial) = *self.cids.get(id)?;
            let live = self.flows.get(&owner).is_some_and(|e| e.serial == serial);
            (live && owner.0.ip() == key.0.ip() && owner.1 == key.1).then_some(owner)
        });
        by_cid.or_else(|| {
            if !by_address {
                return None;
            }
            match self.relaying.get(&(key.0.ip(), key.1))?.as_slice() {
                [only] => Some(*only),
                _ => None,
            }
        })
    }

    /// Frees a slot for a new flow in a full table: the oldest refused
    /// flow still swallowing, else the oldest flow still in its Initial
    /// phase (its task ends when its queue closes; a flow evicted there is
    /// recorded as refused with `peek-timeout`: its Initial phase ended
    /// without a whole ClientHello). `false` when neither exists.
    fn evict(&mut self) -> bool {
        while let Some((key, serial)) = self.refused.pop_front() {
            if self.flows.get(&key).is_some_and(|e| e.serial == serial) {
                self.remove_flow(key, serial);
                return true;
            }
        }
        while let Some((key, serial)) = self.pending.pop_front() {
            if self.flows.get(&key).is_some_and(|e| e.serial == serial && !e.decided) {
                self.remove_flow(key, serial);
                return true;
            }
        }
        false
    }

    /// Notes a new flow's start; the list of starts is compacted when it
    /// outnumbers the table, so it stays bounded by it.
    fn started(&mut self, key: Key, serial: u64) {
        self.pending.push_back((key, serial));
        if self.pending.len() > 2 * self.flows.len() + 16 {
            let flows = &self.flows;
            self.pending
                .retain(|(k, s)| flows.get(k).is_some_and(|e| e.serial == *s && !e.decided));
        }
    }

    /// Makes `key` reach the flow first seen as `owner`, and hands it
    /// `datagram`; `false` when that flow is gone. A flow with
    /// [`MAX_ALIASES_PER_FLOW`] other keys already gives up the oldest:
    /// a client whose NAT keeps moving it is followed to its newest port
    /// (and a port given up is taken back by its next datagram).
    fn alias(&mut self, key: Key, owner: Key, datagram: Datagram) -> bool {
        let Some(entry) = self.flows.get_mut(&owner) else {
            return false;
        };
        let serial = entry.serial;
        if entry.aliases.len() >= MAX_ALIASES_PER_FLOW {
            let oldest = entry.aliases.remove(0);
            if self
                .flows
                .get(&oldest)
                .is_some_and(|e| e.serial == serial && e.alias_of == Some(owner))
            {
                self.flows.remove(&oldest);
            }
        }
        let Some(entry) = self.flows.get_mut(&owner) else {
            return false;
        };
        let (tx, queued) = (entry.tx.clone(), entry.queued.clone());
        entry.aliases.push(key);
        let mut datagram = datagram;
        if Charge::charge(&queued, &mut datagram) {
            let _ = tx.try_send(datagram);
        }
        self.flows.insert(
            key,
            Entry {
                tx,
                serial,
                alias_of: Some(owner),
                aliases: Vec::new(),
                decided: true,
                cids: Vec::new(),
                queued,
            },
        );
        true
    }
}

/// Serves `quic` listener `name` on `socket` until `stop` turns true, then
/// keeps relaying the flows it has (refusing new ones) until they end or
/// `closing` is cancelled (the listener is gone and its drain is over).
/// `applied` gets the generation of each configuration installed (see
/// [`Shared::generation`]) once the socket receives as it says, so a
/// reload can return only then.
pub fn spawn(
    name: Arc<str>,
    socket: UdpSocket,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    closing: CancellationToken,
    applied: watch::Sender<u64>,
) -> JoinHandle<()> {
    let bound = socket.local_addr().ok();
    let mut transparent = shared.snapshot.load().plan(&name).is_some_and(|p| p.spec.transparent);
    let mut mode = receive_mode(transparent, bound);
    // Each configuration installed: a reload may change `transparent`.
    let mut installs = shared.control.subscribe();
    let _ = applied.send(installs.borrow_and_update().generation);
    tokio::spawn(async move {
        let socket = Arc::new(socket);
        let mut table = Table::default();
        let (events_tx, mut events) = mpsc::unbounded_channel::<Event>();
        let mut buf = vec![0u8; MAX_DATAGRAM];
        // `recv_batch`'s result, kept for the listener's life.
        let mut got_meta = Vec::new();
        let mut serial = 0u64;
        let mut draining = false;
        let queued = Arc::new(AtomicUsize::new(0));
        let mut own = own_addresses(&shared.snapshot.load());
        let mut follows = follows(&shared.snapshot.load(), &name);
        // Made once for the listener's life: subscribing per datagram
        // would take a lock per datagram.
        let stopped = stop.wait_for(|v| *v);
        tokio::pin!(stopped);
        let gone = closing.cancelled();
        tokio::pin!(gone);
        let forced = shared.forced();
        tokio::pin!(forced);
        loop {
            if draining && table.is_empty() {
                break;
            }
            let got = tokio::select! {
                biased;
                _ = &mut stopped, if !draining => {
                    draining = true;
                    continue;
                }
                () = &mut gone => break,
                () = &mut forced => break,
                Some(e) = events.recv() => {
                    table.event(e);
                    continue;
                }
                Ok(()) = installs.changed() => {
                    let generation = installs.borrow_and_update().generation;
                    let snapshot = shared.snapshot.load();
                    own = own_addresses(&snapshot);
                    follows = self::follows(&snapshot, &name);
                    // Only a plan that keeps this socket (the same address,
                    // as bound or as `:0`) says how it receives: a listener
                    // removed or moved leaves this one draining as it was.
                    let now = snapshot
                        .plan(&name)
                        .filter(|p| bound.is_some_and(|b| same_socket(p.spec.address, b)))
                        .map(|p| p.spec.transparent);
                    if !draining && let (Some(now), Some(addr)) = (now, bound) && now != transparent {
                        match receive_options(&*socket, &name, addr, now) {
                            Ok(()) => {
                                transparent = now;
                                mode = receive_mode(now, bound);
                                tracing::info!(listener = %name, transparent = now, "quic listener now receives as configured");
                            }
                            Err(e) => {
                                tracing::warn!(listener = %name, error = %e, "cannot change how the quic listener receives; it goes on as before");
                            }
                        }
                    }
                    let _ = applied.send(generation);
                    continue;
                }
                r = receive(&socket, &mut buf, mode, &mut got_meta) => r,
            };
            let (len, src, orig, to) = match got {
                Ok(g) => g,
                Err(e) => {
                    tracing::debug!(listener = %name, error = %e, "quic receive failed");
                    metrics::errors("quic-receive", 1);
                    continue;
                }
            };
            // A datagram sent to the listener itself was not intercepted:
            // keyed as on a listener that is not transparent, so a flow
            // keeps its key when a reload changes `transparent`.
            let orig = orig.filter(|o| !sent_to(bound, &own, *o));
            let mut datagram = Datagram {
                from: src,
                data: buf.get(..len).unwrap_or_default().to_vec(),
                to,
                charge: None,
            };
            let key = (src, orig);
            let datagram = match table.flows.get(&key) {
                None => datagram,
                Some(entry) if !Charge::charge(&entry.queued, &mut datagram) => {
                    metrics::errors("quic-queue-full", 1);
                    continue;
                }
                Some(entry) => match entry.tx.try_send(datagram) {
                    Ok(()) => continue,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        metrics::errors("quic-queue-full", 1);
                        continue;
                    }
                    // The flow ended before its end reached us: this
                    // datagram starts a new one.
                    Err(mpsc::error::TrySendError::Closed(mut d)) => {
                        let serial = entry.serial;
                        let first = entry.alias_of.unwrap_or(key);
                        table.event(Event::Ended { key: first, serial });
                        table.flows.remove(&key);
                        d.charge = None;
                        d
                    }
                },
            };
            if follows.rebinding
                && let Some(owner) = table.rebound(key, &datagram.data, follows.address)
            {
                if !table.alias(key, owner, datagram) {
                    metrics::errors("quic-flow-limit", 1);
                }
                continue;
            }
            if draining {
                continue;
            }
            serial += 1;
            let flow = NewFlow {
                key,
                serial,
                first: datagram,
            };
            start_flow(
                &name, &shared, &socket, bound, &closing, flow, &events_tx, &mut table, &queued,
            );
        }
    })
}

/// A flow's key, serial and first datagram.
#[derive(Debug)]
struct NewFlow {
    key: Key,
    serial: u64,
    first: Datagram,
}

/// Starts the task of a new flow with its first datagram, unless the
/// listener holds `max_connections` flows already (the datagram is then
/// dropped and counted: a record per dropped datagram would let a flood
/// fill the audit log).
#[allow(
    clippy::too_many_arguments,
    reason = "the listener loop's state, lent once per new flow"
)]
fn start_flow(
    name: &Arc<str>,
    shared: &Arc<Shared>,
    socket: &Arc<UdpSocket>,
    bound: Option<SocketAddr>,
    closing: &CancellationToken,
    new: NewFlow,
    events: &mpsc::UnboundedSender<Event>,
    table: &mut Table,
    listener_queued: &Arc<AtomicUsize>,
) {
    let snapshot = shared.snapshot.load_full();
    // Between a reload that removed this listener and the stop reaching
    // the loop: not ours to serve any more.
    let Some(plan) = snapshot.plan(name).cloned() else {
        return;
    };
    if table.len() >= plan.connection().max_connections && !table.evict() {
        metrics::errors("quic-flow-limit", 1);
        return;
    }
    let NewFlow { key, serial, mut first } = new;
    let first_to = first.to;
    let queued = Queued::new(listener_queued);
    if !Charge::charge(&queued, &mut first) {
        metrics::errors("quic-queue-full", 1);
        return;
    }
    let (tx, rx) = mpsc::channel(FLOW_QUEUE);
    if tx.try_send(first).is_err() {
        return;
    }
    table.flows.insert(
        key,
        Entry {
            tx,
            serial,
            alias_of: None,
            aliases: Vec::new(),
            decided: false,
            cids: Vec::new(),
            queued,
        },
    );
    table.started(key, serial);
    let start = Start {
        plan,
        snapshot,
        shared: shared.clone(),
        listener: socket.clone(),
        src: key.0,
        orig: key.1,
        bound,
        local: first_to,
        closing: closing.clone(),
        key,
        serial,
        events: events.clone(),
    };
    drop(tokio::spawn(async move {
        let events = start.events.clone();
        run(start, rx).await;
        let _ = events.send(Event::Ended { key, serial });
    }));
}

/// Receives one datagram: its length in `buf`, its sender, (on a
/// transparent listener) its original destination, and (on a wildcard
/// one) the local address it was sent to.
async fn receive(
    socket: &UdpSocket,
    buf: &mut Vec<u8>,
    mode: Receive,
    meta: &mut Vec<crate::sys::Received>,
) -> io::Result<(usize, SocketAddr, Option<SocketAddr>, Option<IpAddr>)> {
    match mode {
        Receive::Plain => {
            let (n, src) = socket.recv_from(buf).await?;
            return Ok((n, src, None, None));
        }
        #[cfg(target_os = "linux")]
        Receive::WithLocal => loop {
            socket.readable().await?;
            match socket.try_io(tokio::io::Interest::READABLE, || {
                crate::sys::recv_batch(socket.as_fd(), std::slice::from_mut(buf), meta)
            }) {
                Ok(()) => {
                    if let Some(&(n, src, local)) = meta.first() {
                        return Ok((n, src, None, local));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        },
        #[cfg(not(target_os = "linux"))]
        Receive::WithLocal => {
            let _ = meta;
            let (n, src) = socket.recv_from(buf).await?;
            return Ok((n, src, None, None));
        }
        Receive::Transparent => {}
    }
    loop {
        socket.readable().await?;
        match socket.try_io(tokio::io::Interest::READABLE, || {
            crate::sys::recv_orig_dst(socket.as_fd(), buf)
        }) {
            Ok(d) => return Ok((d.len, d.src, d.orig_dst, None)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

/// How a listener's socket is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Receive {
    /// A listener bound to one address.
    Plain,
    /// A wildcard listener: each datagram with the local address it was
    /// sent to (`IP_PKTINFO`), to answer from it.
    WithLocal,
    /// A transparent listener: each datagram with its original destination.
    Transparent,
}

/// Sends `data` to `to` on the listener's socket, from `from` when given
/// (a wildcard listener answers from the address the client sent to).
async fn send_from(socket: &UdpSocket, data: &[u8], to: SocketAddr, from: Option<IpAddr>) -> io::Result<usize> {
    #[cfg(target_os = "linux")]
    if let Some(from) = from {
        loop {
            socket.writable().await?;
            match socket.try_io(tokio::io::Interest::WRITABLE, || {
                crate::sys::send_batch(socket.as_fd(), &[(data, to, Some(from))])
            }) {
                Ok(_) => return Ok(data.len()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = from;
    socket.send_to(data, to).await
}

/// What a flow's task starts from.
#[derive(Debug)]
struct Start {
    plan: Arc<ListenerPlan>,
    snapshot: Arc<Snapshot>,
    shared: Arc<Shared>,
    /// The listener's socket: replies to a non-transparent flow leave
    /// from it.
    listener: Arc<UdpSocket>,
    src: SocketAddr,
    orig: Option<SocketAddr>,
    bound: Option<SocketAddr>,
    /// The local address the flow's first datagram was sent to, on a
    /// wildcard listener: its replies leave from it.
    local: Option<IpAddr>,
    closing: CancellationToken,
    /// The flow's first key and serial, as the listener knows it.
    key: Key,
    serial: u64,
    /// To the listener's task: the server's connection ids.
    events: mpsc::UnboundedSender<Event>,
}

/// One flow, from its first datagram to its record.
async fn run(start: Start, mut rx: mpsc::Receiver<Datagram>) {
    let shared = start.shared.clone();
    let active = ActiveGuard::new(&shared);
    let gauge = start.plan.metrics.active();
    let mut flow = Flow::new(&shared, &start.plan, start.src, start.snapshot.clone(), Instant::now());
    flow.ctx.protocol = Protocol::Quic;
    let mut held = Vec::new();
    let decided = match front(&mut flow, &start, &mut rx, &mut held).await {
        Ok(()) => {
            // What the client dialled: on a wildcard listener, the local
            // address its datagram was sent to.
            let dialled = match (start.local, start.bound) {
                (Some(ip), Some(b)) => Some(SocketAddr::new(ip, b.port())),
                _ => start.bound,
            };
            flow.decide(&shared, Transport::Tls, dialled).await
        }
        Err(stop) => Err(stop),
    };
    let idle = start.plan.connection().idle_timeout;
    match decided {
        Ok(fwd) => {
            let _ = start.events.send(Event::Decided {
                key: start.key,
                serial: start.serial,
            });
            relay(&start, flow, fwd, &mut rx, held).await;
            // Recorded. The client may still send (after a policy change
            // ended the flow, say): swallowed, as for a refused flow, so
            // one connection never makes a second (refused) record.
            let _ = start.events.send(Event::Refused {
                key: start.key,
                serial: start.serial,
            });
            swallow(&start, &mut rx, idle).await;
        }
        Err(stop) => {
            flow.end(&shared, stop);
            // Recorded: no longer an active flow. Its later datagrams
            // (retransmitted Initials) are swallowed until it idles, so
            // they neither reach anyone nor make another record; its slot
            // goes to a new flow if the table fills meanwhile.
            drop((active, gauge));
            let _ = start.events.send(Event::Refused {
                key: start.key,
                serial: start.serial,
            });
            swallow(&start, &mut rx, idle).await;
        }
    }
}

/// What the client showed before anything is decided: where it was going
/// (transparent), and its ClientHello, from the Initials of the datagrams
/// held in `held` for replay.
async fn front(
    flow: &mut Flow,
    start: &Start,
    rx: &mut mpsc::Receiver<Datagram>,
    held: &mut Vec<Vec<u8>>,
) -> Result<(), Stop> {
    let plan = &start.plan;
    if plan.needs_original || plan.spec.original_dst {
        // A datagram sent to the listener itself was not intercepted.
        let own = own_addresses(&start.snapshot);
        match start.orig.filter(|a| !sent_to(start.bound, &own, *a)) {
            Some(a) => {
                flow.ctx.original_dst = Some(a);
                flow.ctx.port = a.port();
            }
            None if plan.needs_original => return Err(flow.refuse(ReasonCode::NoOriginalDestination)),
            None => {}
        }
    }
    let Front::Quic { peek, block, .. } = &plan.spec.front else {
        // A plan of another kind never reaches this listener; refuse
        // rather than relay what was not classified.
        return Err(flow.refuse(ReasonCode::NoFilterChain));
    };
    if *block {
        return Err(flow.refuse(ReasonCode::QuicBlocked));
    }
    let held_limits = HeldLimits::for_hello(peek.max_client_hello);
    let limits = QuicLimits {
        max_client_hello: peek.max_client_hello,
        max_initial_packets: held_limits.initials,
    };
    let mut initial = QuicInitial::new(limits);
    let deadline = tokio::time::Instant::now() + peek.peek_timeout;
    let started = Instant::now();
    let mut held_bytes = 0usize;
    let hello = loop {
        let next = tokio::select! {
            biased;
            () = start.shared.forced() => return Err(flow.refuse(ReasonCode::Shutdown)),
            () = start.closing.cancelled() => return Err(flow.refuse(ReasonCode::Shutdown)),
            r = tokio::time::timeout_at(deadline, rx.recv()) => r,
        };
        let datagram = match next {
            Err(_) => return Err(flow.refuse(ReasonCode::PeekTimeout)),
            // The listener stopped before the hello was complete, or a
            // full table gave this flow's slot to a newer one: its
            // Initial phase is over without a ClientHello.
            Ok(None) if start.closing.is_cancelled() => return Err(flow.refuse(ReasonCode::Shutdown)),
            Ok(None) => return Err(flow.refuse(ReasonCode::PeekTimeout)),
            // Before the server spoke there is no id to follow a client's
            // new port by: every datagram here comes from the first key.
            Ok(Some(d)) => d.data,
        };
        held_bytes += datagram.len();
        if held.len() >= held_limits.datagrams || held_bytes > held_limits.bytes {
            return Err(flow.refuse(ReasonCode::ClassifyOversized));
        }
        let progress = initial.push_datagram(&datagram);
        held.push(datagram);
        match progress {
            Ok(Progress::Done(h)) => break h,
            Ok(Progress::NeedMore { .. }) => {}
            // Fail closed: what does not classify is not forwarded,
            // whatever the mode.
            Err(e) => return Err(flow.refuse(e.reason())),
        }
    };
    plan.metrics.classified(started.elapsed());
    super::peek::from_hello(&mut flow.ctx, hello);
    // A ClientHello as over TLS, but the flow is QUIC (what rules name).
    flow.ctx.protocol = Protocol::Quic;
    Ok(())
}

/// Whether `a` is the listener's own address: `bound`, or on a wildcard
/// listener its port on one of this host's addresses (`own`, or
/// loopback). Under `TPROXY` a wildcard listener may share its port with
/// the traffic it intercepts: a remote address on that port was not sent
/// to the listener.
fn sent_to(bound: Option<SocketAddr>, own: &[IpAddr], a: SocketAddr) -> bool {
    let ip = a.ip().to_canonical();
    bound.is_some_and(|b| {
        b.port() == a.port()
            && (b.ip().to_canonical() == ip || (b.ip().is_unspecified() && (ip.is_loopback() || own.contains(&ip))))
    })
}

/// Whom a listener follows to another port of the client's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Follows {
    /// A client whose NAT rebinds (by the server's connection ids): not
    /// when a filter chain matches on the client's port (`source_ports`),
    /// since a datagram from the new port would travel under a decision
    /// made for another.
    rebinding: bool,
    /// A client that moves on purpose, by its address alone
    /// (`migration: same-address`).
    address: bool,
}

fn follows(snapshot: &Snapshot, name: &str) -> Follows {
    let Some(p) = snapshot.plan(name) else {
        return Follows {
            rebinding: true,
            address: false,
        };
    };
    Follows {
        rebinding: p
            .chains
            .iter()
            .chain(&p.default_chain)
            .all(|c| c.matcher.source_ports.is_empty()),
        address: matches!(
            p.spec.front,
            Front::Quic {
                follow_address: true,
                ..
            }
        ),
    }
}

/// This host's addresses as the configuration knows them (the `gateway`
/// SmartGroup's), canonical.
fn own_addresses(snapshot: &Snapshot) -> Vec<IpAddr> {
    snapshot
        .config
        .gateway_addresses
        .iter()
        .map(IpAddr::to_canonical)
        .collect()
}

/// Whether a listener configured at `configured` keeps the socket bound
/// to `bound` (as the runtime decides on a reload).
fn same_socket(configured: SocketAddr, bound: SocketAddr) -> bool {
    configured == bound || (configured.port() == 0 && configured.ip() == bound.ip())
}

/// Drops the datagrams of a refused flow until none came for `idle`, or
/// its listener is gone.
async fn swallow(start: &Start, rx: &mut mpsc::Receiver<Datagram>, idle: Duration) {
    loop {
        tokio::select! {
            () = start.closing.cancelled() => return,
            () = start.shared.forced() => return,
            r = tokio::time::timeout(idle, rx.recv()) => match r {
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return,
            },
        }
    }
}

/// Where an allowed flow's datagrams go, and where its replies leave from.
#[derive(Debug)]
struct Path {
    upstream: UdpSocket,
    dst: SocketAddr,
    /// Transparent: a socket bound to the original destination, so replies
    /// come from the address the client sent to.
    reply_from: Option<UdpSocket>,
}

/// A UDP socket connected to the first of `addrs` that can be reached (a
/// UDP connect only checks the route), and, for a transparent flow, the
/// socket replies leave from.
fn open_path(addrs: &[SocketAddr], reply_as: Option<SocketAddr>) -> Result<Path, Stop> {
    let mut failure = "connect-no-addresses";
    let mut tried = None;
    for dst in addrs {
        tried = Some(*dst);
        let local: SocketAddr = match dst {
            SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let connected = std::net::UdpSocket::bind(local)
            .and_then(|s| s.connect(dst).map(|()| s))
            .and_then(|s| s.set_nonblocking(true).map(|()| s))
            .and_then(UdpSocket::from_std);
        match connected {
            Ok(upstream) => {
                let _ = socket2::SockRef::from(&upstream).set_recv_buffer_size(SOCKET_BUFFER);
                let reply_from = match reply_as {
                    None => None,
                    Some(at) => Some(reply_socket(at).map_err(|e| {
                        tracing::debug!(error = %e, %at, "cannot bind a reply socket to the original destination");
                        Stop::Failed {
                            reason: "proxy-error",
                            dst: Some(*dst),
                        }
                    })?),
                };
                return Ok(Path {
                    upstream,
                    dst: *dst,
                    reply_from,
                });
            }
            Err(e) => {
                failure = if e.raw_os_error() == Some(libc::ENETUNREACH) || e.raw_os_error() == Some(libc::EHOSTUNREACH)
                {
                    "connect-unreachable"
                } else {
                    "connect-error"
                };
            }
        }
    }
    Err(Stop::Failed {
        reason: failure,
        dst: tried,
    })
}

/// A socket bound to `at` (an address that is not this host's, under
/// TPROXY) to send a transparent flow's replies from. Several flows to one
/// server share the address, hence `SO_REUSEADDR`; it never reads (the
/// TPROXY rule hands the client's datagrams to the listener).
fn reply_socket(at: SocketAddr) -> io::Result<UdpSocket> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(at), socket2::Type::DGRAM, None)?;
    socket.set_nonblocking(true)?;
    socket.set_reuse_address(true)?;
    crate::sys::set_ip_transparent(&socket)?;
    socket.bind(&at.into())?;
    UdpSocket::from_std(socket.into())
}

/// An IPv4 client seen by a dual-stack listener has a v4-mapped address; a
/// reply socket bound to an IPv4 original destination needs it plain.
fn reply_address(client: SocketAddr, from_v4: bool) -> SocketAddr {
    match client.ip() {
        IpAddr::V6(v6) if from_v4 => v6
            .to_ipv4_mapped()
            .map_or(client, |v4| SocketAddr::new(IpAddr::V4(v4), client.port())),
        _ => client,
    }
}

/// Sends the held datagrams, then relays both ways until the flow idles,
/// its listener is gone, the process stops or a new policy denies it; then
/// writes its record.
async fn relay(start: &Start, flow: Flow, fwd: Forward, rx: &mut mpsc::Receiver<Datagram>, held: Vec<Vec<u8>>) {
    let shared = &start.shared;
    let Forward { chain, mut addrs } = fwd;
    // UDP has no happy eyeballs to find a family that works: a client that
    // dialled one family is sent on in it first (a name resolved for an
    // intercepted flow has both).
    if let Some(o) = flow.ctx.original_dst {
        addrs.sort_by_key(|a| a.is_ipv4() != o.is_ipv4());
    }
    let reply_as = if start.plan.spec.transparent {
        flow.ctx.original_dst
    } else {
        None
    };
    let path = match open_path(&addrs, reply_as) {
        Ok(p) => p,
        Err(stop) => {
            flow.end(shared, stop);
            return;
        }
    };
    let (_, idle) = chain.timeouts(start.plan.connection());
    let mut up_bytes = 0u64;
    for d in &held {
        // A datagram the upstream refuses is lost, as on the network.
        if path.upstream.send(d).await.is_ok() {
            up_bytes += d.len() as u64;
        }
    }
    drop(held);
    let client = match &path.reply_from {
        Some(r) => reply_address(start.src, r.local_addr().is_ok_and(|a| a.is_ipv4())),
        None => start.src,
    };
    let reply: &UdpSocket = path.reply_from.as_ref().unwrap_or(&*start.listener);
    let (down_bytes, close, revoked) = pump(start, &flow, &chain, &path, rx, reply, client, idle).await;
    let mut rec = flow.record_to(path.dst);
    rec.bytes_up = up_bytes + down_bytes.0;
    rec.bytes_down = down_bytes.1;
    rec.close_reason = Cow::Borrowed(close);
    if let Some(d) = revoked {
        tracing::debug!(flow = flow.ctx.id, reason = %d.reason, "closed: the new configuration denies it");
        rec.verdict = (&*d).into();
    }
    flow.write(shared, rec);
}

/// The relay proper: `(bytes up, bytes down)`, the close reason, and the
/// denial of a policy change that ended it.
#[allow(clippy::too_many_arguments, reason = "one flow's relay state, borrowed")]
async fn pump(
    start: &Start,
    flow: &Flow,
    chain: &Arc<FilterChain>,
    path: &Path,
    rx: &mut mpsc::Receiver<Datagram>,
    reply: &UdpSocket,
    client: SocketAddr,
    idle: Option<Duration>,
) -> ((u64, u64), &'static str, Option<Box<super::Decision>>) {
    let relayed = RelayedFlow {
        chain,
        ctx: &flow.ctx,
        dst: path.dst.ip(),
        closing: &start.closing,
    };
    let ends = start.shared.relay_ends(&relayed);
    tokio::pin!(ends);
    // Far enough to never fire, for a chain without an idle timeout.
    let idle = idle.unwrap_or(Duration::from_secs(365 * 24 * 3600));
    // The timer is moved only when it fires (to the last datagram plus
    // `idle`), not once per datagram.
    let mut last = tokio::time::Instant::now();
    let timer = tokio::time::sleep(idle);
    tokio::pin!(timer);
    let (mut up, mut down) = (0u64, 0u64);
    let mut client = client;
    let mut from = start.src;
    let mut from_last = tokio::time::Instant::now();
    let from_v4 = path
        .reply_from
        .as_ref()
        .is_some_and(|r| r.local_addr().is_ok_and(|a| a.is_ipv4()));
    // The server's connection ids already told to the listener.
    let mut reported: Vec<Vec<u8>> = Vec::new();
    let (close, revoked) = loop {
        tokio::select! {
            d = &mut ends => {
                let reason = if d.is_some() { "policy-revoked" } else { "cancelled" };
                break (reason, d);
            }
            () = &mut timer => {
                let due = last + idle;
                if due <= tokio::time::Instant::now() {
                    break ("idle-timeout", None);
                }
                timer.as_mut().reset(due);
            }
            d = rx.recv() => match d {
                Some(d) => {
                    // Only the client's datagrams keep the flow alive: a
                    // server that streams to a client that is gone (or
                    // whose address was spoofed) does not hold it open.
                    last = tokio::time::Instant::now();
                    if d.from == from {
                        from_last = last;
                    } else if last.duration_since(from_last) >= REBIND_QUIET {
                        // The client's NAT gave it a new port, and the old
                        // one went quiet: answer at the new one.
                        from = d.from;
                        from_last = last;
                        client = if path.reply_from.is_some() { reply_address(from, from_v4) } else { from };
                    }
                    match path.upstream.send(&d.data).await {
                        Ok(_) => up += d.data.len() as u64,
                        // An ICMP error from an earlier datagram: UDP
                        // goes on, the client retransmits.
                        Err(e) if transient(&e) => {}
                        Err(_) => break ("upstream-error", None),
                    }
                }
                // The listener stopped serving: its drain is over.
                None => break ("cancelled", None),
            },
            r = path.upstream.readable() => {
                let got = r.and_then(|()| receive_upstream(&path.upstream));
                match got {
                    Ok(data) => {
                        if let Some(cid) = server_cid(&data).filter(|c| !reported.iter().any(|r| r == c))
                            && reported.len() < MAX_CIDS_PER_FLOW
                        {
                            reported.push(cid.to_vec());
                            let _ = start.events.send(Event::ServerCid {
                                key: start.key,
                                serial: start.serial,
                                cid: cid.to_vec(),
                            });
                        }
                        let sent = if path.reply_from.is_some() {
                            reply.send_to(&data, client).await
                        } else {
                            send_from(reply, &data, client, start.local).await
                        };
                        match sent {
                            Ok(_) => down += data.len() as u64,
                            Err(e) if transient(&e) => {}
                            Err(_) => break ("client-error", None),
                        }
                    }
                    Err(e) if transient(&e) => {}
                    Err(_) => break ("upstream-error", None),
                }
            }
        }
    };
    ((up, down), close, revoked)
}

/// The Source Connection ID of a server's long-header packet (RFC 9000
/// §17.2: flags, version, DCID length and DCID, SCID length and SCID):
/// the id the client's short-header packets then carry. `None` for a short
/// header or anything too short; the rest of the packet is not read.
fn server_cid(data: &[u8]) -> Option<&[u8]> {
    if data.first()? & 0x80 == 0 {
        return None;
    }
    // Version Negotiation (version 0) echoes the client's own ids.
    if data.get(1..5)? == [0, 0, 0, 0] {
        return None;
    }
    let dcid_len = usize::from(*data.get(5)?);
    let at = 6 + dcid_len;
    let scid_len = usize::from(*data.get(at)?);
    if dcid_len > 20 || scid_len > 20 {
        return None;
    }
    data.get(at + 1..at + 1 + scid_len)
}

thread_local! {
    /// Where a worker thread receives upstream datagrams: one largest-UDP
    /// buffer per thread, not per flow (an idle relayed flow then holds
    /// no receive buffer at all).
    static UPSTREAM_BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; MAX_DATAGRAM]);
}

/// Takes one datagram the upstream sent (`WouldBlock` when the readiness
/// was spurious), copied out of the thread's receive buffer.
fn receive_upstream(upstream: &UdpSocket) -> io::Result<Vec<u8>> {
    UPSTREAM_BUF.with(|b| {
        let mut b = b
            .try_borrow_mut()
            .map_err(|_| io::Error::from(io::ErrorKind::WouldBlock))?;
        let n = upstream.try_recv(&mut b)?;
        Ok(b.get(..n).unwrap_or_default().to_vec())
    })
}

/// Errors a UDP socket reports for one datagram (an ICMP answer to an
/// earlier one, a full buffer) that do not end a flow.
fn transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    ) || e.raw_os_error() == Some(libc::ENOBUFS)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "test code")]
mod tests {
    use super::*;

    #[test]
    fn replies_from_an_ipv4_socket_go_to_the_plain_ipv4_client() {
        let mapped: SocketAddr = "[::ffff:10.0.0.7]:5000".parse().unwrap();
        assert_eq!(reply_address(mapped, true), "10.0.0.7:5000".parse().unwrap());
        assert_eq!(reply_address(mapped, false), mapped);
        let v6: SocketAddr = "[fd00::7]:5000".parse().unwrap();
        assert_eq!(reply_address(v6, true), v6);
    }

    fn entry(tx: mpsc::Sender<Datagram>, serial: u64) -> Entry {
        Entry {
            tx,
            serial,
            alias_of: None,
            aliases: Vec::new(),
            decided: false,
            cids: Vec::new(),
            queued: Arc::default(),
        }
    }

    #[test]
    fn a_client_whose_nat_rebinds_keeps_its_flow() {
        let mut t = Table::default();
        let first: Key = ("10.0.0.1:1000".parse().unwrap(), None);
        let (tx, mut rx) = mpsc::channel(8);
        t.flows.insert(first, entry(tx, 1));
        // An id reported by an older flow of the same key is not taken.
        t.event(Event::ServerCid {
            key: first,
            serial: 0,
            cid: vec![9; 8],
        });
        t.event(Event::ServerCid {
            key: first,
            serial: 1,
            cid: vec![7; 8],
        });
        let mut short = vec![0x40];
        short.extend([7; 8]);
        short.extend([0; 20]);
        let moved: Key = ("10.0.0.1:2000".parse().unwrap(), None);
        assert_eq!(t.rebound(moved, &short, false), Some(first));
        // Another address is another client, whatever id it sends.
        assert_eq!(t.rebound(("10.0.0.2:2000".parse().unwrap(), None), &short, false), None);
        let mut long = short.clone();
        long[0] = 0xc0;
        assert_eq!(t.rebound(moved, &long, false), None);
        let mut unknown = short.clone();
        unknown[1] = 9;
        assert_eq!(t.rebound(moved, &unknown, false), None);
        assert_eq!(t.rebound(moved, &[], false), None);
        assert!(t.alias(
            moved,
            first,
            Datagram {
                from: moved.0,
                data: short.clone(),
                to: None,
                charge: None,
            }
        ));
        assert_eq!(rx.try_recv().unwrap().from, moved.0);
        assert_eq!(t.len(), 2);
        // The flow's end takes every key and id it had.
        t.event(Event::Ended { key: first, serial: 1 });
        assert!(t.is_empty(), "{t:?}");
        assert!(t.cids.is_empty(), "{t:?}");
    }

    fn datagram(len: usize) -> Datagram {
        Datagram {
            from: "10.0.0.1:1000".parse().unwrap(),
            data: vec![0; len],
            to: None,
            charge: None,
        }
    }

    /// Queued bytes are bounded per flow and per listener, and given back
    /// as the flow takes its datagrams.
    #[test]
    fn queued_bytes_are_bounded_per_flow_and_per_listener() {
        let listener = Arc::new(AtomicUsize::new(0));
        let a = Queued::new(&listener);
        let mut held = Vec::new();
        for _ in 0..FLOW_QUEUE_BYTES / MAX_DATAGRAM {
            let mut d = datagram(MAX_DATAGRAM);
            assert!(Charge::charge(&a, &mut d));
            held.push(d);
        }
        let mut over = datagram(MAX_DATAGRAM);
        assert!(!Charge::charge(&a, &mut over), "past the flow's bound");
        assert!(over.charge.is_none());
        assert_eq!(
            listener.load(Ordering::Relaxed),
            held.len() * MAX_DATAGRAM - FLOW_RESERVE_BYTES,
            "all but the flow's reserve counts against the listener"
        );
        // The flow takes one: room for one more.
        drop(held.pop());
        assert!(Charge::charge(&a, &mut over));
        held.push(over);
        drop(held);
        assert_eq!(listener.load(Ordering::Relaxed), 0, "every byte given back");
        // Other flows fill the listener's bound: past its reserve, a flow
        // queues nothing more, but its reserve is its own.
        listener.store(LISTENER_QUEUE_BYTES, Ordering::Relaxed);
        let fresh = Queued::new(&listener);
        let mut held = Vec::new();
        let mut reserved = 0;
        loop {
            let mut d = datagram(1200);
            if !Charge::charge(&fresh, &mut d) {
                break;
            }
            reserved += 1200;
            held.push(d);
        }
        assert_eq!(reserved, FLOW_RESERVE_BYTES / 1200 * 1200);
        assert_eq!(listener.load(Ordering::Relaxed), LISTENER_QUEUE_BYTES);
        let mut big = datagram(MAX_DATAGRAM);
        assert!(!Charge::charge(&fresh, &mut big), "past the listener's bound");
        drop(held);
        assert_eq!(
            listener.load(Ordering::Relaxed),
            LISTENER_QUEUE_BYTES,
            "a reserve is not counted there"
        );
        assert_eq!(fresh.flow.load(Ordering::Relaxed), 0);
        assert_eq!(a.flow.load(Ordering::Relaxed), 0);
    }

    /// A listener that accepts large hellos holds enough Initials for one.
    #[test]
    fn held_limits_follow_the_largest_hello_accepted() {
        let default = HeldLimits::for_hello(16_384);
        assert_eq!(default.initials, 17);
        assert_eq!(default.datagrams, MIN_HELD_DATAGRAMS + 1);
        assert_eq!(default.bytes, MIN_HELD_BYTES);
        let small = HeldLimits::for_hello(1024);
        assert_eq!(small.initials, QuicLimits::default().max_initial_packets);
        assert_eq!(small.datagrams, MIN_HELD_DATAGRAMS);
        let large = HeldLimits::for_hello(64 * 1024);
        // 64 KiB of hello in Initials of 1,200 bytes: 57 of them.
        assert!(large.initials * 1150 >= 64 * 1024, "{large:?}");
        assert!(large.datagrams > large.initials);
        assert!(large.bytes >= large.datagrams * 1200, "{large:?}");
    }

    fn short_with(cid: &[u8]) -> Vec<u8> {
        let mut short = vec![0x40];
        short.extend(cid);
        short.extend([0; 20]);
        short
    }

    fn cid_of(t: &mut Table, key: Key, serial: u64, cid: &[u8]) {
        t.event(Event::ServerCid {
            key,
            serial,
            cid: cid.to_vec(),
        });
    }

    /// Only the same address to the same destination is followed, and only
    /// by an id of a flow that still lives under that serial.
    #[test]
    fn a_rebinding_client_is_followed_to_its_own_destination_only() {
        let mut t = Table::default();
        let dst: SocketAddr = "192.0.2.1:443".parse().unwrap();
        let first: Key = ("10.0.0.1:1000".parse().unwrap(), Some(dst));
        let (tx, _rx) = mpsc::channel(8);
        t.flows.insert(first, entry(tx.clone(), 1));
        cid_of(&mut t, first, 1, &[7; 8]);
        let short = short_with(&[7; 8]);
        assert_eq!(
            t.rebound(("10.0.0.1:2000".parse().unwrap(), Some(dst)), &short, false),
            Some(first)
        );
        let elsewhere: SocketAddr = "192.0.2.2:443".parse().unwrap();
        assert_eq!(
            t.rebound(("10.0.0.1:2000".parse().unwrap(), Some(elsewhere)), &short, false),
            None,
            "another destination is another flow"
        );
        assert_eq!(t.rebound(("10.0.0.1:2000".parse().unwrap(), None), &short, false), None);
        // A later flow of the same key does not inherit the ids.
        t.flows.insert(first, entry(tx, 2));
        assert_eq!(
            t.rebound(("10.0.0.1:2000".parse().unwrap(), Some(dst)), &short, false),
            None
        );
    }

    /// With `migration: same-address`, a client that moves to another port
    /// and to an id it was given encrypted keeps its flow when it has only
    /// one there; with two flows from the address to that destination,
    /// neither is guessed; without the setting, none is followed.
    #[test]
    fn a_client_that_moves_on_purpose_keeps_its_only_flow_when_asked() {
        let mut t = Table::default();
        let first: Key = ("10.0.0.1:1000".parse().unwrap(), None);
        let (tx, _rx) = mpsc::channel(8);
        t.flows.insert(first, entry(tx.clone(), 1));
        let short = short_with(&[3; 8]);
        let moved: Key = ("10.0.0.1:2000".parse().unwrap(), None);
        assert_eq!(t.rebound(moved, &short, true), None, "undecided: nothing to follow");
        t.event(Event::Decided { key: first, serial: 1 });
        assert_eq!(t.rebound(moved, &short, true), Some(first));
        assert_eq!(t.rebound(moved, &short, false), None, "not asked for");
        assert_eq!(t.rebound(("10.0.0.2:2000".parse().unwrap(), None), &short, true), None);
        let dst: SocketAddr = "192.0.2.1:443".parse().unwrap();
        assert_eq!(
            t.rebound(("10.0.0.1:2000".parse().unwrap(), Some(dst)), &short, true),
            None,
            "another destination"
        );
        let mut long = short.clone();
        long[0] = 0xc0;
        assert_eq!(t.rebound(moved, &long, true), None, "a long header is a new flow");
        // A second flow from the address: which one is meant is unknown.
        let second: Key = ("10.0.0.1:1001".parse().unwrap(), None);
        t.flows.insert(second, entry(tx, 2));
        t.event(Event::Decided { key: second, serial: 2 });
        assert_eq!(t.rebound(moved, &short, true), None);
        // The second's relay ends (its record written): the first is the
        // only one again; then the first ends too.
        t.event(Event::Refused { key: second, serial: 2 });
        assert_eq!(t.rebound(moved, &short, true), Some(first));
        t.event(Event::Ended { key: first, serial: 1 });
        assert_eq!(t.rebound(moved, &short, true), None);
        assert!(t.relaying.is_empty(), "{t:?}");
    }

    /// An evicted flow takes its other keys and its ids with it: none is
    /// left to hold a slot or to hand a later flow another's datagrams.
    #[test]
    fn an_evicted_flow_leaves_no_keys_or_ids_behind() {
        let mut t = Table::default();
        let first: Key = ("10.0.0.1:1000".parse().unwrap(), None);
        let (tx, _rx) = mpsc::channel(8);
        t.flows.insert(first, entry(tx, 1));
        t.event(Event::Decided { key: first, serial: 1 });
        cid_of(&mut t, first, 1, &[7; 8]);
        let moved: Key = ("10.0.0.1:2000".parse().unwrap(), None);
        assert!(t.alias(moved, first, datagram(1200)));
        // Its relay ended: it only swallows now, and a new flow takes its
        // slot.
        t.event(Event::Refused { key: first, serial: 1 });
        assert!(t.evict());
        assert!(t.is_empty(), "{t:?}");
        assert!(t.cids.is_empty(), "{t:?}");
        assert_eq!(t.rebound(moved, &short_with(&[7; 8]), true), None);
    }

    /// A client whose NAT moves it again and again is followed to its
    /// newest port: past [`MAX_ALIASES_PER_FLOW`] the oldest port is let go.
    #[test]
    fn a_flow_keeps_its_newest_ports() {
        let mut t = Table::default();
        let first: Key = ("10.0.0.1:1000".parse().unwrap(), None);
        let (tx, mut rx) = mpsc::channel(64);
        t.flows.insert(first, entry(tx, 1));
        let ports: Vec<Key> = (0..MAX_ALIASES_PER_FLOW + 2)
            .map(|i| (SocketAddr::new("10.0.0.1".parse().unwrap(), 2000 + i as u16), None))
            .collect();
        for k in &ports {
            assert!(t.alias(*k, first, datagram(100)));
        }
        assert_eq!(t.len(), 1 + MAX_ALIASES_PER_FLOW);
        assert!(!t.flows.contains_key(&ports[0]) && !t.flows.contains_key(&ports[1]));
        assert!(ports[2..].iter().all(|k| t.flows.contains_key(k)));
        let mut n = 0;
        while rx.try_recv().is_ok() {
            n += 1;
        }
        assert_eq!(n, ports.len(), "every datagram reached the flow");
        t.event(Event::Ended { key: first, serial: 1 });
        assert!(t.is_empty(), "{t:?}");
    }

    /// A listener whose filter chains match the client's port does not
    /// follow a client to a new one: the new port would travel under the
    /// old port's decision.
    #[test]
    fn a_listener_matching_source_ports_does_not_follow_a_new_port() {
        let yaml = "listeners:\n  - {name: q, kind: quic, address: \"127.0.0.1:0\", upstream_port: 443}\n";
        let config = sluice_api::config::load_str(yaml, "t.yaml").unwrap();
        let plain = Snapshot::build(config.clone(), None).unwrap();
        assert!(follows(&plain, "q").rebinding);
        let changed = Arc::new(AtomicUsize::new(0));
        let seen = changed.clone();
        let hook = move |_: &sluice_api::Config, plan: &mut ListenerPlan| {
            for c in plan.chains.iter_mut().chain(plan.default_chain.iter_mut()) {
                if let Some(c) = Arc::get_mut(c) {
                    c.matcher.source_ports = vec![5000];
                    seen.fetch_add(1, Ordering::Relaxed);
                }
            }
        };
        let ported = Snapshot::build(config, Some(&hook)).unwrap();
        assert!(changed.load(Ordering::Relaxed) > 0, "no chain to change");
        assert!(!follows(&ported, "q").rebinding);
    }

    #[test]
    fn the_server_cid_is_read_from_a_long_header_only() {
        // Initial: flags, version 1, DCID of 8, SCID of 4, then the rest.
        let mut p = vec![0xc0, 0, 0, 0, 1, 8];
        p.extend([1; 8]);
        p.push(4);
        p.extend([5, 6, 7, 8]);
        p.extend([0; 30]);
        assert_eq!(server_cid(&p), Some(&[5u8, 6, 7, 8][..]));
        assert_eq!(server_cid(&p[..18]), None, "SCID cut short");
        p[0] = 0x40;
        assert_eq!(server_cid(&p), None, "short header");
        assert_eq!(server_cid(&[]), None);
        assert_eq!(server_cid(&[0xc0, 0, 0, 0, 1, 21]), None);
    }

    #[test]
    fn an_icmp_answer_does_not_end_a_flow() {
        assert!(transient(&io::Error::from(io::ErrorKind::ConnectionRefused)));
        assert!(transient(&io::Error::from_raw_os_error(libc::ENOBUFS)));
        assert!(!transient(&io::Error::from(io::ErrorKind::PermissionDenied)));
    }

    /// No reachable address: the flow fails with the reason and the
    /// address tried, never a panic.
    #[tokio::test]
    async fn a_path_to_nowhere_fails_with_a_close_reason() {
        assert_eq!(
            open_path(&[], None).unwrap_err(),
            Stop::Failed {
                reason: "connect-no-addresses",
                dst: None
            }
        );
    }
}
