//! Shared by the integration tests: the real all-MiniLM-L6-v2 (extracted by `scripts/setup.sh`), the
//! runtime, and helpers to build requests and read embeddings back.
#![allow(dead_code)] // each test binary uses its own subset

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use bytes::Bytes;
use densemesh_runtime_candle::{CandleConfig, CandleRuntime, INPUT_NAME};
use densemesh_runtime_core::{DataType, InferRequest, LoadRequest, LoadedModel, Runtime, Tensor, TensorData};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The model's directory; fails (never skips) when the set-up has not extracted it.
pub fn model_dir() -> PathBuf {
    let dir = root().join(".models/all-minilm-l6-v2");
    assert!(
        dir.join("model.safetensors").is_file(),
        "{} has no model.safetensors: run scripts/setup.sh to extract all-MiniLM-L6-v2",
        dir.display()
    );
    dir
}

/// The project's Python, which has numpy and tokenizers; fails when the set-up has not made it.
pub fn python() -> PathBuf {
    let python = root().join(".venv/bin/python");
    assert!(python.exists(), "{} is missing: run scripts/setup.sh", python.display());
    python
}

/// One runtime per test binary, as in meshd.
pub fn runtime() -> &'static CandleRuntime {
    static RUNTIME: OnceLock<CandleRuntime> = OnceLock::new();
    RUNTIME.get_or_init(|| CandleRuntime::new(&CandleConfig::default()).expect("the candle runtime starts"))
}

/// MiniLM loaded once per test binary from its `model.safetensors`.
pub fn minilm() -> &'static dyn LoadedModel {
    static MODEL: OnceLock<Box<dyn LoadedModel>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let request = LoadRequest::from_path("all-minilm-l6-v2", model_dir().join("model.safetensors"));
            runtime().load(&request).expect("all-MiniLM-L6-v2 loads")
        })
        .as_ref()
}

/// A `text` input of shape `[n]`.
pub fn text_input(texts: &[&str]) -> Tensor {
    Tensor {
        name: INPUT_NAME.to_owned(),
        datatype: DataType::Bytes,
        shape: vec![texts.len() as i64],
        data: TensorData::Strings(texts.iter().map(|t| Bytes::copy_from_slice(t.as_bytes())).collect()),
    }
}

/// The embeddings of `texts`, one row each.
pub fn embed(model: &dyn LoadedModel, texts: &[&str]) -> Vec<Vec<f32>> {
    let outputs =
        model.infer(InferRequest { inputs: vec![text_input(texts)], outputs: vec![] }).expect("inference");
    rows(&outputs[0])
}

/// An FP32 `[n, dim]` tensor's rows.
pub fn rows(tensor: &Tensor) -> Vec<Vec<f32>> {
    assert_eq!(tensor.datatype, DataType::Fp32);
    let [n, dim] = tensor.shape[..] else { panic!("shape {:?} is not [n, dim]", tensor.shape) };
    let TensorData::Raw(raw) = &tensor.data else { panic!("an FP32 tensor holds raw bytes") };
    let floats: Vec<f32> =
        raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    assert_eq!(floats.len() as i64, n * dim);
    floats.chunks(dim as usize).map(<[f32]>::to_vec).collect()
}

/// Cosine similarity, in f64.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}
