//! A local model repository: `DIR/<model-id>/model.onnx`, or Triton-style
//! `DIR/<model-id>/<version>/model.onnx` where the highest numeric version wins. Other formats are
//! found by their main file's name (see [`MODEL_FILES`]): `model.safetensors` with its `config.json`
//! and tokenizer beside it, `model.joblib`, `model.bst`, ...

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use densemesh_placement::ModelId;

use crate::{Error, Result};

/// File names that mark a model directory, in order of preference, with the model format each
/// implies (the registered model type a repository model gets). The names are those the runtimes'
/// own tools write: Triton's `model.onnx`, Hugging Face's `model.safetensors`, MLServer's defaults.
/// LightGBM also writes `model.bst` elsewhere, but here it is XGBoost's: a LightGBM model is
/// `model.txt` (LightGBM's own text format) or is registered with its type through the API.
pub const MODEL_FILES: &[(&str, &str)] = &[
    ("model.onnx", "onnx"),
    ("model.safetensors", "huggingface"),
    ("model.joblib", "sklearn"),
    ("model.pkl", "sklearn"),
    ("model.bst", "xgboost"),
    ("model.ubj", "xgboost"),
    ("model.txt", "lightgbm"),
];

/// The model format a file's name implies: a [`MODEL_FILES`] name, else by extension (`.onnx`,
/// `.safetensors`, `.joblib`, ...); empty when nothing does.
pub fn format_of(path: &Path) -> &'static str {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    if let Some((_, format)) = MODEL_FILES.iter().find(|(file, _)| *file == name) {
        return format;
    }
    let extension = path.extension().and_then(|e| e.to_str()).unwrap_or_default();
    MODEL_FILES
        .iter()
        .find(|(file, _)| Path::new(file).extension().is_some_and(|e| e == extension))
        .map_or("", |(_, format)| format)
}

/// A model found on local disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalModel {
    /// The model's main file.
    pub path: PathBuf,
    /// The version directory it came from, when the repository is versioned.
    pub version: Option<u64>,
    /// Size of the main file, the basis of the size predicted before loading.
    pub file_bytes: u64,
    /// The model format: what the main file's name implies ([`format_of`]), or the type the model
    /// was registered with, which the caller sets and which wins.
    pub format: String,
    /// The runtime the registration forces, by name; `None`: the pod's choice for the format.
    pub runtime: Option<String>,
    /// What the registration asks of GPUs, which the caller sets: the pod's GPU tier reads it.
    pub gpu: Option<densemesh_placement::gpu::Gpu>,
}

impl LocalModel {
    /// The model at `path`, of the format its name implies.
    pub fn new(path: PathBuf, version: Option<u64>, file_bytes: u64) -> Self {
        let format = format_of(&path).to_owned();
        Self { path, version, file_bytes, format, runtime: None, gpu: None }
    }
}

/// A directory of models. Ids are validated [`ModelId`]s, so a lookup never leaves the directory.
#[derive(Debug, Clone)]
pub struct LocalRepository {
    root: PathBuf,
}

impl LocalRepository {
    /// The repository at `root`; nothing is read until asked.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The directory the repository reads.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Finds a model's file; blocking (a few `stat` calls).
    pub fn resolve(&self, id: &ModelId) -> Result<LocalModel> {
        resolve_path(&self.root.join(id.as_str())).and_then(|found| {
            found.ok_or_else(|| Error::NotFound { model_id: id.to_string(), repository: self.root.clone() })
        })
    }

    /// Ids of every directory that holds a model, sorted; names that are not valid ids are skipped.
    pub fn list(&self) -> Result<Vec<ModelId>> {
        let ids = valid_ids(read_dir_names(&self.root)?);
        Ok(ids.into_iter().filter(|id| self.resolve(id).is_ok()).collect())
    }

    /// Ids of every entry whose name is a valid id, sorted, whether or not it holds a model; blocking.
    ///
    /// Unlike [`LocalRepository::list`], an entry that cannot be read stays in, so a caller that
    /// mirrors the repository can tell "gone" ([`Error::NotFound`] from [`LocalRepository::resolve`])
    /// from "unreadable for now" and leave the latter alone. A missing or unreadable root is an error.
    pub fn candidates(&self) -> Result<Vec<ModelId>> {
        let entries =
            std::fs::read_dir(&self.root).map_err(|source| Error::Io { path: self.root.clone(), source })?;
        Ok(valid_ids(entries.flatten().filter_map(|e| e.file_name().into_string().ok()).collect()))
    }
}

/// A model at a local path: the file itself, or a directory holding a [`MODEL_FILES`] file directly or
/// in its highest numeric version directory. `None` when nothing is there; blocking.
pub fn resolve_path(path: &Path) -> Result<Option<LocalModel>> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => {
            return Ok(Some(LocalModel::new(path.to_owned(), None, meta.len())));
        }
        Ok(_) => {}
        Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory) => return Ok(None),
        Err(source) => return Err(Error::Io { path: path.to_owned(), source }),
    }
    if let Some(found) = model_file_in(path, None)? {
        return Ok(Some(found));
    }
    let mut versions: Vec<u64> =
        read_dir_names(path)?.into_iter().filter_map(|name| name.parse::<u64>().ok()).collect();
    versions.sort_unstable_by(|a, b| b.cmp(a));
    for version in versions {
        if let Some(found) = model_file_in(&path.join(version.to_string()), Some(version))? {
            return Ok(Some(found));
        }
    }
    Ok(None)
}

fn model_file_in(dir: &Path, version: Option<u64>) -> Result<Option<LocalModel>> {
    for (name, _) in MODEL_FILES {
        let path = dir.join(name);
        match std::fs::metadata(&path) {
            Ok(meta) if meta.is_file() => {
                return Ok(Some(LocalModel::new(path, version, meta.len())));
            }
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory) => {}
            Err(source) => return Err(Error::Io { path, source }),
        }
    }
    Ok(None)
}

/// The names that are valid model ids, sorted.
fn valid_ids(names: Vec<String>) -> Vec<ModelId> {
    let mut ids: Vec<ModelId> = names.iter().filter_map(|name| ModelId::new(name).ok()).collect();
    ids.sort();
    ids
}

/// Entry names of a directory; empty when it does not exist.
fn read_dir_names(dir: &Path) -> Result<Vec<String>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory) => return Ok(Vec::new()),
        Err(source) => {
            return Err(Error::Io { path: dir.to_owned(), source });
        }
    };
    Ok(entries.flatten().filter_map(|e| e.file_name().into_string().ok()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(path: &Path, bytes: usize) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, vec![0u8; bytes]).unwrap();
    }

    #[test]
    fn resolves_flat_and_versioned_layouts() {
        let dir = tempfile::tempdir().unwrap();
        let repo = LocalRepository::new(dir.path());
        touch(&dir.path().join("flat/model.onnx"), 3);
        touch(&dir.path().join("versioned/1/model.onnx"), 1);
        touch(&dir.path().join("versioned/10/model.onnx"), 10);
        touch(&dir.path().join("versioned/9/model.onnx"), 9);
        touch(&dir.path().join("versioned/11/other.bin"), 1);
        std::fs::create_dir_all(dir.path().join("empty")).unwrap();

        let flat = repo.resolve(&ModelId::new("flat").unwrap()).unwrap();
        assert_eq!((flat.version, flat.file_bytes), (None, 3));
        let versioned = repo.resolve(&ModelId::new("versioned").unwrap()).unwrap();
        assert_eq!((versioned.version, versioned.file_bytes), (Some(10), 10));
        for missing in ["empty", "absent"] {
            let err = repo.resolve(&ModelId::new(missing).unwrap()).unwrap_err();
            assert!(matches!(err, Error::NotFound { .. }), "{err}");
        }
        let ids: Vec<String> = repo.list().unwrap().iter().map(|m| m.to_string()).collect();
        assert_eq!(ids, ["flat", "versioned"]);
        let candidates: Vec<String> = repo.candidates().unwrap().iter().map(|m| m.to_string()).collect();
        assert_eq!(candidates, ["empty", "flat", "versioned"]);
    }

    #[test]
    fn a_missing_root_is_an_error_for_candidates_but_empty_for_list() {
        let dir = tempfile::tempdir().unwrap();
        let repo = LocalRepository::new(dir.path().join("absent"));
        assert!(repo.list().unwrap().is_empty());
        assert!(matches!(repo.candidates(), Err(Error::Io { .. })));
    }

    #[test]
    fn other_formats_are_found_by_their_main_file_and_carry_its_format() {
        let dir = tempfile::tempdir().unwrap();
        let repo = LocalRepository::new(dir.path());
        touch(&dir.path().join("bert/model.safetensors"), 5);
        touch(&dir.path().join("bert/config.json"), 2);
        touch(&dir.path().join("bert/tokenizer.json"), 2);
        touch(&dir.path().join("iris/model.joblib"), 4);
        touch(&dir.path().join("boost/3/model.bst"), 6);
        touch(&dir.path().join("both/model.onnx"), 1);
        touch(&dir.path().join("both/model.joblib"), 1);
        let found = |id: &str| repo.resolve(&ModelId::new(id).unwrap()).unwrap();
        let bert = found("bert");
        assert_eq!(
            (bert.path.file_name().unwrap().to_str(), bert.format.as_str()),
            (Some("model.safetensors"), "huggingface")
        );
        assert_eq!((found("iris").format.as_str(), found("iris").file_bytes), ("sklearn", 4));
        assert_eq!((found("boost").format.as_str(), found("boost").version), ("xgboost", Some(3)));
        // The first of MODEL_FILES wins where a directory holds several.
        assert_eq!(found("both").format, "onnx");
    }

    #[test]
    fn a_file_named_directly_has_the_format_of_its_extension() {
        assert_eq!(format_of(Path::new("/m/model.onnx")), "onnx");
        assert_eq!(format_of(Path::new("/m/classifier.onnx")), "onnx");
        assert_eq!(format_of(Path::new("/m/iris.joblib")), "sklearn");
        assert_eq!(format_of(Path::new("/m/weights.safetensors")), "huggingface");
        assert_eq!(format_of(Path::new("/m/booster.ubj")), "xgboost");
        assert_eq!(format_of(Path::new("/m/notes.md")), "");
        assert_eq!(format_of(Path::new("/m/noextension")), "");
    }
}
