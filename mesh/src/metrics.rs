//! Metric names and their help text, in one place so the README's table and the code agree.
//!
//! Names follow `densemesh_<noun>_<unit>`; each ModelMesh metric an operator may have dashboards on has
//! an equivalent here (see docs/metrics.md).

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

pub mod per_model;

pub const MODELS_LOADED: &str = "densemesh_models_loaded";
pub const MODEL_LOADS: &str = "densemesh_model_loads_total";
pub const MODEL_UNLOADS: &str = "densemesh_model_unloads_total";
pub const CACHE_EVICTIONS: &str = "densemesh_cache_evictions_total";
pub const CAPACITY_BYTES: &str = "densemesh_capacity_bytes";
pub const USED_BYTES: &str = "densemesh_used_bytes";
pub const GPU_MODELS: &str = "densemesh_gpu_models";
pub const GPU_PROMOTIONS: &str = "densemesh_gpu_promotions_total";
pub const GPU_DEMOTIONS: &str = "densemesh_gpu_demotions_total";
pub const GPU_PROMOTION_DURATION: &str = "densemesh_gpu_promotion_duration_seconds";
pub const LRU_AGE: &str = "densemesh_lru_age_seconds";
pub const LOADING_MODELS: &str = "densemesh_loading_models";
pub const LOADED_MODEL_SIZE: &str = "densemesh_loaded_model_size_bytes";
pub const LOAD_DURATION: &str = "densemesh_load_duration_seconds";
pub const UNLOAD_DURATION: &str = "densemesh_unload_duration_seconds";
pub const CACHE_MISS_WAIT: &str = "densemesh_cache_miss_wait_seconds";
pub const INFER_DURATION: &str = "densemesh_infer_duration_seconds";
pub const REQUEST_DURATION: &str = "densemesh_request_duration_seconds";
pub const REQUESTS: &str = "densemesh_requests_total";
pub const QUEUE_WAIT: &str = "densemesh_queue_wait_seconds";
pub const FORWARDED_REQUESTS: &str = "densemesh_forwarded_requests_total";
pub const PASSTHROUGH_REQUESTS: &str = "densemesh_passthrough_requests_total";
pub const PASSTHROUGH_DURATION: &str = "densemesh_passthrough_duration_seconds";
pub const REQUEST_SIZE: &str = "densemesh_request_size_bytes";
pub const RESPONSE_SIZE: &str = "densemesh_response_size_bytes";
pub const LOAD_QUEUE_WAIT: &str = "densemesh_load_queue_wait_seconds";
pub const AGE_AT_EVICTION: &str = "densemesh_age_at_eviction_seconds";
pub const MODELS_WITH_FAILURE: &str = "densemesh_models_with_failure";
pub const LRU_LAST_USED: &str = "densemesh_lru_last_used_timestamp_seconds";
pub const USED_BPS: &str = "densemesh_used_bps";
pub const MODELS_MANAGED: &str = "densemesh_models_managed";
pub const TASKS_ALIVE: &str = "densemesh_tasks_alive";
pub const REGISTRY_UP: &str = "densemesh_registry_up";
pub const LEADER: &str = "densemesh_leader";
pub const GRAPH_STEP_DURATION: &str = "densemesh_graph_step_duration_seconds";
pub const GRAPH_STEP_ERRORS: &str = "densemesh_graph_step_errors_total";

/// Buckets for latencies from tens of microseconds (tiny models) to minutes (large loads).
pub const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Buckets for model sizes, 64 KiB to 16 GiB.
pub const SIZE_BUCKETS: &[f64] = &[
    65_536.0,
    262_144.0,
    1_048_576.0,
    4_194_304.0,
    16_777_216.0,
    67_108_864.0,
    268_435_456.0,
    1_073_741_824.0,
    4_294_967_296.0,
    17_179_869_184.0,
];

/// Requests this process answered, for the request rate in its instance record (the Prometheus
/// counter cannot be read back).
static SERVED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Counts one answered ModelInfer request.
pub fn count_request() {
    SERVED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// Requests answered so far.
pub fn requests_served() -> u64 {
    SERVED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Registers help text for every metric, so `/metrics` documents itself.
pub fn describe() {
    describe_gauge!(MODELS_LOADED, "Models loaded in this pod's memory");
    describe_counter!(MODEL_LOADS, "Model loads finished, by result (success, failure)");
    describe_counter!(MODEL_UNLOADS, "Models unloaded (evicted or at shutdown)");
    describe_counter!(CACHE_EVICTIONS, "Models evicted from memory to make room for a load");
    describe_gauge!(
        CAPACITY_BYTES,
        Unit::Bytes,
        "Memory capacity for models (--capacity; tier=\"gpuN\": device N's, --gpu-capacity)"
    );
    describe_gauge!(
        USED_BYTES,
        Unit::Bytes,
        "Capacity charged to loaded models and loads in progress (host memory; tier=\"gpuN\": device N's copies)"
    );
    describe_gauge!(GPU_MODELS, "Models with a copy on the device (tier)");
    describe_counter!(GPU_PROMOTIONS, "Models copied from host to GPU memory before a call");
    describe_counter!(GPU_DEMOTIONS, "GPU copies dropped to make room on a device (the host copy stays)");
    describe_histogram!(GPU_PROMOTION_DURATION, Unit::Seconds, "Time to copy a model to its GPU");
    describe_gauge!(LRU_AGE, Unit::Seconds, "Time since the least recently used loaded model was used");
    describe_gauge!(LOADING_MODELS, "Model loads in progress");
    describe_histogram!(LOADED_MODEL_SIZE, Unit::Bytes, "Measured size of each model loaded");
    describe_histogram!(LOAD_DURATION, Unit::Seconds, "Time to load a model, from request to ready");
    describe_histogram!(UNLOAD_DURATION, Unit::Seconds, "Time to unload a model");
    describe_histogram!(CACHE_MISS_WAIT, Unit::Seconds, "Time a request waited for its model to load");
    describe_histogram!(INFER_DURATION, Unit::Seconds, "Time the runtime spent on one inference");
    describe_histogram!(REQUEST_DURATION, Unit::Seconds, "Time to answer one ModelInfer request, by code");
    describe_counter!(REQUESTS, "ModelInfer requests answered, by gRPC code");
    describe_histogram!(QUEUE_WAIT, Unit::Seconds, "Time an inference waited for a worker thread");
    describe_counter!(
        FORWARDED_REQUESTS,
        "Requests forwarded to another pod, by result (ok, retried, error, fallback)"
    );
    describe_counter!(
        PASSTHROUGH_REQUESTS,
        "Calls of a runtime's own gRPC methods passed to it by mm-model-id, by result (ok, error)"
    );
    describe_histogram!(
        PASSTHROUGH_DURATION,
        Unit::Seconds,
        "Time to answer one call passed to a runtime, the runtime's time included"
    );
    describe_histogram!(REQUEST_SIZE, Unit::Bytes, "Size of each ModelInfer request message");
    describe_histogram!(RESPONSE_SIZE, Unit::Bytes, "Size of each ModelInfer response message");
    describe_histogram!(
        LOAD_QUEUE_WAIT,
        Unit::Seconds,
        "Time a load waited for a load slot (--max-concurrent-loads)"
    );
    describe_histogram!(AGE_AT_EVICTION, Unit::Seconds, "Time since an evicted model was last used");
    describe_gauge!(
        MODELS_WITH_FAILURE,
        "Models whose last load failed and whose retry back-off has not ended"
    );
    describe_gauge!(
        LRU_LAST_USED,
        Unit::Seconds,
        "When the least recently used loaded model was last used (Unix time)"
    );
    describe_gauge!(USED_BPS, "Capacity in use, in basis points (100ths of a percent)");
    describe_gauge!(MODELS_MANAGED, "Models registered (API and repository)");
    describe_gauge!(
        TASKS_ALIVE,
        "Tasks alive on meshd's async runtime: flat under steady load, so growth is a leaked task"
    );
    describe_gauge!(REGISTRY_UP, "1 while the registry (etcd) answers this pod's heartbeats, else 0");
    describe_gauge!(LEADER, "1 while this pod leads (does the cluster-wide chores), else 0");
    describe_histogram!(
        GRAPH_STEP_DURATION,
        Unit::Seconds,
        "Time one step of an inference graph took, by graph and step (failed steps included)"
    );
    describe_counter!(GRAPH_STEP_ERRORS, "Inference graph steps that failed, by graph, step and gRPC code");
    describe_counter!(
        per_model::MODEL_REQUESTS,
        "ModelInfer requests served here, by model (the --metrics-per-model busiest, else other) and gRPC code"
    );
    describe_histogram!(
        per_model::MODEL_REQUEST_DURATION,
        Unit::Seconds,
        "Time to answer a ModelInfer request served here, by model (the --metrics-per-model busiest, else other)"
    );
    describe_puller();
    describe_remote_runtimes();
}

/// The remote runtimes' metrics (named in `densemesh_runtime_remote::metric_names`, recorded there).
fn describe_remote_runtimes() {
    use densemesh_runtime_remote::metric_names as r;
    describe_counter!(r::RESTARTS, "Remote runtime processes restarted (exited, failed to start, or hung)");
    describe_counter!(r::PROBE_FAILURES, "Liveness probes a remote runtime process failed");
    describe_histogram!(
        r::LOAD_DURATION,
        Unit::Seconds,
        "Time a remote runtime's server took to load a model"
    );
    describe_histogram!(
        r::UNLOAD_DURATION,
        Unit::Seconds,
        "Time a remote runtime's server took to unload a model"
    );
}

/// The puller's metrics (named in `densemesh_puller::metric_names`, recorded there).
fn describe_puller() {
    use densemesh_puller::metric_names as p;
    describe_counter!(p::PULLER_BYTES, Unit::Bytes, "Bytes downloaded from object storage");
    describe_histogram!(p::PULLER_DURATION, Unit::Seconds, "Time to pull a model into the disk cache");
    describe_counter!(p::PULLS, "Pulls from object storage finished, by result (success, failure)");
    describe_counter!(p::PULLER_RETRIES, "Storage requests retried after a failure or a timeout");
    describe_counter!(p::DISK_CACHE_HITS, "Remote models found in the disk cache, no download");
    describe_counter!(p::DISK_CACHE_MISSES, "Remote models that had to be downloaded");
    describe_counter!(p::DISK_CACHE_EVICTIONS, "Disk cache entries deleted to make room");
    describe_gauge!(
        p::DISK_CACHE_USED_BYTES,
        Unit::Bytes,
        "Disk cache bytes in use, downloads in progress included"
    );
    describe_gauge!(p::DISK_CACHE_CAPACITY_BYTES, Unit::Bytes, "Disk cache byte budget (--disk-capacity)");
}
