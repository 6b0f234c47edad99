//! Finding `libonnxruntime.so`: the pip `onnxruntime` wheel ships it, so most machines already have one.

use std::path::{Path, PathBuf};
use std::process::Command;

use densemesh_runtime_core::{Error, Result};

pub(crate) const HOW_TO_FIX: &str = "install it with `pip install onnxruntime` (or `make setup`), \
     or point ORT_DYLIB_PATH at libonnxruntime.so";

/// Finds the ONNX Runtime shared library: `ORT_DYLIB_PATH` if set, else the `onnxruntime` Python
/// package in the project's `.venv`, the active virtualenv, or whatever `python3` imports.
pub fn find_library() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH") {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(Error::RuntimeUnavailable(
                format!("ORT_DYLIB_PATH is {} but no file is there; {HOW_TO_FIX}", path.display()).into(),
            ))
        };
    }
    let mut package_dirs: Vec<PathBuf> = Vec::new();
    for venv in [std::env::var_os("VIRTUAL_ENV").map(PathBuf::from), Some(PathBuf::from(".venv"))]
        .into_iter()
        .flatten()
    {
        package_dirs.extend(site_packages(&venv.join("lib")).map(|p| p.join("onnxruntime")));
    }
    if let Some(dir) = python_package_dir() {
        package_dirs.push(dir);
    }
    package_dirs.iter().find_map(|dir| library_in(&dir.join("capi"))).ok_or_else(|| {
        Error::RuntimeUnavailable(format!("onnxruntime shared library not found; {HOW_TO_FIX}").into())
    })
}

/// `lib/python3.*/site-packages` under a virtualenv's `lib`.
fn site_packages(lib: &Path) -> impl Iterator<Item = PathBuf> {
    std::fs::read_dir(lib)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
        .map(|e| e.path().join("site-packages"))
}

/// Asks `python3` where it imports `onnxruntime` from; `None` if python or the package is missing.
fn python_package_dir() -> Option<PathBuf> {
    let output = Command::new("python3")
        .args(["-c", "import os, onnxruntime; print(os.path.dirname(onnxruntime.__file__))"])
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    let dir = String::from_utf8(output.stdout).ok()?;
    Some(PathBuf::from(dir.trim()))
}

/// The newest `libonnxruntime.so*` in a directory (the wheel names it `libonnxruntime.so.1.32.0`).
fn library_in(dir: &Path) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libonnxruntime.so"))
        })
        .collect();
    found.sort();
    found.pop()
}
