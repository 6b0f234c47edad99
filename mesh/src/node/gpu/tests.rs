//! The GPU tier over fake devices: models whose "device copy" is bookkeeping on a shared fake device
//! memory that fails the test if it is ever overrun, and whose answers say where they ran.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use densemesh_placement::ModelId;
use densemesh_placement::gpu::Gpu;
use densemesh_runtime_core::{
    DataType, DeviceCopy, InferRequest, LoadedModel, ModelMetadata, Tensor, TensorData,
};
use densemesh_runtime_gpu::Device;
use parking_lot::Mutex;

use super::*;
use crate::node::cache::Lease;

/// Device memory in use per ordinal, as the fake copies take and give it back.
#[derive(Default)]
struct FakeDevices {
    total: Vec<u64>,
    used: Mutex<HashMap<usize, u64>>,
    /// Promotions that fail, by model name: a driver error.
    broken: Mutex<Vec<String>>,
    /// How long a promotion takes.
    copy_time: Mutex<std::time::Duration>,
    /// Promotions tried, failed ones included.
    tries: AtomicUsize,
}

struct FakeModel {
    name: String,
    bytes: u64,
    devices: Arc<FakeDevices>,
    on: Mutex<Option<usize>>,
    metadata: ModelMetadata,
}

impl DeviceCopy for FakeModel {
    fn device_bytes(&self) -> u64 {
        self.bytes
    }

    fn device(&self) -> Option<usize> {
        *self.on.lock()
    }

    fn promote(&self, ordinal: usize) -> densemesh_runtime_core::Result<()> {
        self.devices.tries.fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(*self.devices.copy_time.lock());
        if self.devices.broken.lock().contains(&self.name) {
            return Err(densemesh_runtime_core::Error::RuntimeUnavailable("out of device memory".into()));
        }
        self.demote();
        let mut used = self.devices.used.lock();
        let now = used.entry(ordinal).or_default();
        *now += self.bytes;
        assert!(*now <= self.devices.total[ordinal], "gpu{ordinal} overrun: {now} bytes");
        *self.on.lock() = Some(ordinal);
        Ok(())
    }

    fn demote(&self) {
        if let Some(ordinal) = self.on.lock().take() {
            *self.devices.used.lock().get_mut(&ordinal).unwrap() -= self.bytes;
        }
    }
}

impl Drop for FakeModel {
    fn drop(&mut self) {
        self.demote();
    }
}

impl LoadedModel for FakeModel {
    fn metadata(&self) -> &ModelMetadata {
        &self.metadata
    }

    fn size_bytes(&self) -> u64 {
        self.bytes
    }

    fn runtime(&self) -> &str {
        "fake"
    }

    /// Answers with the model's name and where it ran (`host` or `gpuN`).
    fn infer(&self, _request: InferRequest) -> densemesh_runtime_core::Result<Vec<Tensor>> {
        let on = self.device().map_or("host".to_owned(), |d| format!("gpu{d}"));
        let answer = format!("{}@{on}", self.name);
        Ok(vec![Tensor {
            name: "where".into(),
            datatype: DataType::Bytes,
            shape: vec![1],
            data: TensorData::Strings(vec![answer.into_bytes().into()]),
        }])
    }

    fn device_copy(&self) -> Option<&dyn DeviceCopy> {
        Some(self)
    }
}

struct Rig {
    devices: Arc<FakeDevices>,
    tier: GpuTier,
}

/// A tier over fake devices of these sizes, each with its whole memory as capacity.
fn rig(device_bytes: &[u64]) -> Rig {
    let devices = Arc::new(FakeDevices { total: device_bytes.to_vec(), ..Default::default() });
    let listed: Vec<Device> = device_bytes
        .iter()
        .enumerate()
        .map(|(ordinal, &total)| Device {
            ordinal,
            name: "fake".into(),
            total_bytes: total,
            free_bytes: total,
        })
        .collect();
    let tier = GpuTier::new(&listed, &"100%".parse().unwrap());
    Rig { devices, tier }
}

impl Rig {
    fn model(&self, name: &str, bytes: u64) -> Lease {
        self.model_asking(name, bytes, None)
    }

    fn model_asking(&self, name: &str, bytes: u64, gpu: Option<Gpu>) -> Lease {
        let model = FakeModel {
            name: name.into(),
            bytes,
            devices: self.devices.clone(),
            on: Mutex::new(None),
            metadata: ModelMetadata { platform: "fake".into(), inputs: vec![], outputs: vec![] },
        };
        Lease::detached_asking(ModelId::new(name).unwrap(), Box::new(model), gpu)
    }

    /// A call on `lease` as the worker makes it: placed, then run; its answer.
    fn call(&self, lease: &Lease) -> Result<String, MeshError> {
        call(&self.tier, lease)
    }

    fn used(&self) -> Vec<u64> {
        self.tier.records().iter().map(|r| r.used_bytes).collect()
    }

    fn tries(&self) -> usize {
        self.devices.tries.load(Ordering::Relaxed)
    }
}

fn call(tier: &GpuTier, lease: &Lease) -> Result<String, MeshError> {
    if tier.before_call(lease) {
        tier.place(lease)?;
    }
    let out = lease.model().infer(InferRequest::default()).unwrap();
    match &out[0].data {
        TensorData::Strings(s) => Ok(String::from_utf8(s[0].to_vec()).unwrap()),
        other => panic!("{other:?}"),
    }
}

fn on(lease: &Lease) -> Option<usize> {
    lease.model().device_copy().unwrap().device()
}

#[test]
fn a_model_is_promoted_on_its_first_call_and_stays_while_there_is_room() {
    let rig = rig(&[100, 100]);
    let a = rig.model("a", 60);
    let b = rig.model("b", 60);
    assert_eq!(rig.call(&a).unwrap(), "a@gpu0");
    assert_eq!(rig.call(&b).unwrap(), "b@gpu1", "the device with room, not a demotion");
    assert_eq!(rig.call(&a).unwrap(), "a@gpu0", "a second call finds it there");
    assert!(!rig.tier.before_call(&a));
    assert_eq!(rig.used(), [60, 60]);
    let records = rig.tier.records();
    assert_eq!((records[0].name.as_str(), records[0].models, records[0].capacity_bytes), ("gpu0", 1, 100));
}

#[test]
fn a_full_device_demotes_its_least_recently_used_idle_model_and_promotes_it_again_on_use() {
    let rig = rig(&[100]);
    let (a, b, c) = (rig.model("a", 40), rig.model("b", 40), rig.model("c", 40));
    assert_eq!(rig.call(&a).unwrap(), "a@gpu0");
    assert_eq!(rig.call(&b).unwrap(), "b@gpu0");
    // a and b go idle: their entries stay alive (as the host cache keeps them) with no lease on them.
    let (a_lease, b_lease) = (a, b);
    let (a, b) = (a_lease.entry().clone(), b_lease.entry().clone());
    drop((a_lease, b_lease));
    assert_eq!(rig.call(&c).unwrap(), "c@gpu0");
    assert_eq!(on_entry(&a), None, "a, the least recently used, was demoted");
    assert_eq!(on_entry(&b), Some(0), "b stayed: demoting a freed enough");
    assert_eq!(rig.used(), [80]);
    let c_lease = c;
    let c = c_lease.entry().clone();
    drop(c_lease);
    // a comes back: promoted again over b, now the least recently used idle model.
    let a_again = Lease::detached_from(a.clone());
    assert_eq!(rig.call(&a_again).unwrap(), "a@gpu0");
    assert_eq!(on_entry(&b), None);
    assert_eq!((on_entry(&a), on_entry(&c)), (Some(0), Some(0)));
    assert_eq!(rig.used(), [80]);
}

fn on_entry(entry: &Arc<crate::node::cache::Entry>) -> Option<usize> {
    entry.model().device_copy().unwrap().device()
}

#[test]
fn a_model_with_a_call_running_is_never_demoted() {
    let rig = rig(&[100]);
    let busy = rig.model("busy", 80);
    assert_eq!(rig.call(&busy).unwrap(), "busy@gpu0");
    let other = rig.model("other", 40);
    // `busy`'s lease is held: a call runs on it. `other` runs on the host rather than evict it.
    assert_eq!(rig.call(&other).unwrap(), "other@host");
    assert_eq!(on(&busy), Some(0));
    drop(busy);
    // `busy` is gone from the host cache too (no entry holds it): its device bytes are free again.
    assert_eq!(rig.call(&other).unwrap(), "other@gpu0");
    assert_eq!(rig.used(), [40]);
}

#[test]
fn a_model_requiring_a_gpu_is_refused_with_the_reason_never_run_on_the_host() {
    let rig = rig(&[100]);
    let big = rig.model_asking("big", 120, Some(Gpu::Required));
    let err = rig.call(&big).unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert!(err.to_string().contains("more GPU memory than any device's capacity (--gpu-capacity)"), "{err}");
    assert!(rig.tier.before_call(&big), "refused again, from what the tier remembers");
    assert!(rig.call(&big).is_err());

    let busy = rig.model("busy", 90);
    rig.call(&busy).unwrap();
    let wait = rig.model_asking("wait", 20, Some(Gpu::Required));
    let err = rig.call(&wait).unwrap_err();
    assert!(err.to_string().contains("every GPU is full of models in use"), "{err}");
    // A model that only prefers one runs on the host in the same spot.
    let either = rig.model_asking("either", 20, Some(Gpu::Preferred));
    assert_eq!(rig.call(&either).unwrap(), "either@host");
    // One larger than any device that does not require a GPU is parked on the host: its calls skip
    // the tier from then on.
    let large = rig.model("large", 500);
    assert_eq!(rig.call(&large).unwrap(), "large@host");
    assert!(!rig.tier.before_call(&large));

    let none = self::rig(&[]);
    let err = none.call(&none.model_asking("x", 1, Some(Gpu::Required))).unwrap_err();
    assert!(err.to_string().contains("this pod has no GPU"), "{err}");
    assert!(!none.tier.before_call(&none.model("y", 1)), "nothing to do on a pod without GPUs");
}

#[test]
fn a_model_requiring_a_gpu_waits_for_the_copy_another_call_is_making() {
    let rig = rig(&[100]);
    *rig.devices.copy_time.lock() = Duration::from_millis(200);
    let lease = rig.model_asking("m", 50, Some(Gpu::Required));
    let entry = lease.entry().clone();
    let tier = rig.tier.clone();
    let first = std::thread::spawn(move || call(&tier, &lease));
    // The second call comes while the first copies.
    while rig.tries() == 0 {
        std::thread::yield_now();
    }
    let second = Lease::detached_from(entry);
    assert_eq!(rig.call(&second).unwrap(), "m@gpu0", "waited, never ran on the host");
    assert_eq!(first.join().unwrap().unwrap(), "m@gpu0");
    assert_eq!(rig.tries(), 1, "one copy");
}

#[test]
fn concurrent_calls_over_a_full_device_keep_the_ledger_and_the_device_in_step() {
    let rig = rig(&[100]);
    *rig.devices.copy_time.lock() = Duration::from_micros(200);
    // Five models of 40 bytes over room for two: promotions and demotions race calls on every model.
    let entries: Vec<_> = (0..5).map(|i| rig.model(&format!("m{i}"), 40).entry().clone()).collect();
    std::thread::scope(|scope| {
        for t in 0..4 {
            let (tier, entries) = (&rig.tier, &entries);
            scope.spawn(move || {
                for n in 0..300 {
                    let entry = &entries[(t * 7 + n * 3) % entries.len()];
                    let answer = call(tier, &Lease::detached_from(entry.clone())).unwrap();
                    assert!(answer.starts_with(&format!("{}@", entry.id())), "{answer}");
                }
            });
        }
    });
    let on_device = entries.iter().filter(|e| on_entry(e).is_some()).count() as u64 * 40;
    assert_eq!(rig.tier.charged(), [on_device], "the ledger charges exactly the copies on the device");
    assert_eq!(*rig.devices.used.lock().get(&0).unwrap(), on_device);
    assert!((40..=100).contains(&on_device), "{on_device}");
    assert!(rig.tries() > 5, "models moved both ways");
}

#[test]
fn a_failed_copy_serves_from_the_host_and_is_not_tried_again_at_once() {
    let rig = rig(&[100]);
    let idle_lease = rig.model("idle", 80);
    rig.call(&idle_lease).unwrap();
    let idle = idle_lease.entry().clone();
    drop(idle_lease);
    rig.devices.broken.lock().push("m".into());
    let m = rig.model("m", 30);
    assert_eq!(rig.call(&m).unwrap(), "m@host");
    assert_eq!(rig.used(), [0], "the reservation was given back (the idle model was demoted for it)");
    assert_eq!(on_entry(&idle), None);
    assert!(!rig.tier.before_call(&m), "the next calls run on the host without a new try");
    assert_eq!(rig.tries(), 2);

    let required = rig.model_asking("r", 30, Some(Gpu::Required));
    rig.devices.broken.lock().push("r".into());
    let err = rig.call(&required).unwrap_err();
    assert!(err.to_string().contains("cannot be copied to gpu0: "), "{err}");
    assert!(std::error::Error::source(&err).is_some(), "the copy's error is kept as the cause");
    let again = rig.call(&required).unwrap_err();
    assert!(again.to_string().contains("cannot be copied to gpu0: "), "{again}");
    assert_eq!(rig.tries(), 3, "remembered, not tried again");
}

#[test]
fn gpu_capacities_parse_per_device_and_for_all() {
    let capacity: GpuCapacity = "80%,1=10GiB".parse().unwrap();
    assert_eq!(capacity.bytes_of(0, 100 << 30), 80 << 30);
    assert_eq!(capacity.bytes_of(1, 100 << 30), 10 << 30);
    assert_eq!(capacity.bytes_of(1, 4 << 30), 4 << 30, "never more than the device has");
    assert_eq!(capacity.to_string(), "80%,1=10GiB");
    assert_eq!(GpuCapacity::default().bytes_of(3, 1000), 900);
    assert_eq!("0=50%".parse::<GpuCapacity>().unwrap().bytes_of(1, 1000), 900, "others keep the default");
    let device = |ordinal| Device { ordinal, name: String::new(), total_bytes: 1, free_bytes: 1 };
    assert_eq!("0=1GiB,2=1GiB".parse::<GpuCapacity>().unwrap().unknown_devices(&[device(0)]), [2]);
    for bad in ["lots", "1=", "x=5GiB", "50%,60%", "120%"] {
        assert!(bad.parse::<GpuCapacity>().is_err(), "{bad}");
    }
}
