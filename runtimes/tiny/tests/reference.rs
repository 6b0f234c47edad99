//! Every output of the tiny evaluator equals ONNX Runtime's within 1e-5 (relative above 1), on 1,000
//! generated models (tiny MLPs of random shapes and layer forms, scikit-learn models through
//! skl2onnx) and on the project's examples/models. `make_models.py` writes the models and
//! onnxruntime-python's outputs; it needs the project's .venv (`source scripts/env.sh`) with
//! tests/requirements.txt installed, and this test fails, not skips, without it.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use densemesh_runtime_core::{DataType, InferRequest, LoadedModel, Tensor, TensorData};
use densemesh_runtime_tiny::{TinyError, TinyRuntime};
use serde_json::Value as Json;

/// Generated models, besides the examples.
const GENERATED: usize = 1_000;
/// Absolute tolerance, relative for magnitudes above 1.
const TOLERANCE: f64 = 1e-5;
/// Example models the evaluator is expected to refuse (they use operators it does not implement),
/// and so leave to ONNX Runtime.
const REFUSED_EXAMPLES: &[&str] = &["example/multi-input"];

fn generate(dir: &Path) -> Result<()> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/make_models.py");
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python".to_owned());
    let status = Command::new(&python)
        .arg(&script)
        .arg(dir)
        .arg(GENERATED.to_string())
        .arg("20261201")
        .status()
        .with_context(|| {
            format!("running {python}; `source scripts/env.sh` puts the project's .venv first")
        })?;
    ensure!(
        status.success(),
        "{} failed: install tests/requirements.txt into .venv (it needs onnxruntime, onnx, scikit-learn, skl2onnx)",
        script.display()
    );
    Ok(())
}

fn tensor(json: &Json) -> Result<Tensor> {
    let name = json["name"].as_str().context("name")?.to_owned();
    let datatype: DataType = json["dtype"].as_str().context("dtype")?.parse()?;
    let shape: Vec<i64> =
        json["shape"].as_array().context("shape")?.iter().filter_map(Json::as_i64).collect();
    let items = json["data"].as_array().context("data")?;
    let data = if datatype == DataType::Bytes {
        TensorData::Strings(
            items.iter().map(|s| Bytes::from(s.as_str().unwrap_or_default().to_owned())).collect(),
        )
    } else {
        let mut raw = Vec::new();
        for item in items {
            let f = item.as_f64().context("a number")?;
            let i = item.as_i64().unwrap_or(f as i64);
            match datatype {
                DataType::Fp32 => raw.extend_from_slice(&(f as f32).to_le_bytes()),
                DataType::Fp64 => raw.extend_from_slice(&f.to_le_bytes()),
                DataType::Int64 => raw.extend_from_slice(&i.to_le_bytes()),
                DataType::Uint64 => raw.extend_from_slice(&item.as_u64().unwrap_or(0).to_le_bytes()),
                DataType::Int32 | DataType::Uint32 => raw.extend_from_slice(&(i as u32).to_le_bytes()),
                DataType::Int16 | DataType::Uint16 | DataType::Fp16 => {
                    raw.extend_from_slice(&(i as u16).to_le_bytes())
                }
                DataType::Int8 | DataType::Uint8 | DataType::Bool => raw.push(i as u8),
                other => bail!("datatype {other}"),
            }
        }
        TensorData::Raw(Bytes::from(raw))
    };
    Ok(Tensor { name, datatype, shape, data })
}

/// Elements as f64 (numbers) for comparison; strings compared as bytes.
fn numbers(t: &Tensor) -> Option<Vec<f64>> {
    let TensorData::Raw(raw) = &t.data else { return None };
    let read = |n: usize| raw.chunks_exact(n);
    Some(match t.datatype {
        DataType::Fp32 => read(4).map(|c| f64::from(f32::from_le_bytes(c.try_into().unwrap()))).collect(),
        DataType::Fp64 => read(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect(),
        DataType::Int64 => read(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
        _ => raw.iter().map(|b| f64::from(*b)).collect(),
    })
}

fn compare(case: &str, got: &Tensor, want: &Tensor) -> Result<()> {
    ensure!(
        got.datatype == want.datatype,
        "{case} {}: {} instead of {}",
        want.name,
        got.datatype,
        want.datatype
    );
    ensure!(
        got.shape == want.shape,
        "{case} {}: shape {:?} instead of {:?}",
        want.name,
        got.shape,
        want.shape
    );
    match (numbers(got), numbers(want)) {
        (Some(g), Some(w)) if matches!(want.datatype, DataType::Fp32 | DataType::Fp64) => {
            for (i, (g, w)) in g.iter().zip(&w).enumerate() {
                let off = (g - w).abs() / w.abs().max(1.0);
                ensure!(off <= TOLERANCE, "{case} {}[{i}]: {g} instead of {w} (off by {off:e})", want.name);
            }
        }
        _ => {
            ensure!(got.data == want.data, "{case} {}: {:?} instead of {:?}", want.name, got.data, want.data)
        }
    }
    Ok(())
}

#[test]
fn outputs_equal_onnx_runtime_on_generated_and_example_models() -> Result<()> {
    let dir = tempfile::tempdir()?;
    generate(dir.path())?;
    let runtime = TinyRuntime::default();
    let mut files: Vec<_> = std::fs::read_dir(dir.path())?.flatten().map(|e| e.path()).collect();
    files.retain(|p| p.extension().is_some_and(|e| e == "json"));
    files.sort();
    ensure!(files.len() >= GENERATED + 4, "only {} cases were generated", files.len());
    let (mut compared, mut refused) = (0, Vec::new());
    for case_path in &files {
        let case: Json = serde_json::from_slice(&std::fs::read(case_path)?)?;
        let kind = case["kind"].as_str().unwrap_or_default();
        let label = format!("{} ({kind})", case_path.file_name().unwrap_or_default().to_string_lossy());
        let model_bytes = std::fs::read(case_path.with_extension("onnx"))?;
        let model = match runtime.load_bytes(&model_bytes) {
            Ok(model) => model,
            Err(e @ TinyError::Unsupported(_)) if REFUSED_EXAMPLES.contains(&kind) => {
                assert!(e.wants_fallback());
                refused.push(kind.to_owned());
                continue;
            }
            Err(e) => bail!("{label} did not load: {e}"),
        };
        let inputs =
            case["inputs"].as_array().context("inputs")?.iter().map(tensor).collect::<Result<Vec<_>>>()?;
        let want =
            case["outputs"].as_array().context("outputs")?.iter().map(tensor).collect::<Result<Vec<_>>>()?;
        let got = model.infer(InferRequest { inputs, outputs: vec![] }).with_context(|| label.clone())?;
        ensure!(got.len() == want.len(), "{label}: {} outputs instead of {}", got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            compare(&label, g, w)?;
        }
        compared += 1;
    }
    assert_eq!(refused, REFUSED_EXAMPLES, "the examples refused");
    assert_eq!(compared, files.len() - REFUSED_EXAMPLES.len());
    eprintln!("{compared} models equal onnxruntime's outputs within {TOLERANCE:e}");
    Ok(())
}
