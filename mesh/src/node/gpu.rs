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
use std::time::Instant;

use densemesh_placement::ModelId;
use densemesh_placement::gpu::{DeviceRecord, DeviceResident, DeviceState, Gpu, Placing, choose_device};
use densemesh_runtime_gpu::Device;
use parking_lot::Mutex;

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

/// What the tier asks of a model's registration: its spec's `gpu`, if any.
pub type GpuAsk = Arc<dyn Fn(&ModelId) -> Option<Gpu> + Send + Sync>;

/// One device of the tier.
struct TierDevice {
    name: String,
    kind: String,
    total_bytes: u64,
    capacity_bytes: u64,
    used_bytes: u64,
    residents: Vec<Resident>,
}

/// A model with a copy on a device (or one being made).
struct Resident {
    entry: Weak<Entry>,
    bytes: u64,
    last_used: u64,
}

struct Ledger {
    devices: Vec<TierDevice>,
    /// Ticks once per use: the residents' LRU order.
    clock: u64,
}

impl Ledger {
    /// Forgets models the host cache dropped: their device copies went with them.
    fn prune(&mut self) {
        for device in &mut self.devices {
            let mut freed = 0;
            device.residents.retain(|r| {
                let alive = r.entry.strong_count() > 0;
                if !alive {
                    freed += r.bytes;
                }
                alive
            });
            device.used_bytes -= freed;
        }
    }

    fn find(&self, entry: &Arc<Entry>) -> Option<(usize, usize)> {
        self.devices.iter().enumerate().find_map(|(d, device)| {
            device
                .residents
                .iter()
                .position(|r| std::ptr::eq(r.entry.as_ptr(), Arc::as_ptr(entry)))
                .map(|i| (d, i))
        })
    }

    fn remove(&mut self, device: usize, index: usize) -> Resident {
        let resident = self.devices[device].residents.swap_remove(index);
        self.devices[device].used_bytes -= resident.bytes;
        resident
    }
}

/// The GPU tier of this pod; cloneable. Empty (no devices) on a pod without GPUs, where every call is
/// a no-op and nothing is published.
#[derive(Clone)]
pub struct GpuTier {
    ledger: Arc<Mutex<Ledger>>,
    /// How many devices the ledger has (fixed at start), read without its lock.
    devices: usize,
    ask: GpuAsk,
}

impl GpuTier {
    /// A tier over `devices`, each given its share of `capacity`; `ask` tells a model's GPU ask.
    pub fn new(devices: &[Device], capacity: &GpuCapacity, ask: GpuAsk) -> Self {
        let devices: Vec<TierDevice> = devices
            .iter()
            .map(|d| TierDevice {
                name: format!("gpu{}", d.ordinal),
                kind: d.name.clone(),
                total_bytes: d.total_bytes,
                capacity_bytes: capacity.bytes_of(d.ordinal, d.total_bytes),
                used_bytes: 0,
                residents: Vec::new(),
            })
            .collect();
        let count = devices.len();
        let tier = Self { ledger: Arc::new(Mutex::new(Ledger { devices, clock: 0 })), devices: count, ask };
        tier.refresh_gauges();
        tier
    }

    /// A tier without devices.
    pub fn none() -> Self {
        Self::new(&[], &GpuCapacity::default(), Arc::new(|_| None))
    }

    /// Whether the pod has no device to place models on.
    pub fn is_empty(&self) -> bool {
        self.devices == 0
    }

    /// Before a call on `lease`, on the request's own thread: marks the use of a model on a device (its
    /// place in that device's LRU), and says whether the call must first go through
    /// [`place`](Self::place) (blocking, so the worker keeps it off the async thread): a model its
    /// runtime can run on a GPU with no device copy yet, or one that requires a GPU. Cheap: a pod
    /// without GPUs only reads the model's ask, and only for models that could use one.
    pub fn before_call(&self, lease: &Lease) -> bool {
        let Some(copy) = lease.model().device_copy() else { return self.requires_gpu(lease) };
        if self.devices == 0 {
            return self.requires_gpu(lease);
        }
        if copy.device().is_none() {
            return true;
        }
        let mut ledger = self.ledger.lock();
        ledger.clock += 1;
        let now = ledger.clock;
        match ledger.find(lease.entry()) {
            Some((d, i)) => {
                ledger.devices[d].residents[i].last_used = now;
                false
            }
            // On a device the ledger does not list (a demotion racing this call): place it again.
            None => true,
        }
    }

    fn requires_gpu(&self, lease: &Lease) -> bool {
        (self.ask)(lease.id()) == Some(Gpu::Required)
    }

    /// Before a call on `lease`: puts a model its runtime can run on a GPU onto a device when one can
    /// take it (demoting the least recently used idle models of that device if it must), and marks
    /// its use. Blocking: a promotion is a host-to-device copy. A model that requires a GPU and gets
    /// none is refused with UNAVAILABLE saying why; any other model runs on the host instead.
    pub fn place(&self, lease: &Lease) -> Result<(), MeshError> {
        let ask = (self.ask)(lease.id());
        let Some(copy) = lease.model().device_copy() else {
            return match ask {
                Some(Gpu::Required) => Err(MeshError::GpuUnavailable(format!(
                    "model {} requires a GPU, and its runtime ({}) runs on the CPU only",
                    lease.id(),
                    lease.runtime()
                ))),
                _ => Ok(()),
            };
        };
        let bytes = copy.device_bytes();
        let (device, demote) = {
            let mut ledger = self.ledger.lock();
            ledger.prune();
            ledger.clock += 1;
            let now = ledger.clock;
            if let Some((d, i)) = ledger.find(lease.entry()) {
                // On a device, or being copied there by another call (this one runs on the host
                // meanwhile, which is only slower).
                ledger.devices[d].residents[i].last_used = now;
                return Ok(());
            }
            if ledger.devices.is_empty() {
                return self.host_only(lease, ask, "this pod has no GPU");
            }
            let states: Vec<DeviceState<usize>> = ledger
                .devices
                .iter()
                .map(|d| DeviceState {
                    capacity_bytes: d.capacity_bytes,
                    used_bytes: d.used_bytes,
                    residents: d
                        .residents
                        .iter()
                        .enumerate()
                        .map(|(i, r)| DeviceResident {
                            id: i,
                            bytes: r.bytes,
                            in_flight: r.entry.upgrade().map_or(0, |e| e.in_flight()),
                            last_used: r.last_used,
                        })
                        .collect(),
                })
                .collect();
            let (device, mut victims) = match choose_device(&states, bytes) {
                Placing::Device { device, demote } => (device, demote),
                Placing::Host { larger_than_any: true } => {
                    let why = format!(
                        "it needs {bytes} bytes of GPU memory, more than any device's capacity (--gpu-capacity)"
                    );
                    return self.host_only(lease, ask, &why);
                }
                Placing::Host { larger_than_any: false } => {
                    return self.host_only(lease, ask, "every GPU is full of models in use");
                }
            };
            // Highest index first, so each removal leaves the lower indices in place.
            victims.sort_unstable_by(|a, b| b.cmp(a));
            let demote: Vec<Arc<Entry>> =
                victims.into_iter().filter_map(|i| ledger.remove(device, i).entry.upgrade()).collect();
            let target = &mut ledger.devices[device];
            target.used_bytes += bytes;
            target.residents.push(Resident { entry: Arc::downgrade(lease.entry()), bytes, last_used: now });
            (device, demote)
        };
        for victim in &demote {
            if let Some(copy) = victim.model().device_copy() {
                copy.demote();
            }
            metrics::counter!(m::GPU_DEMOTIONS).increment(1);
            tracing::debug!(model_id = %victim.id(), device, "demoted to host memory");
        }
        let started = Instant::now();
        let promoted = copy.promote(device);
        let result = match promoted {
            Ok(()) => {
                metrics::counter!(m::GPU_PROMOTIONS).increment(1);
                metrics::histogram!(m::GPU_PROMOTION_DURATION).record(started.elapsed().as_secs_f64());
                Ok(())
            }
            Err(e) => {
                let mut ledger = self.ledger.lock();
                if let Some((d, i)) = ledger.find(lease.entry()) {
                    ledger.remove(d, i);
                }
                drop(ledger);
                tracing::warn!(model_id = %lease.id(), device, error = %e, "cannot copy the model to its GPU; it runs on the host");
                match ask {
                    Some(Gpu::Required) => Err(MeshError::GpuUnavailable(format!(
                        "model {} requires a GPU and cannot be copied to gpu{device}: {e}",
                        lease.id()
                    ))),
                    _ => Ok(()),
                }
            }
        };
        self.refresh_gauges();
        result
    }

    fn host_only(&self, lease: &Lease, ask: Option<Gpu>, why: &str) -> Result<(), MeshError> {
        match ask {
            Some(Gpu::Required) => {
                Err(MeshError::GpuUnavailable(format!("model {} requires a GPU, and {why}", lease.id())))
            }
            _ => Ok(()),
        }
    }

    /// The devices as the instance record publishes them.
    pub fn records(&self) -> Vec<DeviceRecord> {
        let mut ledger = self.ledger.lock();
        ledger.prune();
        ledger
            .devices
            .iter()
            .map(|d| DeviceRecord {
                name: d.name.clone(),
                kind: d.kind.clone(),
                total_bytes: d.total_bytes,
                capacity_bytes: d.capacity_bytes,
                used_bytes: d.used_bytes,
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
}

#[cfg(test)]
mod tests;
