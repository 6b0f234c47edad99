//! The GPU tier's decisions, as pure functions over plain data.
//!
//! A pod with GPUs keeps two tiers of loaded models: every loaded model has its weights in host memory
//! (the cache's byte capacity), and those its runtime can run on a GPU may also hold a copy in one
//! device's memory, under that device's own capacity. Demoting a model drops its device copy and keeps
//! the host one, so promoting it again is a host-to-device copy, not a reload from disk.
//!
//! - Within a pod, [`choose_device`] says where a model about to run goes: a device with room, else
//!   the device where demoting its least recently used idle models frees enough (evict enough, not
//!   more; never a model with a call running on it), else the host.
//! - Across pods, [`GpuRoom`] summarises what a pod's devices can take, and [`narrow`] turns a
//!   model's ask ([`Gpu`]) into the pods placement may choose from: a `required` model only where
//!   some device could ever hold it, both asks preferring pods with device room now.

use serde::{Deserialize, Serialize};

use crate::choose::LoadCandidate;

/// What a registration asks of GPUs (the Predictor's `gpu`). A model that asks nothing runs on a
/// device where its pod has one with room and its runtime can use it, but placement does not steer it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Gpu {
    /// Prefer pods with free GPU memory; serve on CPU where none has room.
    Preferred,
    /// Only ever served from a GPU: never loaded on a pod without a device that could hold it.
    Required,
}

impl Gpu {
    /// The name used on the wire and in flags (`preferred`, `required`).
    pub fn as_str(self) -> &'static str {
        match self {
            Gpu::Preferred => "preferred",
            Gpu::Required => "required",
        }
    }
}

impl std::str::FromStr for Gpu {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "preferred" => Ok(Gpu::Preferred),
            "required" => Ok(Gpu::Required),
            _ => Err(format!("{s:?} is not a GPU requirement; write preferred or required")),
        }
    }
}

impl std::fmt::Display for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One GPU of a pod, as its instance record publishes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
// Accepts fields it does not know, as the instance record around it does.
pub struct DeviceRecord {
    /// The tier's name: `gpu0`, `gpu1`, … (the CUDA ordinal).
    pub name: String,
    /// The device's model name, e.g. `NVIDIA H100 80GB HBM3`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kind: String,
    /// The device's whole memory.
    pub total_bytes: u64,
    /// What models may take of it (`--gpu-capacity`).
    pub capacity_bytes: u64,
    /// What models on it are charged now.
    pub used_bytes: u64,
    /// Models with a copy on it now.
    #[serde(default)]
    pub models: u64,
}

/// What a pod's devices can take, for placement: the largest device capacity (a model larger than
/// that can never run there on a GPU) and the most free on one device now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GpuRoom {
    /// The capacity of its largest device (0: no GPU).
    pub largest_capacity_bytes: u64,
    /// The most free on any one device now.
    pub most_free_bytes: u64,
}

impl GpuRoom {
    /// The room of a pod publishing `devices` (none: no room at all).
    pub fn of(devices: &[DeviceRecord]) -> Self {
        Self {
            largest_capacity_bytes: devices.iter().map(|d| d.capacity_bytes).max().unwrap_or(0),
            most_free_bytes: devices
                .iter()
                .map(|d| d.capacity_bytes.saturating_sub(d.used_bytes))
                .max()
                .unwrap_or(0),
        }
    }

    /// Whether one device could hold `bytes`, demoting what it holds if need be.
    pub fn could_hold(&self, bytes: u64) -> bool {
        self.largest_capacity_bytes > 0 && self.largest_capacity_bytes >= bytes
    }

    /// Whether one device has `bytes` free now.
    pub fn has_room_for(&self, bytes: u64) -> bool {
        self.largest_capacity_bytes > 0 && self.most_free_bytes >= bytes
    }
}

/// The pods placement may choose among for a model asking `gpu` of `predicted_bytes`, best first:
/// `Ok` with one or two groups to try in order (the first non-empty group with an eligible pod wins),
/// `Err` with the largest device capacity among the pods when a `required` model fits none.
///
/// - No ask: every pod, one group.
/// - `preferred`: pods with device room now, then every pod.
/// - `required`: pods with device room now, then pods with a device large enough (they demote to make
///   room); never a pod without one.
pub fn narrow(
    pods: Vec<LoadCandidate>,
    gpu: Option<Gpu>,
    predicted_bytes: u64,
) -> Result<Vec<Vec<LoadCandidate>>, u64> {
    // Moved, not copied, for the models that ask nothing: most of them.
    let Some(gpu) = gpu else { return Ok(vec![pods]) };
    let with_room: Vec<LoadCandidate> =
        pods.iter().filter(|p| p.gpu.has_room_for(predicted_bytes)).cloned().collect();
    let rest: Vec<LoadCandidate> = match gpu {
        Gpu::Preferred => pods.clone(),
        Gpu::Required => pods.iter().filter(|p| p.gpu.could_hold(predicted_bytes)).cloned().collect(),
    };
    if rest.is_empty() {
        return Err(pods.iter().map(|p| p.gpu.largest_capacity_bytes).max().unwrap_or(0));
    }
    Ok(if with_room.is_empty() { vec![rest] } else { vec![with_room, rest] })
}

/// A model holding a copy on a device, as [`choose_device`] sees it. `Id` names it for the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceResident<Id> {
    pub id: Id,
    /// What its copy takes on the device.
    pub bytes: u64,
    /// Calls running on its device copy now: it is never demoted under them.
    pub in_flight: usize,
    /// When a call last used it, on any monotonic clock the caller keeps (larger is more recent).
    pub last_used: u64,
}

/// One device of this pod, as [`choose_device`] sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceState<Id> {
    /// What models may take of it (`--gpu-capacity`).
    pub capacity_bytes: u64,
    /// Bytes charged on it, copies being made included.
    pub used_bytes: u64,
    /// The models with a copy on it, in any order.
    pub residents: Vec<DeviceResident<Id>>,
}

/// Where a model about to run goes ([`choose_device`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placing<Id> {
    /// Copy it to `device`, after demoting `demote` (least recently used first; empty when the device
    /// has room).
    Device { device: usize, demote: Vec<Id> },
    /// No device can take it now: `larger_than_any` when it is larger than every device's capacity,
    /// else every device is full of models in use.
    Host { larger_than_any: bool },
}

/// Where a model of `bytes` goes among `devices`: the device with the most room when one has room;
/// else the device whose least recently used idle models, demoted in that order until enough is free,
/// were used longest ago (fewest demoted on ties, then the lower ordinal); else the host.
pub fn choose_device<Id: Clone>(devices: &[DeviceState<Id>], bytes: u64) -> Placing<Id> {
    let free = |d: &DeviceState<Id>| d.capacity_bytes.saturating_sub(d.used_bytes);
    let fitting =
        || devices.iter().enumerate().filter(|(_, d)| d.capacity_bytes >= bytes && d.capacity_bytes > 0);
    if let Some((device, _)) = fitting()
        .filter(|(_, d)| free(d) >= bytes)
        .max_by(|(i, a), (j, b)| free(a).cmp(&free(b)).then(j.cmp(i)))
    {
        return Placing::Device { device, demote: Vec::new() };
    }
    // Per device that could make room: the victims, and the last use of the most recent of them
    // (the demotion's cost: how recently the hottest model it pushes out was wanted).
    let mut best: Option<(usize, Vec<Id>, u64)> = None;
    for (device, state) in fitting() {
        let mut idle: Vec<&DeviceResident<Id>> =
            state.residents.iter().filter(|r| r.in_flight == 0).collect();
        idle.sort_by_key(|r| r.last_used);
        let needed = bytes - free(state);
        let (mut freed, mut victims, mut hottest) = (0u64, Vec::new(), 0u64);
        for r in idle {
            if freed >= needed {
                break;
            }
            freed += r.bytes;
            hottest = hottest.max(r.last_used);
            victims.push(r.id.clone());
        }
        if freed < needed {
            continue;
        }
        let better = match &best {
            None => true,
            Some((_, v, h)) => (hottest, victims.len()) < (*h, v.len()),
        };
        if better {
            best = Some((device, victims, hottest));
        }
    }
    match best {
        Some((device, demote, _)) => Placing::Device { device, demote },
        None => Placing::Host { larger_than_any: fitting().next().is_none() },
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::choose::test_pod;

    fn device(capacity: u64, residents: &[(u32, u64, usize, u64)]) -> DeviceState<u32> {
        let residents: Vec<_> = residents
            .iter()
            .map(|&(id, bytes, in_flight, last_used)| DeviceResident { id, bytes, in_flight, last_used })
            .collect();
        DeviceState {
            capacity_bytes: capacity,
            used_bytes: residents.iter().map(|r| r.bytes).sum(),
            residents,
        }
    }

    #[test]
    fn a_device_with_room_takes_the_model_without_demoting_anything() {
        let devices = [device(100, &[(1, 70, 0, 5)]), device(100, &[(2, 20, 0, 5)])];
        assert_eq!(choose_device(&devices, 30), Placing::Device { device: 1, demote: vec![] }, "most room");
        let even = [device(100, &[]), device(100, &[])];
        assert_eq!(choose_device(&even, 30), Placing::Device { device: 0, demote: vec![] }, "lower ordinal");
    }

    #[test]
    fn a_full_device_demotes_its_least_recently_used_idle_models_just_enough() {
        // 10 free; a 40-byte model needs 30 more: 3 (used at 1) then 1 (used at 2) free 40, not 4 too.
        let devices = [device(100, &[(1, 20, 0, 2), (2, 30, 1, 0), (3, 20, 0, 1), (4, 20, 0, 9)])];
        assert_eq!(choose_device(&devices, 40), Placing::Device { device: 0, demote: vec![3, 1] });
    }

    #[test]
    fn the_device_whose_victims_are_coldest_gives_them_up() {
        let devices = [device(100, &[(1, 100, 0, 50)]), device(100, &[(2, 50, 0, 10), (3, 50, 0, 20)])];
        assert_eq!(choose_device(&devices, 60), Placing::Device { device: 1, demote: vec![2, 3] });
        // Equally cold: fewer demotions win.
        let devices = [device(100, &[(1, 50, 0, 7), (2, 50, 0, 7)]), device(100, &[(3, 100, 0, 7)])];
        assert_eq!(choose_device(&devices, 60), Placing::Device { device: 1, demote: vec![3] });
    }

    #[test]
    fn models_in_use_are_never_demoted_and_too_large_ones_stay_on_the_host() {
        let busy = [device(100, &[(1, 60, 1, 0), (2, 40, 2, 0)])];
        assert_eq!(choose_device(&busy, 10), Placing::Host { larger_than_any: false });
        assert_eq!(choose_device(&busy, 101), Placing::Host { larger_than_any: true });
        assert_eq!(choose_device::<u32>(&[], 1), Placing::Host { larger_than_any: true }, "no device");
        let off = [DeviceState::<u32> { capacity_bytes: 0, used_bytes: 0, residents: vec![] }];
        assert_eq!(choose_device(&off, 0), Placing::Host { larger_than_any: true }, "capacity 0 is off");
    }

    fn with_gpu(mut pod: LoadCandidate, capacity: u64, free: u64) -> LoadCandidate {
        pod.gpu = GpuRoom { largest_capacity_bytes: capacity, most_free_bytes: free };
        pod
    }

    fn names(groups: &[Vec<LoadCandidate>]) -> Vec<Vec<&str>> {
        groups.iter().map(|g| g.iter().map(|p| p.instance.as_str()).collect()).collect()
    }

    #[test]
    fn asks_narrow_the_pods_placement_chooses_from() {
        let pods = [
            test_pod("cpu", 100, 0, 0),
            with_gpu(test_pod("full", 100, 0, 0), 50, 0),
            with_gpu(test_pod("room", 100, 0, 0), 50, 40),
        ];
        assert_eq!(names(&narrow(pods.to_vec(), None, 30).unwrap()), [vec!["cpu", "full", "room"]]);
        assert_eq!(
            names(&narrow(pods.to_vec(), Some(Gpu::Preferred), 30).unwrap()),
            [vec!["room"], vec!["cpu", "full", "room"]]
        );
        assert_eq!(
            names(&narrow(pods.to_vec(), Some(Gpu::Required), 30).unwrap()),
            [vec!["room"], vec!["full", "room"]]
        );
        assert_eq!(names(&narrow(pods.to_vec(), Some(Gpu::Required), 45).unwrap()), [vec!["full", "room"]]);
        assert_eq!(narrow(pods.to_vec(), Some(Gpu::Required), 60), Err(50), "larger than every device");
        assert_eq!(
            names(&narrow(pods.to_vec(), Some(Gpu::Preferred), 60).unwrap()),
            [vec!["cpu", "full", "room"]]
        );
    }

    #[test]
    fn device_records_read_back_and_sum_into_room() {
        let devices = vec![
            DeviceRecord {
                name: "gpu0".into(),
                kind: String::new(),
                total_bytes: 80,
                capacity_bytes: 70,
                used_bytes: 60,
                models: 3,
            },
            DeviceRecord {
                name: "gpu1".into(),
                kind: "H100".into(),
                total_bytes: 80,
                capacity_bytes: 40,
                used_bytes: 0,
                models: 0,
            },
        ];
        assert_eq!(GpuRoom::of(&devices), GpuRoom { largest_capacity_bytes: 70, most_free_bytes: 40 });
        let json = serde_json::to_string(&devices).unwrap();
        assert_eq!(serde_json::from_str::<Vec<DeviceRecord>>(&json).unwrap(), devices);
        assert_eq!(GpuRoom::of(&[]), GpuRoom::default());
        assert!(!GpuRoom::default().could_hold(0), "no device holds even an empty model");
        assert_eq!("Required".parse::<Gpu>(), Ok(Gpu::Required));
        assert!("always".parse::<Gpu>().is_err());
    }

    proptest! {
        /// Whatever the devices hold, a choice of a device never overruns it, never demotes a model in
        /// use, and demotes just enough: without its last victim the model would not fit.
        #[test]
        fn a_device_choice_fits_demotes_only_idle_models_and_no_more_than_needed(
            capacities in prop::collection::vec(0u64..200, 0..4),
            residents in prop::collection::vec((0usize..4, 1u64..80, 0usize..2, 0u64..100), 0..12),
            bytes in 0u64..220,
        ) {
            let mut devices: Vec<DeviceState<usize>> = capacities
                .iter()
                .map(|&c| DeviceState { capacity_bytes: c, used_bytes: 0, residents: vec![] })
                .collect();
            for (n, &(d, b, in_flight, last_used)) in residents.iter().enumerate() {
                if let Some(dev) = devices.get_mut(d)
                    && dev.used_bytes + b <= dev.capacity_bytes
                {
                    dev.used_bytes += b;
                    dev.residents.push(DeviceResident { id: n, bytes: b, in_flight, last_used });
                }
            }
            match choose_device(&devices, bytes) {
                Placing::Device { device, demote } => {
                    let d = &devices[device];
                    let freed: u64 = demote
                        .iter()
                        .map(|id| d.residents.iter().find(|r| r.id == *id).unwrap())
                        .inspect(|r| assert_eq!(r.in_flight, 0))
                        .map(|r| r.bytes)
                        .sum();
                    prop_assert!(d.used_bytes - freed + bytes <= d.capacity_bytes);
                    if let Some(last) = demote.last() {
                        let last = d.residents.iter().find(|r| r.id == *last).unwrap().bytes;
                        prop_assert!(d.used_bytes - (freed - last) + bytes > d.capacity_bytes);
                    }
                }
                Placing::Host { larger_than_any } => {
                    prop_assert_eq!(larger_than_any, devices.iter().all(|d| d.capacity_bytes < bytes || d.capacity_bytes == 0));
                    for d in devices.iter().filter(|d| d.capacity_bytes >= bytes && d.capacity_bytes > 0) {
                        let idle: u64 = d.residents.iter().filter(|r| r.in_flight == 0).map(|r| r.bytes).sum();
                        prop_assert!(d.capacity_bytes - d.used_bytes + idle < bytes);
                    }
                }
            }
        }
    }
}
