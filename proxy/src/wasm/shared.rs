//! State a plugin shares across its instances (one per worker): key-value
//! data with compare-and-swap, named queues, and the metrics it defines.
//! Shared by every instance of one plugin; kept across reloads of the same
//! plugin so a budget or counter does not reset when the configuration
//! changes.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use super::abi::{MetricType, Status};

/// Each key's value and CAS.
type Entries = HashMap<Vec<u8>, (Vec<u8>, u32)>;

/// Key-value data shared by a plugin's instances. Every write gets a new
/// nonzero CAS value; a write naming a CAS succeeds only if it is current.
#[derive(Debug, Default)]
pub struct SharedData {
    entries: Mutex<Entries>,
    next_cas: AtomicU32,
    /// At most this many keys (zero: the default of 10,000).
    pub max_keys: usize,
}

impl SharedData {
    /// The value under `key` and its CAS.
    pub fn get(&self, key: &[u8]) -> Option<(Vec<u8>, u32)> {
        self.lock().get(key).cloned()
    }

    /// Sets `key` to `value`. A nonzero `cas` must match the key's current
    /// CAS (a key that does not exist yet accepts any).
    pub fn set(&self, key: &[u8], value: Vec<u8>, cas: u32) -> Status {
        let max = if self.max_keys == 0 { 10_000 } else { self.max_keys };
        let mut entries = self.lock();
        match entries.get(key) {
            Some((_, current)) if cas != 0 && cas != *current => return Status::CasMismatch,
            None if entries.len() >= max => return Status::InternalFailure,
            _ => {}
        }
        let next = self.next_cas.fetch_add(1, Ordering::Relaxed).wrapping_add(1).max(1);
        entries.insert(key.to_vec(), (value, next));
        Status::Ok
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Named queues shared by a plugin's instances. The instance that
/// registered a queue is told when an item arrives (`on_queue_ready`, by the
/// plugin's tick thread, which an enqueue wakes).
#[derive(Debug, Default)]
pub struct SharedQueues {
    queues: Mutex<Vec<(String, VecDeque<Vec<u8>>)>>,
    /// Each queue's registering slot, by queue id - 1.
    owners: Mutex<Vec<Option<usize>>>,
    /// Queues with items their owner has not been told about.
    ready: Mutex<Vec<u32>>,
    /// The thread that delivers `on_queue_ready`.
    pub waker: Mutex<Option<std::thread::Thread>>,
}

/// The most items one queue holds; an enqueue beyond it fails.
pub const MAX_QUEUE_ITEMS: usize = 10_000;

impl SharedQueues {
    /// The id of the queue `name`, made if new, registered by the instance
    /// in `slot` (which is told when items arrive). Ids start at 1.
    pub fn register(&self, name: &str, slot: usize) -> u32 {
        let mut q = self.lock();
        let pos = match q.iter().position(|(n, _)| n == name) {
            Some(p) => p,
            None => {
                q.push((name.to_owned(), VecDeque::new()));
                q.len() - 1
            }
        };
        let mut owners = self.owners.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if owners.len() <= pos {
            owners.resize(pos + 1, None);
        }
        owners[pos] = Some(slot);
        u32::try_from(pos + 1).unwrap_or(u32::MAX)
    }

    /// The queues with news for their owners, and the owner of each.
    pub fn take_ready(&self) -> Vec<(u32, usize)> {
        let ready = std::mem::take(&mut *self.ready.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        let owners = self.owners.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        ready
            .into_iter()
            .filter_map(|id| {
                owners
                    .get((id as usize).wrapping_sub(1))
                    .copied()
                    .flatten()
                    .map(|slot| (id, slot))
            })
            .collect()
    }

    pub fn resolve(&self, name: &str) -> Option<u32> {
        self.lock()
            .iter()
            .position(|(n, _)| n == name)
            .and_then(|p| u32::try_from(p + 1).ok())
    }

    pub fn enqueue(&self, id: u32, item: Vec<u8>) -> Status {
        let mut q = self.lock();
        match q.get_mut((id as usize).wrapping_sub(1)) {
            Some((_, items)) if items.len() >= MAX_QUEUE_ITEMS => Status::InternalFailure,
            Some((_, items)) => {
                items.push_back(item);
                drop(q);
                let mut ready = self.ready.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if !ready.contains(&id) {
                    ready.push(id);
                }
                if let Some(t) = &*self.waker.lock().unwrap_or_else(std::sync::PoisonError::into_inner) {
                    t.unpark();
                }
                Status::Ok
            }
            None => Status::NotFound,
        }
    }

    /// The next item, `Err(Empty)` when there is none, `Err(NotFound)` for
    /// an unknown queue.
    pub fn dequeue(&self, id: u32) -> Result<Vec<u8>, Status> {
        let mut q = self.lock();
        let (_, items) = q.get_mut((id as usize).wrapping_sub(1)).ok_or(Status::NotFound)?;
        items.pop_front().ok_or(Status::Empty)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(String, VecDeque<Vec<u8>>)>> {
        self.queues.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The metrics a plugin defines, by id (ids start at 1).
#[derive(Debug, Default)]
pub struct PluginMetrics {
    metrics: Mutex<Vec<Metric>>,
}

/// One plugin metric.
#[derive(Debug, Clone, PartialEq)]
pub struct Metric {
    pub kind: MetricType,
    pub name: String,
    /// Counter and gauge: the value. Histogram: the sum of the values
    /// recorded.
    pub value: i64,
    /// Histogram: how many values were recorded.
    pub count: u64,
}

/// The most metrics one plugin may define.
pub const MAX_METRICS: usize = 1000;

impl PluginMetrics {
    /// The id of metric `name` of `kind`, made if new. Defining a name again
    /// with the same kind returns the same id; with another kind fails.
    pub fn define(&self, kind: MetricType, name: &str) -> Result<u32, Status> {
        let mut m = self.lock();
        if let Some(pos) = m.iter().position(|x| x.name == name) {
            return if m[pos].kind == kind {
                u32::try_from(pos + 1).map_err(|_| Status::InternalFailure)
            } else {
                Err(Status::BadArgument)
            };
        }
        if m.len() >= MAX_METRICS {
            return Err(Status::BadArgument);
        }
        m.push(Metric {
            kind,
            name: name.to_owned(),
            value: 0,
            count: 0,
        });
        u32::try_from(m.len()).map_err(|_| Status::InternalFailure)
    }

    /// Adds `delta`: counters only go up.
    pub fn increment(&self, id: u32, delta: i64) -> Status {
        let mut m = self.lock();
        let Some(x) = m.get_mut((id as usize).wrapping_sub(1)) else {
            return Status::NotFound;
        };
        match x.kind {
            MetricType::Counter if delta < 0 => Status::BadArgument,
            MetricType::Histogram => Status::BadArgument,
            _ => {
                x.value = x.value.saturating_add(delta);
                Status::Ok
            }
        }
    }

    /// Sets a gauge or counter, or records a histogram value.
    pub fn record(&self, id: u32, value: u64) -> Status {
        let mut m = self.lock();
        let Some(x) = m.get_mut((id as usize).wrapping_sub(1)) else {
            return Status::NotFound;
        };
        let v = i64::try_from(value).unwrap_or(i64::MAX);
        match x.kind {
            MetricType::Histogram => {
                x.value = x.value.saturating_add(v);
                x.count += 1;
            }
            _ => x.value = v,
        }
        Status::Ok
    }

    pub fn get(&self, id: u32) -> Result<u64, Status> {
        let m = self.lock();
        let x = m.get((id as usize).wrapping_sub(1)).ok_or(Status::NotFound)?;
        Ok(match x.kind {
            MetricType::Histogram => x.count,
            _ => u64::try_from(x.value).unwrap_or(0),
        })
    }

    /// Every metric, for `/metrics`.
    pub fn all(&self) -> Vec<Metric> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Metric>> {
        self.metrics.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_data_compare_and_swap() {
        let d = SharedData::default();
        assert_eq!(d.get(b"k"), None);
        assert_eq!(d.set(b"k", b"1".to_vec(), 0), Status::Ok);
        let (v, cas) = d.get(b"k").unwrap_or_default();
        assert_eq!(v, b"1");
        assert_ne!(cas, 0);
        assert_eq!(d.set(b"k", b"2".to_vec(), cas.wrapping_add(1)), Status::CasMismatch);
        assert_eq!(d.set(b"k", b"2".to_vec(), cas), Status::Ok);
        assert_eq!(d.set(b"k", b"3".to_vec(), cas), Status::CasMismatch, "the CAS moved on");
        // A key that does not exist accepts any CAS.
        assert_eq!(d.set(b"new", b"x".to_vec(), 42), Status::Ok);
    }

    #[test]
    fn queues_and_metrics() {
        let q = SharedQueues::default();
        let id = q.register("jobs", 0);
        assert_eq!(q.register("jobs", 1), id);
        assert_eq!(q.resolve("jobs"), Some(id));
        assert_eq!(q.resolve("other"), None);
        assert_eq!(q.dequeue(id), Err(Status::Empty));
        assert_eq!(q.enqueue(id, b"a".to_vec()), Status::Ok);
        assert_eq!(q.take_ready(), [(id, 1)], "the last registrant is told");
        assert_eq!(q.take_ready(), []);
        assert_eq!(q.dequeue(id), Ok(b"a".to_vec()));
        assert_eq!(q.enqueue(99, b"a".to_vec()), Status::NotFound);

        let m = PluginMetrics::default();
        let c = m.define(MetricType::Counter, "hits").unwrap_or(0);
        assert_eq!(m.define(MetricType::Counter, "hits"), Ok(c));
        assert_eq!(m.define(MetricType::Gauge, "hits"), Err(Status::BadArgument));
        assert_eq!(m.increment(c, 2), Status::Ok);
        assert_eq!(m.increment(c, -1), Status::BadArgument, "counters only go up");
        assert_eq!(m.get(c), Ok(2));
        let h = m.define(MetricType::Histogram, "size").unwrap_or(0);
        assert_eq!(m.record(h, 10), Status::Ok);
        assert_eq!(m.record(h, 30), Status::Ok);
        assert_eq!(m.get(h), Ok(2));
        assert_eq!(m.increment(77, 1), Status::NotFound);
    }
}
