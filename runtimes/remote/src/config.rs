//! What a remote runtime is: which formats it serves, how its server processes start, and the limits
//! that keep a request from hanging on one of them.
//!
//! Shaped like a KServe `ServingRuntime` so the mesh can embed it in its `--runtime-config` file and the
//! controller can translate a ServingRuntime into it; unknown fields are rejected so a typo fails at
//! start-up instead of being ignored.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use densemesh_runtime_core::ModelFormat;
use serde::Deserialize;

use crate::RemoteError;

/// Placeholders substituted in [`RemoteRuntimeConfig::command`] and [`RemoteRuntimeConfig::env`] values
/// for each process the pool starts.
pub const PLACEHOLDERS: [&str; 5] =
    ["{grpc_port}", "{http_port}", "{metrics_port}", "{repository}", "{max_message_bytes}"];

/// One remote runtime: a KServe V2 server with the model-repository extension (MLServer, Triton), either
/// already running at [`endpoint`](Self::endpoint) or started as a pool of [`processes`](Self::processes)
/// from [`command`](Self::command).
///
/// The pool [`RemoteRuntimeConfig::mlserver`] builds, as it reads in a config file:
///
/// ```
/// let config: densemesh_runtime_remote::RemoteRuntimeConfig = serde_json::from_str(
///     r#"{
///         "name": "mlserver",
///         "supportedModelFormats": ["sklearn", {"name": "xgboost", "autoSelect": true}, "lightgbm"],
///         "command": ["/opt/mlserver/bin/mlserver", "start", "{repository}"],
///         "env": {
///             "MLSERVER_HOST": "127.0.0.1",
///             "MLSERVER_GRPC_PORT": "{grpc_port}",
///             "MLSERVER_HTTP_PORT": "{http_port}",
///             "MLSERVER_METRICS_PORT": "{metrics_port}",
///             "MLSERVER_PARALLEL_WORKERS": "0",
///             "MLSERVER_LOAD_MODELS_AT_STARTUP": "false"
///         },
///         "processes": 2,
///         "concurrency": 16,
///         "maxQueued": 128,
///         "multiplier": 1.25,
///         "minModelBytes": 1000000,
///         "timeouts": {"startup": "60s", "load": "30s", "infer": "30s", "unload": "10s"},
///         "restartBackoff": "1s",
///         "maxRestartBackoff": "30s",
///         "liveness": {"interval": "5s", "timeout": "2s", "failures": 3}
///     }"#,
/// )
/// .expect("a valid config");
/// config.validate().expect("consistent");
/// assert!(config.serves("xgboost"));
/// assert_eq!(config.implementations["sklearn"], "mlserver_sklearn.SKLearnModel");
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RemoteRuntimeConfig {
    /// The runtime's name, for logs, metrics and errors (e.g. `mlserver`).
    pub name: String,
    /// Model formats this runtime serves, matched against a model's registered type (see
    /// [`serves`](Self::serves)). Each is a name or a ServingRuntime `{name, version, autoSelect}`.
    pub supported_model_formats: Vec<ModelFormat>,
    /// The gRPC address of a server densemesh does not start or supervise (`http://127.0.0.1:8001`).
    /// Exactly one of `endpoint` and `command` is set.
    #[serde(default, alias = "grpcEndpoint")]
    pub endpoint: Option<String>,
    /// The argv that starts one server process; [`PLACEHOLDERS`] are replaced by that process's ports
    /// (free loopback ports picked at each start) and its own model-repository directory.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// Extra environment for each process; values may use the same placeholders.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The model repository: for `command`, the directory under which each process gets its own
    /// (`<repository>/<name>-<index>`, emptied at each start, so no two runtimes may share one), by
    /// default a fresh directory in the system temp dir that is removed on shutdown; for `endpoint`,
    /// the server's own repository as this pod sees it (a shared volume), required there.
    #[serde(default)]
    pub repository: Option<PathBuf>,
    /// How many server processes to start (with `command`); a model loads into the least loaded one.
    #[serde(default = "default_processes")]
    pub processes: usize,
    /// Inference requests in flight per process; more wait for a slot, in arrival order.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Inference requests that may wait for a slot per process, beyond `concurrency`; any more are
    /// refused at once with RESOURCE_EXHAUSTED naming the model and the runtime (as the mesh's own
    /// `--max-queued-inferences` does), and a waiting one fails at `timeouts.infer`. 0 refuses every
    /// request that finds no free slot.
    #[serde(default = "default_max_queued")]
    pub max_queued: usize,
    /// A model is charged its size on disk times this (ModelMesh's adapters' MODELSIZE_MULTIPLIER,
    /// 1.25).
    #[serde(default = "default_multiplier")]
    pub multiplier: f64,
    /// The least a model is charged, whatever its size on disk (ModelMesh's adapters' DEFAULT_MODELSIZE,
    /// 1 MB), since a server holds more than the file for even the smallest model.
    #[serde(default = "default_min_model_bytes")]
    pub min_model_bytes: u64,
    /// The MLServer `implementation` written into `model-settings.json` for each format; formats absent
    /// here get no `implementation` (the server infers it, or the model directory brings its own).
    #[serde(default = "default_implementations")]
    pub implementations: BTreeMap<String, String>,
    /// The largest gRPC message sent to or taken from a server (an inference request or answer), in
    /// bytes; ModelMesh's default is 16 MiB (tonic's own, 4 MiB, is too small for batched answers).
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// Deadlines; every call to a server has one, so a hung server fails calls instead of hanging them.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// The first wait before restarting a process that exited; doubled after each failed start.
    #[serde(default = "default_restart_backoff", with = "humantime_serde")]
    pub restart_backoff: Duration,
    /// The longest wait between restarts.
    #[serde(default = "default_max_restart_backoff", with = "humantime_serde")]
    pub max_restart_backoff: Duration,
    /// How a process that lives but no longer answers is found and restarted (pools only: an
    /// `endpoint` is not ours to restart).
    #[serde(default)]
    pub liveness: Liveness,
}

/// The liveness probe of each started process: a V2 ServerLive call every `interval`; after `failures`
/// in a row (no answer within `timeout`, or an error) the process is killed and restarted with the
/// usual back-off, and its models are lost as when it dies. Without it a hung server (deadlocked,
/// stopped, swapping) keeps its models and fails every call at its deadline, forever.
///
/// A server that runs inference on its own event loop (MLServer with no parallel workers) does not
/// answer while one inference runs, so `interval × failures` must exceed the longest inference. Probes
/// that fail while a model loads or unloads are not counted (it does not answer then either, and loads
/// have their own deadline).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Liveness {
    /// Between two probes.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// How long one probe waits for its answer.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Failed probes in a row that mean the process is hung.
    pub failures: u32,
}

impl Default for Liveness {
    /// 3 probes 5 s apart with 2 s each: a hung server is restarted within about 20 s, well before an
    /// inference's default 30 s deadline would fail a second round of calls.
    fn default() -> Self {
        Self { interval: Duration::from_secs(5), timeout: Duration::from_secs(2), failures: 3 }
    }
}

/// Deadlines of the calls to a server, written as `"30s"`, `"500ms"`, `"2m"`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Timeouts {
    /// How long a process may take to answer ServerReady after it starts.
    #[serde(with = "humantime_serde")]
    pub startup: Duration,
    /// Deadline of one RepositoryModelLoad plus the ModelMetadata that follows it (ModelMesh's
    /// adapters' LOADTIME_TIMEOUT, 30 s).
    #[serde(with = "humantime_serde")]
    pub load: Duration,
    /// Deadline of one inference, waiting for a concurrency slot included.
    #[serde(with = "humantime_serde")]
    pub infer: Duration,
    /// Deadline of one RepositoryModelUnload.
    #[serde(with = "humantime_serde")]
    pub unload: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            startup: Duration::from_secs(60),
            load: Duration::from_secs(30),
            infer: Duration::from_secs(30),
            unload: Duration::from_secs(10),
        }
    }
}

fn default_processes() -> usize {
    1
}
fn default_concurrency() -> usize {
    16
}
fn default_max_queued() -> usize {
    128
}
fn default_multiplier() -> f64 {
    1.25
}
fn default_min_model_bytes() -> u64 {
    1_000_000
}
fn default_max_message_bytes() -> usize {
    16 * 1024 * 1024
}
fn default_restart_backoff() -> Duration {
    Duration::from_secs(1)
}
fn default_max_restart_backoff() -> Duration {
    Duration::from_secs(30)
}

/// The implementations ModelMesh's MLServer adapter writes for the formats MLServer ships runtimes for.
pub fn default_implementations() -> BTreeMap<String, String> {
    [
        ("sklearn", "mlserver_sklearn.SKLearnModel"),
        ("xgboost", "mlserver_xgboost.XGBoostModel"),
        ("lightgbm", "mlserver_lightgbm.LightGBMModel"),
    ]
    .into_iter()
    .map(|(format, implementation)| (format.to_owned(), implementation.to_owned()))
    .collect()
}

impl RemoteRuntimeConfig {
    /// A pool of `processes` MLServer processes started with `mlserver start` from `mlserver` (the
    /// executable, a path or a name on `PATH`), serving sklearn, xgboost and lightgbm; every other field
    /// at its default. Inference runs in the server process itself (`parallel_workers` 0): a worker pool
    /// per process would multiply memory by the cores for models this pool already spreads over processes.
    pub fn mlserver(mlserver: impl Into<String>, processes: usize) -> Self {
        let env = [
            ("MLSERVER_HOST", "127.0.0.1"),
            ("MLSERVER_GRPC_PORT", "{grpc_port}"),
            ("MLSERVER_HTTP_PORT", "{http_port}"),
            ("MLSERVER_METRICS_PORT", "{metrics_port}"),
            ("MLSERVER_PARALLEL_WORKERS", "0"),
            ("MLSERVER_LOAD_MODELS_AT_STARTUP", "false"),
            // gRPC's own default, 4 MiB, would refuse what this side is configured to send.
            ("MLSERVER_GRPC_MAX_MESSAGE_LENGTH", "{max_message_bytes}"),
        ];
        Self {
            name: "mlserver".into(),
            supported_model_formats: ["sklearn", "xgboost", "lightgbm"].map(ModelFormat::named).to_vec(),
            endpoint: None,
            command: Some(vec![mlserver.into(), "start".into(), "{repository}".into()]),
            env: env.into_iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect(),
            repository: None,
            processes,
            concurrency: default_concurrency(),
            max_queued: default_max_queued(),
            multiplier: default_multiplier(),
            min_model_bytes: default_min_model_bytes(),
            implementations: default_implementations(),
            max_message_bytes: default_max_message_bytes(),
            timeouts: Timeouts::default(),
            restart_backoff: default_restart_backoff(),
            max_restart_backoff: default_max_restart_backoff(),
            liveness: Liveness::default(),
        }
    }

    /// Checks what serde cannot: exactly one of `endpoint` and `command`, sane counts and factors.
    pub fn validate(&self) -> Result<(), RemoteError> {
        let invalid =
            |field: &'static str, why: String| RemoteError::Config { runtime: self.name.clone(), field, why };
        if self.name.is_empty() {
            return Err(invalid("name", "must not be empty".into()));
        }
        if self.supported_model_formats.iter().all(|f| f.name.trim().is_empty()) {
            return Err(invalid("supportedModelFormats", "must name at least one model format".into()));
        }
        match (&self.endpoint, &self.command) {
            (Some(_), Some(_)) => {
                return Err(invalid("endpoint", "set either endpoint or command, not both".into()));
            }
            (None, None) => {
                return Err(invalid("command", "set command (a pool to start) or endpoint".into()));
            }
            (None, Some(argv)) if argv.first().is_none_or(|program| program.is_empty()) => {
                return Err(invalid("command", "must name a program".into()));
            }
            (Some(_), None) if self.repository.is_none() => {
                return Err(invalid(
                    "repository",
                    "an endpoint needs the server's repository directory".into(),
                ));
            }
            (Some(_), None) if self.processes > 1 => {
                return Err(invalid("processes", "an endpoint is one server; processes must be 1".into()));
            }
            _ => {}
        }
        if self.processes == 0 {
            return Err(invalid("processes", "must be at least 1".into()));
        }
        if self.concurrency == 0 {
            return Err(invalid("concurrency", "must be at least 1".into()));
        }
        if !(self.multiplier.is_finite() && self.multiplier > 0.0) {
            return Err(invalid("multiplier", format!("must be a positive number, not {}", self.multiplier)));
        }
        let liveness = &self.liveness;
        if liveness.interval.is_zero() || liveness.timeout.is_zero() || liveness.failures == 0 {
            return Err(invalid("liveness", "interval, timeout and failures must all be above zero".into()));
        }
        Ok(())
    }

    /// Whether this runtime serves models registered as `model_type`: case-insensitive, and a
    /// `name:version` type matches a format of that name whose version is unset or equal (ModelMesh's
    /// type constraints read types the same way).
    pub fn serves(&self, model_type: &str) -> bool {
        ModelFormat::any_serves(&self.supported_model_formats, model_type.trim())
    }

    /// The `implementation` for `model_type` (by its name, any version), if the config names one.
    pub(crate) fn implementation(&self, model_type: &str) -> Option<&str> {
        let (name, _) = split_type(model_type);
        self.implementations
            .iter()
            .find(|(f, _)| f.trim().eq_ignore_ascii_case(name))
            .map(|(_, i)| i.as_str())
    }

    /// What a model of `disk_bytes` on disk is charged: ModelMesh's adapters' disk size × multiplier,
    /// never less than the floor.
    pub(crate) fn charge(&self, disk_bytes: u64) -> u64 {
        // f64 holds every size below 2^53 bytes exactly; the cast saturates above u64::MAX.
        let scaled = (disk_bytes as f64 * self.multiplier).ceil() as u64;
        scaled.max(self.min_model_bytes)
    }
}

/// A model type's format name and version (`sklearn:1.3` → `sklearn`, `1.3`).
fn split_type(model_type: &str) -> (&str, Option<&str>) {
    match model_type.trim().split_once(':') {
        Some((name, version)) => (name, Some(version)),
        None => (model_type.trim(), None),
    }
}

/// The values placeholders stand for in one process's command and environment.
#[derive(Debug, Clone)]
pub(crate) struct Substitutions {
    pub grpc_port: u16,
    pub http_port: u16,
    pub metrics_port: u16,
    pub repository: PathBuf,
    pub max_message_bytes: usize,
}

impl Substitutions {
    pub(crate) fn apply(&self, template: &str) -> String {
        template
            .replace("{grpc_port}", &self.grpc_port.to_string())
            .replace("{http_port}", &self.http_port.to_string())
            .replace("{metrics_port}", &self.metrics_port.to_string())
            .replace("{repository}", &self.repository.to_string_lossy())
            .replace("{max_message_bytes}", &self.max_message_bytes.to_string())
    }
}

/// `Duration` fields as humantime strings (`"30s"`, `"1m 30s"`, `"500ms"`).
mod humantime_serde {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<RemoteRuntimeConfig, String> {
        let config: RemoteRuntimeConfig = serde_json::from_str(json).map_err(|e| e.to_string())?;
        config.validate().map_err(|e| e.to_string())?;
        Ok(config)
    }

    #[test]
    fn a_minimal_pool_gets_the_defaults() {
        let config =
            parse(r#"{"name": "mlserver", "supportedModelFormats": ["sklearn"], "command": ["mlserver", "start", "{repository}"]}"#)
                .expect("valid");
        assert_eq!(config.processes, 1);
        assert_eq!(config.multiplier, 1.25);
        assert_eq!(config.min_model_bytes, 1_000_000);
        assert_eq!(config.timeouts.load, Duration::from_secs(30));
        assert_eq!(config.timeouts.startup, Duration::from_secs(60));
        assert_eq!(config.liveness, Liveness::default());
        assert_eq!(config.implementation("sklearn"), Some("mlserver_sklearn.SKLearnModel"));
        assert_eq!(config.implementation("XGBoost:1"), Some("mlserver_xgboost.XGBoostModel"));
        assert_eq!(config.implementation("lightgbm"), Some("mlserver_lightgbm.LightGBMModel"));
        assert_eq!(config.implementation("onnx"), None);
    }

    #[test]
    fn durations_read_as_humantime_and_unknown_fields_are_refused() {
        let config = parse(
            r#"{"name": "m", "supportedModelFormats": ["sklearn"], "command": ["m"], "timeouts": {"startup": "2m", "infer": "250ms"}, "restartBackoff": "100ms", "liveness": {"interval": "1s"}}"#,
        )
        .expect("valid");
        assert_eq!(config.liveness, Liveness { interval: Duration::from_secs(1), ..Liveness::default() });
        assert_eq!(config.timeouts.startup, Duration::from_secs(120));
        assert_eq!(config.timeouts.infer, Duration::from_millis(250));
        assert_eq!(config.timeouts.load, Duration::from_secs(30), "unset deadlines keep their defaults");
        assert_eq!(config.restart_backoff, Duration::from_millis(100));
        let err =
            parse(r#"{"name": "m", "supportedModelFormats": ["sklearn"], "command": ["m"], "procesess": 2}"#)
                .unwrap_err();
        assert!(err.contains("unknown field `procesess`"), "{err}");
    }

    #[test]
    fn invalid_combinations_name_the_field_to_change() {
        let cases = [
            (r#"{"name": "m", "supportedModelFormats": ["sklearn"]}"#, "command"),
            (
                r#"{"name": "m", "supportedModelFormats": ["sklearn"], "command": ["m"], "endpoint": "http://x:1"}"#,
                "endpoint",
            ),
            (
                r#"{"name": "m", "supportedModelFormats": ["sklearn"], "endpoint": "http://x:1"}"#,
                "repository",
            ),
            (r#"{"name": "m", "supportedModelFormats": ["sklearn"], "command": []}"#, "command"),
            (r#"{"name": "m", "supportedModelFormats": [], "command": ["m"]}"#, "supportedModelFormats"),
            (
                r#"{"name": "m", "supportedModelFormats": ["sklearn"], "command": ["m"], "processes": 0}"#,
                "processes",
            ),
            (
                r#"{"name": "m", "supportedModelFormats": ["sklearn"], "command": ["m"], "concurrency": 0}"#,
                "concurrency",
            ),
            (
                r#"{"name": "m", "supportedModelFormats": ["sklearn"], "command": ["m"], "multiplier": 0}"#,
                "multiplier",
            ),
            (
                r#"{"name": "m", "supportedModelFormats": ["sklearn"], "endpoint": "http://x:1", "repository": "/r", "processes": 2}"#,
                "processes",
            ),
            (
                r#"{"name": "m", "supportedModelFormats": ["sklearn"], "command": ["m"], "liveness": {"failures": 0}}"#,
                "liveness",
            ),
            (
                r#"{"name": "m", "supportedModelFormats": ["sklearn"], "command": ["m"], "liveness": {"timeout": "0s"}}"#,
                "liveness",
            ),
        ];
        for (json, field) in cases {
            let err = parse(json).expect_err(json);
            assert!(err.contains(&format!("`{field}`")), "{json}: {err}");
        }
    }

    #[test]
    fn it_embeds_in_a_file_of_runtimes_tagged_by_kind() {
        // The shape of meshd's --runtime-config entries: an internally tagged enum, which buffers the
        // fields before this struct reads them (durations and unknown-field checks included).
        #[derive(Deserialize)]
        #[serde(tag = "kind", rename_all = "lowercase")]
        enum Entry {
            V2(RemoteRuntimeConfig),
        }
        let json = r#"{"kind": "v2", "name": "m", "supportedModelFormats": ["sklearn"], "command": ["m"],
                       "timeouts": {"load": "45s"}}"#;
        let Ok(Entry::V2(config)) = serde_json::from_str::<Entry>(json) else { panic!("embeds") };
        assert_eq!(config.timeouts.load, Duration::from_secs(45));
        let typo = r#"{"kind": "v2", "name": "m", "supportedModelFormats": ["sklearn"], "command": ["m"], "proceses": 1}"#;
        assert!(serde_json::from_str::<Entry>(typo).is_err(), "unknown fields are still refused");
    }

    #[test]
    fn formats_match_like_modelmesh_does() {
        let config = RemoteRuntimeConfig::mlserver("mlserver", 1);
        assert!(config.serves("sklearn"));
        assert!(config.serves("SKLearn:0.23"));
        assert!(!config.serves("onnx"));
        assert!(!config.serves(""));
        let pinned: RemoteRuntimeConfig = serde_json::from_str(
            r#"{"name": "m", "supportedModelFormats": [{"name": "XGBoost", "version": "1"}], "command": ["m"]}"#,
        )
        .expect("valid");
        assert!(pinned.serves("xgboost") && pinned.serves("xgboost:1"));
        assert!(!pinned.serves("xgboost:2"), "a pinned version serves that version alone");
    }

    #[test]
    fn a_model_is_charged_its_disk_size_times_the_multiplier_with_a_floor() {
        let config = RemoteRuntimeConfig::mlserver("mlserver", 1);
        assert_eq!(config.charge(0), 1_000_000);
        assert_eq!(config.charge(10), 1_000_000);
        assert_eq!(config.charge(8_000_000), 10_000_000);
        assert_eq!(config.charge(u64::MAX), u64::MAX);
    }

    #[test]
    fn placeholders_are_replaced_everywhere_they_appear() {
        let subs = Substitutions {
            grpc_port: 1,
            http_port: 2,
            metrics_port: 3,
            repository: PathBuf::from("/repo/a"),
            max_message_bytes: 4,
        };
        assert_eq!(
            subs.apply("{grpc_port}:{http_port}:{metrics_port}:{repository}:{max_message_bytes}"),
            "1:2:3:/repo/a:4"
        );
        assert_eq!(subs.apply("--port={grpc_port} --also={grpc_port}"), "--port=1 --also=1");
        for placeholder in PLACEHOLDERS {
            assert!(!subs.apply(placeholder).contains('{'), "{placeholder} is substituted");
        }
    }
}
