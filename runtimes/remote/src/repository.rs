//! A process's model repository: the `model-settings.json` MLServer reads for each model, and the
//! repository extension's load and unload calls.
//!
//! The settings are what ModelMesh's MLServer adapter writes: the model's name, the `implementation` its
//! format maps to, and `parameters.uri`, the model's file on local disk (absolute, so the server's
//! working directory does not matter). A model directory that brings its own `model-settings.json`
//! (MLServer's native layout) keeps it, renamed to the model id.

use std::path::{Path, PathBuf};

use tokio::time::Instant;
use tonic::Code;
use tonic::transport::Channel;

use crate::RemoteError;
use crate::model::{deadline_error, server_error};
use crate::pool::{Pool, Process};
use crate::proto::RepositoryModelLoadRequest;
use crate::proto::RepositoryModelUnloadRequest;
use crate::proto::grpc_inference_service_client::GrpcInferenceServiceClient as RepositoryServiceClient;

/// The file MLServer looks for in each model directory of its repository.
pub const SETTINGS_FILE: &str = "model-settings.json";

/// Refuses a model id that cannot be a directory name. The mesh validates ids before they get here;
/// this is the repository's own guard, since the id becomes a path.
pub(crate) fn check_model_id(model_id: &str) -> Result<(), String> {
    let bad =
        model_id.is_empty() || model_id == "." || model_id == ".." || model_id.contains(['/', '\\', '\0']);
    if bad {
        Err(format!("model id {model_id:?} cannot name a directory in the model repository"))
    } else {
        Ok(())
    }
}

/// Writes `<repository>/<model-id>/model-settings.json` (under a temporary name, then renamed, so the
/// server never reads half a file) and returns the model's directory.
pub(crate) fn write_settings(
    repository: &Path,
    model_id: &str,
    implementation: Option<&str>,
    model_path: &Path,
) -> Result<PathBuf, RemoteError> {
    let dir = repository.join(model_id);
    let io = |what: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| RemoteError::Repository { what, path, source }
    };
    std::fs::create_dir_all(&dir).map_err(io("cannot create the model directory", &dir))?;
    let own = model_path.join(SETTINGS_FILE);
    let settings = if model_path.is_dir() && own.is_file() {
        let text = std::fs::read(&own).map_err(io("cannot read", &own))?;
        let settings =
            serde_json::from_slice(&text).map_err(std::io::Error::from).map_err(io("cannot parse", &own))?;
        native_settings(settings, model_id, model_path)
    } else {
        let mut settings = serde_json::json!({
            "name": model_id,
            "parameters": { "uri": model_path.to_string_lossy() },
        });
        if let Some(implementation) = implementation {
            settings["implementation"] = implementation.into();
        }
        settings
    };
    let text = serde_json::to_vec_pretty(&settings)
        .map_err(std::io::Error::from)
        .map_err(io("cannot encode", &dir))?;
    let temp = dir.join(format!("{SETTINGS_FILE}.temp"));
    std::fs::write(&temp, text).map_err(io("cannot write", &temp))?;
    let target = dir.join(SETTINGS_FILE);
    std::fs::rename(&temp, &target).map_err(io("cannot publish", &target))?;
    Ok(dir)
}

/// A model directory's own settings (MLServer's native layout), as ModelMesh's adapter passes them on:
/// named by the model id (MLServer requires the name to be the id it is loaded by), with a relative
/// `parameters.uri` made absolute against the model's directory, since the settings now live elsewhere.
/// A directory without a uri is the model itself, as MLServer reads a missing uri.
fn native_settings(mut settings: serde_json::Value, model_id: &str, model_dir: &Path) -> serde_json::Value {
    let Some(object) = settings.as_object_mut() else { return settings };
    object.insert("name".into(), model_id.into());
    let parameters = object.entry("parameters").or_insert_with(|| serde_json::json!({}));
    if let Some(parameters) = parameters.as_object_mut() {
        let uri = match parameters.get("uri").and_then(|u| u.as_str()) {
            Some(uri) if Path::new(uri).is_absolute() || uri.contains("://") => uri.to_owned(),
            Some(uri) => model_dir.join(uri).to_string_lossy().into_owned(),
            None => model_dir.to_string_lossy().into_owned(),
        };
        parameters.insert("uri".into(), uri.into());
    }
    settings
}

/// Removes a model's directory; a failure only leaves a stale directory the next restart clears.
pub(crate) fn remove_model_dir(repository: &Path, model_id: &str) {
    if check_model_id(model_id).is_ok()
        && let Err(error) = std::fs::remove_dir_all(repository.join(model_id))
        && error.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(%error, "cannot remove the model's directory from the repository");
    }
}

/// The repository extension of one process.
pub(crate) struct RepositoryClient<'a> {
    pub(crate) pool: &'a Pool,
    pub(crate) process: &'a Process,
    pub(crate) channel: Channel,
}

impl RepositoryClient<'_> {
    /// RepositoryModelLoad: the server reads the model's settings and loads it, or says why not.
    pub(crate) async fn load(&self, model_id: &str, deadline: Instant) -> Result<(), RemoteError> {
        let mut client = RepositoryServiceClient::new(self.channel.clone())
            .max_decoding_message_size(self.pool.config.max_message_bytes)
            .max_encoding_message_size(self.pool.config.max_message_bytes);
        let mut request = tonic::Request::new(RepositoryModelLoadRequest {
            model_name: model_id.to_owned(),
            ..Default::default()
        });
        request.set_timeout(deadline.saturating_duration_since(Instant::now()));
        tokio::time::timeout_at(deadline, client.repository_model_load(request))
            .await
            .map_err(|_| {
                deadline_error(self.pool, self.process, "RepositoryModelLoad", self.pool.config.timeouts.load)
            })?
            .map_err(|status| server_error(self.pool, self.process, "RepositoryModelLoad", status))?;
        Ok(())
    }

    /// RepositoryModelUnload; a model the server does not have counts as unloaded (MLServer answers
    /// INVALID_ARGUMENT for it, others NOT_FOUND).
    pub(crate) async fn unload(&self, model_id: &str) -> Result<(), RemoteError> {
        let mut client = RepositoryServiceClient::new(self.channel.clone())
            .max_decoding_message_size(self.pool.config.max_message_bytes)
            .max_encoding_message_size(self.pool.config.max_message_bytes);
        let timeout = self.pool.config.timeouts.unload;
        let mut request = tonic::Request::new(RepositoryModelUnloadRequest {
            model_name: model_id.to_owned(),
            ..Default::default()
        });
        request.set_timeout(timeout);
        match tokio::time::timeout(timeout, client.repository_model_unload(request)).await {
            Err(_) => Err(deadline_error(self.pool, self.process, "RepositoryModelUnload", timeout)),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(status)) if matches!(status.code(), Code::NotFound | Code::InvalidArgument) => Ok(()),
            Ok(Err(status)) => Err(server_error(self.pool, self.process, "RepositoryModelUnload", status)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_that_are_not_one_directory_name_are_refused() {
        for bad in ["", ".", "..", "a/b", "../x", "a\\b", "a\0b"] {
            assert!(check_model_id(bad).is_err(), "{bad:?}");
        }
        for good in ["m", "m.v1", "a:b-c_d", "..."] {
            assert!(check_model_id(good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn settings_name_the_model_its_implementation_and_its_absolute_file() {
        let repo = tempfile::tempdir().expect("tempdir");
        let dir = write_settings(
            repo.path(),
            "m1",
            Some("mlserver_sklearn.SKLearnModel"),
            Path::new("/models/m1.joblib"),
        )
        .expect("written");
        let text = std::fs::read_to_string(dir.join(SETTINGS_FILE)).expect("read");
        let json: serde_json::Value = serde_json::from_str(&text).expect("json");
        assert_eq!(json["name"], "m1");
        assert_eq!(json["implementation"], "mlserver_sklearn.SKLearnModel");
        assert_eq!(json["parameters"]["uri"], "/models/m1.joblib");
        assert!(!dir.join(format!("{SETTINGS_FILE}.temp")).exists());

        let dir = write_settings(repo.path(), "m2", None, Path::new("/models/m2")).expect("written");
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join(SETTINGS_FILE)).expect("read"))
                .expect("json");
        assert!(
            json.get("implementation").is_none(),
            "no implementation when the format has none configured"
        );
        remove_model_dir(repo.path(), "m2");
        assert!(!dir.exists());
    }

    #[test]
    fn a_model_directory_with_its_own_settings_keeps_them_renamed_with_an_absolute_uri() {
        let repo = tempfile::tempdir().expect("tempdir");
        let model = tempfile::tempdir().expect("tempdir");
        let own = r#"{"name": "whatever", "implementation": "my.Model", "parameters": {"uri": "./weights.bin", "extra": 1}}"#;
        std::fs::write(model.path().join(SETTINGS_FILE), own).expect("write");
        let dir = write_settings(repo.path(), "m3", Some("mlserver_sklearn.SKLearnModel"), model.path())
            .expect("written");
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join(SETTINGS_FILE)).expect("read"))
                .expect("json");
        assert_eq!(json["name"], "m3");
        assert_eq!(json["implementation"], "my.Model", "the model's own implementation wins");
        assert_eq!(json["parameters"]["uri"], model.path().join("./weights.bin").to_string_lossy().as_ref());
        assert_eq!(json["parameters"]["extra"], 1);

        let without_uri =
            native_settings(serde_json::json!({"implementation": "my.Model"}), "m4", Path::new("/m"));
        assert_eq!(without_uri["parameters"]["uri"], "/m");
        let absolute =
            native_settings(serde_json::json!({"parameters": {"uri": "/abs/x"}}), "m5", Path::new("/m"));
        assert_eq!(absolute["parameters"]["uri"], "/abs/x");
    }
}
