//! What an SPI runtime is: its name, the model formats it serves, where it listens, and the deadlines
//! that keep every call to it bounded.
//!
//! Shaped like a KServe `ServingRuntime` entry (camelCase, as Kubernetes writes it) so the mesh can embed
//! it in its `--runtime-config` file and the controller can translate a ServingRuntime into it:
//! `grpcEndpoint` and `grpcDataEndpoint` are accepted as the ServingRuntime spells them. Unknown fields
//! are refused so a typo fails at start-up instead of being ignored.

use std::time::Duration;

use densemesh_runtime_core::ModelFormat;
use serde::Deserialize;

use crate::SpiError;
use crate::endpoint::RuntimeEndpoint;

/// One model server driven through the model-runtime SPI.
///
/// ```yaml
/// name: my-triton
/// supportedModelFormats:
///   - name: onnx
///     version: "1"
///   - tensorflow
/// endpoint: unix:///var/run/mm/runtime.sock   # or 127.0.0.1:8085, http://host:8085, port:8085
/// dataEndpoint: port:8001                      # optional: where inference goes, if not `endpoint`
/// timeouts:
///   startup: 2m
///   infer: 30s
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SpiRuntimeConfig {
    /// The runtime's name, for logs, metrics and errors.
    pub name: String,
    /// Model formats this runtime serves, matched against a model's registered type (see
    /// [`serves`](Self::serves)). Each is a name or a ServingRuntime `{name, version, autoSelect}`.
    pub supported_model_formats: Vec<ModelFormat>,
    /// Where the runtime serves `mmesh.ModelRuntime`: `host:port`, `http://host:port`, `port:N`
    /// (loopback, as a ServingRuntime writes it) or `unix:///path/to.sock`.
    #[serde(alias = "grpcEndpoint")]
    pub endpoint: String,
    /// Where it serves inference (V2 and its own methods), when that is not `endpoint`: ModelMesh's
    /// adapters take the SPI on one port while the server behind them takes inference on another.
    #[serde(default, alias = "grpcDataEndpoint")]
    pub data_endpoint: Option<String>,
    /// Deadlines; every call to the runtime has one, so a dead runtime fails calls instead of hanging them.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// The largest gRPC message taken from the runtime (an inference answer), in bytes; ModelMesh's
    /// default is 16 MiB.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
}

impl SpiRuntimeConfig {
    /// A config with the default deadlines, for code and tests that build one by hand.
    pub fn new(name: impl Into<String>, endpoint: impl Into<String>, formats: &[&str]) -> Self {
        Self {
            name: name.into(),
            supported_model_formats: formats.iter().map(|f| ModelFormat::named(*f)).collect(),
            endpoint: endpoint.into(),
            data_endpoint: None,
            timeouts: Timeouts::default(),
            max_message_bytes: default_max_message_bytes(),
        }
    }

    /// Whether this runtime serves models registered as `model_type`: case-insensitive, and a
    /// `name:version` type matches a format of that name whose version is unset or equal (ModelMesh's
    /// type constraints read types the same way).
    pub fn serves(&self, model_type: &str) -> bool {
        ModelFormat::any_serves(&self.supported_model_formats, model_type)
    }

    /// The SPI endpoint, parsed.
    pub fn spi_endpoint(&self) -> Result<RuntimeEndpoint, SpiError> {
        RuntimeEndpoint::parse(&self.endpoint).map_err(|reason| SpiError::InvalidConfig {
            runtime: self.name.clone(),
            field: "endpoint",
            reason,
        })
    }

    /// The inference endpoint, parsed: `dataEndpoint`, else `endpoint`.
    pub fn inference_endpoint(&self) -> Result<RuntimeEndpoint, SpiError> {
        match &self.data_endpoint {
            Some(data) => RuntimeEndpoint::parse(data).map_err(|reason| SpiError::InvalidConfig {
                runtime: self.name.clone(),
                field: "dataEndpoint",
                reason,
            }),
            None => self.spi_endpoint(),
        }
    }

    /// Checks what serde cannot: a name, at least one format, endpoints that parse, deadlines above zero.
    pub fn validate(&self) -> Result<(), SpiError> {
        let invalid = |field: &'static str, reason: &str| SpiError::InvalidConfig {
            runtime: self.name.clone(),
            field,
            reason: reason.to_owned(),
        };
        if self.name.trim().is_empty() {
            return Err(invalid("name", "must not be empty"));
        }
        if self.supported_model_formats.is_empty() {
            return Err(invalid("supportedModelFormats", "must list at least one format"));
        }
        if self.supported_model_formats.iter().any(|f| f.name.trim().is_empty()) {
            return Err(invalid("supportedModelFormats", "a format has an empty name"));
        }
        self.spi_endpoint()?;
        self.inference_endpoint()?;
        let t = &self.timeouts;
        for (field, value) in [
            ("timeouts.startup", Some(t.startup)),
            ("timeouts.connect", Some(t.connect)),
            ("timeouts.call", Some(t.call)),
            ("timeouts.load", t.load),
            ("timeouts.infer", Some(t.infer)),
        ] {
            if value.is_some_and(|d| d.is_zero()) {
                return Err(invalid(field, "must be above zero"));
            }
        }
        if self.max_message_bytes == 0 {
            return Err(invalid("maxMessageBytes", "must be above zero"));
        }
        Ok(())
    }
}

/// Deadlines of the calls to the runtime, written as `"30s"`, `"500ms"`, `"2m"`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Timeouts {
    /// How long the runtime may take to answer `runtimeStatus` with READY at start-up (it may be
    /// unreachable or STARTING until then).
    #[serde(with = "humantime_serde")]
    pub startup: Duration,
    /// How long opening a connection to the runtime may take.
    #[serde(with = "humantime_serde")]
    pub connect: Duration,
    /// Deadline of the short calls: `runtimeStatus`, `modelSize`, `predictModelSize`, `unloadModel`,
    /// V2 `ModelMetadata`.
    #[serde(with = "humantime_serde")]
    pub call: Duration,
    /// Deadline of one `loadModel`; unset, the runtime's own `modelLoadingTimeoutMs`, else 90 s
    /// (ModelMesh's default).
    #[serde(with = "humantime_serde_opt")]
    pub load: Option<Duration>,
    /// Deadline of one inference, waiting for a concurrency slot included.
    #[serde(with = "humantime_serde")]
    pub infer: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            startup: Duration::from_secs(60),
            connect: Duration::from_secs(5),
            call: Duration::from_secs(10),
            load: None,
            infer: Duration::from_secs(30),
        }
    }
}

fn default_max_message_bytes() -> usize {
    16 << 20
}

/// `Duration` fields as humantime strings.
mod humantime_serde {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

/// Optional `Duration` fields as humantime strings.
mod humantime_serde_opt {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        match Option::<String>::deserialize(d)? {
            Some(text) => humantime::parse_duration(&text).map(Some).map_err(serde::de::Error::custom),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_serving_runtime_entry_reads_with_its_own_field_names() {
        let config: SpiRuntimeConfig = serde_json::from_str(
            r#"{
                "name": "triton",
                "supportedModelFormats": [{"name": "onnx", "version": "1", "autoSelect": true}, "keras"],
                "grpcEndpoint": "port:8085",
                "grpcDataEndpoint": "port:8001",
                "timeouts": {"startup": "2m", "load": "30s"}
            }"#,
        )
        .expect("config");
        assert_eq!(config.endpoint, "port:8085");
        assert_eq!(config.data_endpoint.as_deref(), Some("port:8001"));
        assert_eq!(config.timeouts.startup, Duration::from_secs(120));
        assert_eq!(config.timeouts.load, Some(Duration::from_secs(30)));
        assert_eq!(config.timeouts.infer, Duration::from_secs(30), "unset deadlines keep their defaults");
        assert_eq!(
            config.supported_model_formats,
            vec![ModelFormat { name: "onnx".into(), version: Some("1".into()) }, ModelFormat::named("keras")]
        );
        assert_eq!(config.inference_endpoint().expect("endpoint").to_string(), "http://127.0.0.1:8001");
        config.validate().expect("valid");
    }

    #[test]
    fn unknown_fields_and_bad_durations_are_refused() {
        let typo = r#"{"name": "x", "supportedModelFormats": ["a"], "endpoint": "port:1", "timeout": {}}"#;
        assert!(serde_json::from_str::<SpiRuntimeConfig>(typo).is_err());
        let bad = r#"{"name": "x", "supportedModelFormats": ["a"], "endpoint": "port:1", "timeouts": {"infer": "soon"}}"#;
        assert!(serde_json::from_str::<SpiRuntimeConfig>(bad).is_err());
    }

    #[test]
    fn validation_names_the_field_at_fault() {
        let mut config = SpiRuntimeConfig::new("r", "ftp://x", &["onnx"]);
        let err = config.validate().expect_err("bad scheme").to_string();
        assert!(err.contains("endpoint"), "{err}");
        config.endpoint = "127.0.0.1:8085".into();
        config.supported_model_formats.clear();
        let err = config.validate().expect_err("no formats").to_string();
        assert!(err.contains("supportedModelFormats"), "{err}");
        config.supported_model_formats = vec![ModelFormat::named("onnx")];
        config.timeouts.infer = Duration::ZERO;
        let err = config.validate().expect_err("zero deadline").to_string();
        assert!(err.contains("timeouts.infer"), "{err}");
    }

    #[test]
    fn formats_match_by_name_case_insensitively_and_by_version_when_both_give_one() {
        let mut config = SpiRuntimeConfig::new("r", "port:1", &["sklearn"]);
        config.supported_model_formats.push(ModelFormat { name: "onnx".into(), version: Some("1".into()) });
        let table = [
            ("sklearn", true),
            ("SKLearn", true),
            ("sklearn:0.24", true),
            ("onnx", true),
            ("onnx:1", true),
            ("onnx:2", false),
            ("xgboost", false),
            ("", false),
        ];
        for (model_type, expected) in table {
            assert_eq!(config.serves(model_type), expected, "{model_type}");
        }
    }
}
