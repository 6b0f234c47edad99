//! The GPU tier: which loaded models hold a copy in which device's memory, under each device's own
//! capacity (`--gpu-capacity`) and byte-weighted LRU.
//!
//! Every loaded model stays charged to the host cache; a model whose runtime can run it on a GPU
//! ([`LoadedModel::device_copy`](densemesh_runtime_core::LoadedModel::device_copy)) is *promoted* to a
//! device before a call when one can take it, and *demoted* (its device copy dropped, the host copy
//! kept) when a device needs room for a model used more recently. Where it goes is
//! [`densemesh_placement::gpu::choose_device`], a pure function; this file does the bookkeeping and
//! the copies around it.
//!
//! The ledger holds models weakly: a model the host cache evicts is dropped with its device copy, and
//! its bytes leave the ledger the next time the ledger is read.

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use densemesh_placement::gpu::{DeviceRecord, DeviceResident, DeviceState, Gpu, Placing, choose_device};
use densemesh_runtime_gpu::Device;
use parking_lot::{Condvar, Mutex};

use crate::bytesize::Capacity;
use crate::error::MeshError;
use crate::metrics as m;
use crate::node::cache::{Entry, Lease};

/// `--gpu-capacity`: what models may take of each device's memory. A comma-separated list of sizes
/// or shares (`Capacity`, as `--capacity` takes them), each for every device or, written `N=…`, for
/// device `N` only: `90%`, `20GiB`, `80%,1=10GiB`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuCapacity {
    every: Capacity,
    per_device: Vec<(usize, Capacity)>,
}

impl Default for GpuCapacity {
    /// 90% of each device: room for the runtime's own workspace (cuBLAS handles, activations).
    fn default() -> Self {
        Self { every: Capacity::ShareOfMemory(90), per_device: Vec::new() }
    }
}

impl GpuCapacity {
    /// The capacity of device `ordinal` of `total_bytes`, never more than the device has.
    pub fn bytes_of(&self, ordinal: usize, total_bytes: u64) -> u64 {
        let capacity =
            self.per_device.iter().rev().find(|(d, _)| *d == ordinal).map_or(self.every, |(_, c)| *c);
        capacity.bytes_of(total_bytes).min(total_bytes)
    }

    /// Device ordinals the flag names that `devices` lacks: a mistake worth refusing to start on.
    pub fn unknown_devices(&self, devices: &[Device]) -> Vec<usize> {
        self.per_device.iter().map(|(d, _)| *d).filter(|d| !devices.iter().any(|x| x.ordinal == *d)).collect()
    }
}

impl FromStr for GpuCapacity {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut capacity = GpuCapacity::default();
        let mut every = None;
        for item in s.split(',').map(str::trim) {
            match item.split_once('=') {
                Some((device, amount)) => {
                    let device = device.trim().parse::<usize>().map_err(|_| {
                        format!("{item:?}: {device:?} is not a device ordinal (write N=SIZE, e.g. 0=20GiB)")
                    })?;
                    capacity.per_device.push((device, amount.parse().map_err(|e| format!("{item:?}: {e}"))?));
                }
                None if every.is_some() => {
                    return Err(format!("{s:?} gives the capacity of every device twice"));
                }
                None => every = Some(item.parse::<Capacity>().map_err(|e| format!("{item:?}: {e}"))?),
            }
        }
        if let Some(every) = every {
            capacity.every = every;
        }
        Ok(capacity)
    }
}

impl fmt::Display for GpuCapacity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.every)?;
        for (device, capacity) in &self.per_device {
            write!(f, ",{device}={capacity}")?;
        }
        Ok(())
    }
}

/// How long a model whose copy to a device failed runs on the host before the tier tries again:
/// without it, each call would demote other models to make room for a copy that fails again.
const PROMOTION_RETRY_AFTER: Duration = Duration::from_secs(30);

/// One device of the tier.
struct TierDevice {
    name: String,
    kind: String,
    total_bytes: u64,
    capacity_bytes: u64,
    residents: Vec<Resident>,
}

impl TierDevice {
    /// Bytes charged on it: its residents', copies being made included.
    fn used_bytes(&self) -> u64 {
        self.residents.iter().map(|r| r.bytes).sum()
    }
}

/// A model with a copy on a device, or one being made.
struct Resident {
    entry: Weak<Entry>,
    bytes: u64,
    last_used: u64,
    /// The copy is being made: charged already, not usable yet.
    copying: bool,
}

/// A model whose last copy to a device failed, and until when it stays on the host.
struct FailedCopy {
    entry: Weak<Entry>,
    until: Instant,
    reason: String,
}

struct Ledger {
    devices: Vec<TierDevice>,
    /// Ticks once per use: the residents' LRU order.
    clock: u64,
    /// Models larger than every device's capacity: the host for good, without a decision per call.
    too_large: Vec<Weak<Entry>>,
    failed: Vec<FailedCopy>,
}

fn is(weak: &Weak<Entry>, entry: &Arc<Entry>) -> bool {
    // A `Weak` keeps its allocation, so the address cannot be another model's.
    std::ptr::eq(weak.as_ptr(), Arc::as_ptr(entry))
}

impl Ledger {
    /// Forgets models the host cache dropped: their device copies went with them.
    fn prune(&mut self) {
        for device in &mut self.devices {
            device.residents.retain(|r| r.entry.strong_count() > 0);
        }
        self.too_large.retain(|e| e.strong_count() > 0);
        let now = Instant::now();
        self.failed.retain(|f| f.entry.strong_count() > 0 && f.until > now);
    }

    fn find(&self, entry: &Arc<Entry>) -> Option<(usize, usize)> {
        self.devices
            .iter()
            .enumerate()
            .find_map(|(d, device)| device.residents.iter().position(|r| is(&r.entry, entry)).map(|i| (d, i)))
    }

    fn remove(&mut self, device: usize, index: usize) -> Resident {
        self.devices[device].residents.swap_remove(index)
    }

    /// Why `entry` stays on the host without a new decision, if it does.
    fn parked(&self, entry: &Arc<Entry>) -> Option<&str> {
        if self.too_large.iter().any(|e| is(e, entry)) {
            return Some(TOO_LARGE);
        }
        let now = Instant::now();
        self.failed.iter().find(|f| is(&f.entry, entry) && f.until > now).map(|f| f.reason.as_str())
    }

    /// The devices as [`choose_device`] sees them; residents are named by their index.
    fn states(&self) -> Vec<DeviceState<usize>> {
        self.devices
            .iter()
            .map(|d| DeviceState {
                capacity_bytes: d.capacity_bytes,
                used_bytes: d.used_bytes(),
                residents: d
                    .residents
                    .iter()
                    .enumerate()
                    .map(|(i, r)| DeviceResident {
                        id: i,
                        bytes: r.bytes,
                        // A copy being made is as busy as a model with a call on it.
                        in_flight: if r.copying { 1 } else { r.entry.upgrade().map_or(0, |e| e.in_flight()) },
                        last_used: r.last_used,
                    })
                    .collect(),
            })
            .collect()
    }
}

const TOO_LARGE: &str = "it needs more GPU memory than any device's capacity (--gpu-capacity)";

/// The GPU tier of this pod; cloneable. Empty (no devices) on a pod without GPUs, where every call on
/// a model that does not require a GPU is a no-op and nothing is published.
#[derive(Clone)]
pub struct GpuTier {
    inner: Arc<Shared>,
    /// How many devices the ledger has (fixed at start), read without its lock.
    devices: usize,
}

struct Shared {
    ledger: Mutex<Ledger>,
    /// Signalled when a copy to a device ends (made or failed): a model that requires a GPU waits
    /// for its copy rather than run on the host meanwhile.
    copy_ended: Condvar,
}

impl GpuTier {
    /// A tier over `devices`, each given its share of `capacity`.
    pub fn new(devices: &[Device], capacity: &GpuCapacity) -> Self {
        let devices: Vec<TierDevice> = devices
            .iter()
            .map(|d| TierDevice {
                name: format!("gpu{}", d.ordinal),
                kind: d.name.clone(),
                total_bytes: d.total_bytes,
                capacity_bytes: capacity.bytes_of(d.ordinal, d.total_bytes),
                residents: Vec::new(),
            })
            .collect();
        let count = devices.len();
        let ledger = Ledger { devices, clock: 0, too_large: Vec::new(), failed: Vec::new() };
        let tier = Self {
            inner: Arc::new(Shared { ledger: Mutex::new(ledger), copy_ended: Condvar::new() }),
            devices: count,
        };
        tier.refresh_gauges();
        tier
    }

    /// A tier without devices.
    pub fn none() -> Self {
        Self::new(&[], &GpuCapacity::default())
    }

    /// Whether the pod has no device to place models on.
    pub fn is_empty(&self) -> bool {
        self.devices == 0
    }

    /// Before a call on `lease`, on the request's own thread: marks the use of a model on a device (its
    /// place in that device's LRU), and says whether the call must first go through
    /// [`place`](Self::place), which blocks, so the worker keeps it off the async thread. It must for
    /// a model its runtime can run on a GPU that has no device copy yet (unless it is parked on the
    /// host), and for a model that requires a GPU and has none now (`place` then waits for its copy
    /// or refuses the call). Lock-free for models no runtime could run on a GPU.
    pub fn before_call(&self, lease: &Lease) -> bool {
        let required = lease.gpu_ask() == Some(Gpu::Required);
        if lease.model().device_copy().is_none() || self.devices == 0 {
            return required;
        }
        let mut ledger = self.inner.ledger.lock();
        ledger.clock += 1;
        let now = ledger.clock;
        match ledger.find(lease.entry()) {
            Some((d, i)) => {
                let resident = &mut ledger.devices[d].residents[i];
                resident.last_used = now;
                // Being copied: others run on the host meanwhile.
                resident.copying && required
            }
            None => required || ledger.parked(lease.entry()).is_none(),
        }
    }

    /// Before a call on `lease`: puts a model its runtime can run on a GPU onto a device when one can
    /// take it (demoting the least recently used idle models of that device if it must), and marks
    /// its use. Blocking: a promotion is a host-to-device copy, and a model that requires a GPU waits
    /// for a copy another call is making. A model that requires a GPU and gets none is refused with
    /// UNAVAILABLE saying why; any other model runs on the host instead.
    pub fn place(&self, lease: &Lease) -> Result<(), MeshError> {
        let required = lease.gpu_ask() == Some(Gpu::Required);
        let Some(copy) = lease.model().device_copy() else {
            return match required {
                true => {
                    Err(self
                        .refusal(lease, format!("its runtime ({}) runs on the CPU only", lease.runtime())))
                }
                false => Ok(()),
            };
        };
        let bytes = copy.device_bytes();
        let mut ledger = self.inner.ledger.lock();
        ledger.prune();
        ledger.clock += 1;
        let now = ledger.clock;
        if let Some((d, i)) = ledger.find(lease.entry()) {
            ledger.devices[d].residents[i].last_used = now;
            if !required {
                // On a device, or being copied there by another call (this one runs on the host
                // meanwhile, which is only slower).
                return Ok(());
            }
            loop {
                match ledger.find(lease.entry()) {
                    Some((d, i)) if ledger.devices[d].residents[i].copying => {
                        self.inner.copy_ended.wait(&mut ledger);
                    }
                    Some(_) => return Ok(()),
                    // The copy failed: its reason is among the failures.
                    None => break,
                }
            }
        }
        if let Some(why) = ledger.parked(lease.entry()) {
            return self.host_only(lease, required, why.to_owned());
        }
        if ledger.devices.is_empty() {
            return self.host_only(lease, required, "this pod has no GPU".to_owned());
        }
        let (device, mut victims) = match choose_device(&ledger.states(), bytes) {
            Placing::Device { device, demote } => (device, demote),
            Placing::Host { larger_than_any: true } => {
                ledger.too_large.push(Arc::downgrade(lease.entry()));
                return self.host_only(lease, required, TOO_LARGE.to_owned());
            }
            Placing::Host { larger_than_any: false } => {
                return self.host_only(lease, required, "every GPU is full of models in use".to_owned());
            }
        };
        // Highest index first, so each removal leaves the lower indices in place. Demoted under the
        // lock: a call on a victim that comes meanwhile finds it gone from both the ledger and its
        // device, never a copy the ledger has stopped charging.
        victims.sort_unstable_by(|a, b| b.cmp(a));
        for index in victims {
            let victim = ledger.remove(device, index);
            if let Some(entry) = victim.entry.upgrade() {
                if let Some(copy) = entry.model().device_copy() {
                    copy.demote();
                }
                metrics::counter!(m::GPU_DEMOTIONS).increment(1);
                tracing::debug!(model_id = %entry.id(), device, "demoted to host memory");
            }
        }
        ledger.devices[device].residents.push(Resident {
            entry: Arc::downgrade(lease.entry()),
            bytes,
            last_used: now,
            copying: true,
        });
        drop(ledger);

        let started = Instant::now();
        let promoted = copy.promote(device);
        let took = started.elapsed();
        let mut ledger = self.inner.ledger.lock();
        let listed = ledger.find(lease.entry());
        let result = match promoted {
            Ok(()) => {
                if let Some((d, i)) = listed {
                    ledger.devices[d].residents[i].copying = false;
                }
                metrics::counter!(m::GPU_PROMOTIONS).increment(1);
                metrics::histogram!(m::GPU_PROMOTION_DURATION).record(took.as_secs_f64());
                Ok(())
            }
            Err(e) => {
                if let Some((d, i)) = listed {
                    ledger.remove(d, i);
                }
                let reason = format!("it cannot be copied to gpu{device}: {e}");
                tracing::warn!(model_id = %lease.id(), device, error = %e, retry_in = ?PROMOTION_RETRY_AFTER, "cannot copy the model to its GPU; it runs on the host meanwhile");
                ledger.failed.push(FailedCopy {
                    entry: Arc::downgrade(lease.entry()),
                    until: Instant::now() + PROMOTION_RETRY_AFTER,
                    reason: reason.clone(),
                });
                match required {
                    true => Err(MeshError::GpuUnavailable {
                        model_id: lease.id().clone(),
                        reason,
                        source: Some(e),
                    }),
                    false => Ok(()),
                }
            }
        };
        drop(ledger);
        self.inner.copy_ended.notify_all();
        self.refresh_gauges();
        result
    }

    fn refusal(&self, lease: &Lease, reason: String) -> MeshError {
        MeshError::GpuUnavailable { model_id: lease.id().clone(), reason, source: None }
    }

    fn host_only(&self, lease: &Lease, required: bool, why: String) -> Result<(), MeshError> {
        match required {
            true => Err(self.refusal(lease, why)),
            false => Ok(()),
        }
    }

    /// The devices as the instance record publishes them.
    pub fn records(&self) -> Vec<DeviceRecord> {
        if self.devices == 0 {
            return Vec::new();
        }
        let mut ledger = self.inner.ledger.lock();
        ledger.prune();
        ledger
            .devices
            .iter()
            .map(|d| DeviceRecord {
                name: d.name.clone(),
                kind: d.kind.clone(),
                total_bytes: d.total_bytes,
                capacity_bytes: d.capacity_bytes,
                used_bytes: d.used_bytes(),
                models: d.residents.len() as u64,
            })
            .collect()
    }

    /// Sets each device's `densemesh_used_bytes` and `densemesh_capacity_bytes` (`tier="gpuN"`).
    pub fn refresh_gauges(&self) {
        for record in self.records() {
            metrics::gauge!(m::USED_BYTES, "tier" => record.name.clone()).set(record.used_bytes as f64);
            metrics::gauge!(m::CAPACITY_BYTES, "tier" => record.name.clone())
                .set(record.capacity_bytes as f64);
            metrics::gauge!(m::GPU_MODELS, "tier" => record.name).set(record.models as f64);
        }
    }

    /// The ledger's bytes on each device, pruned or not: for tests.
    #[cfg(test)]
    fn charged(&self) -> Vec<u64> {
        self.inner.ledger.lock().devices.iter().map(TierDevice::used_bytes).collect()
    }
}

#[cfg(test)]
mod tests;
