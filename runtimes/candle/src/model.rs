//! One loaded sentence-embedding model: tokenizer, BERT encoder, pooling, and the V2 tensors in and
//! out.
//!
//! A request's sentences are tokenized without padding, sorted by length and run in chunks of at most
//! [`CHUNK_SENTENCES`], each chunk padded only to its own longest sentence: padding to the tokenizer
//! file's fixed 128 would multiply the work for short sentences, and one chunk of a thousand long
//! sentences would need gigabytes of attention scores. Pooling honours the attention mask, so where a
//! sentence lands does not change its vector.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use candle_core::{DType, Device, Tensor as CandleTensor};
use candle_nn::VarBuilder;
use densemesh_runtime_core::{
    Context, DataType, DeviceCopy, Error, InferRequest, LoadRequest, LoadedModel, ModelMetadata, Result,
    Tensor, TensorData, TensorSpec,
};
use tokenizers::{Encoding, PaddingParams, PostProcessor, Tokenizer, TruncationParams};

use crate::bert::Bert;
use crate::device::{CudaDevices, DeviceSlot};
use crate::error::{InputError, LoadError};
use crate::files::{EmbedderConfig, ModelFiles, WEIGHTS_FILE, read_file};
use crate::memory::{CountingBackend, tokenizer_bytes};
use crate::pooling::normalize;
use crate::{INPUT_NAME, OUTPUT_NAME, PLATFORM};

/// Most sentences run through the encoder at once; bounds a chunk's attention scores to
/// `32 × heads × max_tokens²` floats (100 MB for MiniLM at 256 tokens).
pub const CHUNK_SENTENCES: usize = 32;

/// A BERT sentence-embedding model held in memory.
pub struct CandleModel {
    model_id: String,
    config: EmbedderConfig,
    tokenizer: Tokenizer,
    bert: Bert,
    metadata: ModelMetadata,
    size_bytes: u64,
    /// The runtime's thread pool, which every inference runs in.
    pool: Arc<rayon::ThreadPool>,
    /// The encoder's weights alone: what a copy on a GPU takes.
    weight_bytes: u64,
    /// The CUDA devices it may be promoted to; `None` when it is not offered to the GPU tier.
    devices: Option<Arc<CudaDevices>>,
    on_device: DeviceSlot,
}

impl CandleModel {
    /// Loads the model `request` points at (its `model.safetensors` or its directory).
    pub fn load(request: &LoadRequest, pool: Arc<rayon::ThreadPool>) -> Result<Self, LoadError> {
        let files = ModelFiles::locate(&request.path);
        let weights_path =
            if request.path.is_dir() { files.file(WEIGHTS_FILE) } else { request.path.clone() };
        // Checked first, so a model that is not there at all is reported by its main file rather
        // than by whichever sibling happens to be read first.
        if request.contents.is_none() && !weights_path.is_file() {
            return Err(LoadError::Missing { path: weights_path });
        }
        let config = EmbedderConfig::read(&files)?;

        let tokenizer_path = files.file("tokenizer.json");
        let (tokenizer, tokenizer_bytes) = load_tokenizer(&tokenizer_path, &config)?;
        if tokenizer.get_vocab_size(true) > config.bert.vocab_size {
            return Err(LoadError::Unsupported {
                path: tokenizer_path,
                what: format!(
                    "{} tokens, more than config.json's vocab_size {}",
                    tokenizer.get_vocab_size(true),
                    config.bert.vocab_size
                ),
            });
        }

        let (bert, weight_bytes) = match &request.contents {
            Some(contents) => load_weights(contents.as_slice(), &weights_path, &config)?,
            None => load_weights(&read_file(&weights_path)?, &weights_path, &config)?,
        };

        let dim = config.dim() as i64;
        let metadata = ModelMetadata {
            platform: PLATFORM.to_owned(),
            inputs: vec![TensorSpec {
                name: INPUT_NAME.to_owned(),
                datatype: DataType::Bytes,
                shape: vec![-1],
            }],
            outputs: vec![TensorSpec {
                name: OUTPUT_NAME.to_owned(),
                datatype: DataType::Fp32,
                shape: vec![-1, dim],
            }],
        };
        tracing::debug!(model_id = %request.model_id, weight_bytes, tokenizer_bytes, dim, "candle model loaded");
        Ok(Self {
            model_id: request.model_id.clone(),
            config,
            tokenizer,
            bert,
            metadata,
            size_bytes: weight_bytes + tokenizer_bytes,
            pool,
            weight_bytes,
            devices: None,
            on_device: DeviceSlot::default(),
        })
    }

    /// The same model, offered to the GPU tier on `devices`.
    pub fn with_devices(mut self, devices: Arc<CudaDevices>) -> Self {
        self.devices = Some(devices);
        self
    }

    /// Copies the weights to `device` (numbered `ordinal`); calls run there from then on.
    fn promote_to(&self, ordinal: usize, device: &Device) -> Result<()> {
        self.on_device.promote(&self.bert, ordinal, device).map_err(|e| {
            Error::RuntimeUnavailable(
                Context::new(format!("model {}: copying its weights to gpu{ordinal}", self.model_id), e)
                    .into(),
            )
        })
    }

    /// Embeds `texts` into one row of `dim` floats each, in order.
    fn embed(&self, texts: &[&str]) -> candle_core::Result<Vec<f32>> {
        let dim = self.config.dim();
        let mut out = vec![0f32; texts.len() * dim];
        if texts.is_empty() {
            return Ok(out);
        }
        let lowered: Vec<String>;
        let inputs: Vec<&str> = if self.config.lower_case {
            lowered = texts.iter().map(|t| t.to_lowercase()).collect();
            lowered.iter().map(String::as_str).collect()
        } else {
            texts.to_vec()
        };
        let encodings = self.tokenizer.encode_batch_fast(inputs, true).map_err(candle_core::Error::wrap)?;
        let mut order: Vec<usize> = (0..encodings.len()).collect();
        order.sort_by_key(|&i| encodings[i].get_ids().len());
        for chunk in order.chunks(CHUNK_SENTENCES) {
            let batch: Vec<&Encoding> = chunk.iter().map(|&i| &encodings[i]).collect();
            let rows = self.embed_chunk(&batch)?;
            for (row, &i) in rows.iter().zip(chunk) {
                out[i * dim..(i + 1) * dim].copy_from_slice(row);
            }
        }
        Ok(out)
    }

    /// Runs one chunk, padded to its longest sentence.
    fn embed_chunk(&self, batch: &[&Encoding]) -> candle_core::Result<Vec<Vec<f32>>> {
        let width = batch.iter().map(|e| e.get_ids().len()).max().unwrap_or(0);
        let mut ids = vec![0u32; batch.len() * width];
        let mut type_ids = vec![0u32; batch.len() * width];
        let mut mask = vec![0u32; batch.len() * width];
        for (row, encoding) in batch.iter().enumerate() {
            let len = encoding.get_ids().len();
            let at = row * width;
            ids[at..at + len].copy_from_slice(encoding.get_ids());
            type_ids[at..at + len].copy_from_slice(encoding.get_type_ids());
            mask[at..at + len].fill(1);
        }
        let shape = (batch.len(), width);
        // The device copy when there is one (kept for this whole chunk even if demoted meanwhile).
        let on_device = self.on_device.current();
        let bert = on_device.as_deref().unwrap_or(&self.bert);
        let device = bert.device();
        let ids = CandleTensor::from_vec(ids, shape, device)?;
        let type_ids = CandleTensor::from_vec(type_ids, shape, device)?;
        let mask = CandleTensor::from_vec(mask, shape, device)?;
        let hidden = bert.forward(&ids, &type_ids, &mask)?;
        let mut pooled = self.config.pooling.apply(&hidden, &mask)?;
        if self.config.normalize {
            pooled = normalize(&pooled)?;
        }
        pooled.to_vec2()
    }
}

impl DeviceCopy for CandleModel {
    fn device_bytes(&self) -> u64 {
        self.weight_bytes
    }

    fn device(&self) -> Option<usize> {
        self.on_device.ordinal()
    }

    fn promote(&self, ordinal: usize) -> Result<()> {
        let devices = self.devices.as_ref().ok_or_else(|| {
            Error::RuntimeUnavailable(
                format!("model {} is not offered to the GPU tier", self.model_id).into(),
            )
        })?;
        let device = devices.get(ordinal).map_err(|e| {
            Error::RuntimeUnavailable(Context::new(format!("cannot open CUDA device {ordinal}"), e).into())
        })?;
        self.promote_to(ordinal, &device)
    }

    fn demote(&self) {
        self.on_device.demote();
    }
}

impl LoadedModel for CandleModel {
    /// Offered to the GPU tier only in a build with candle's CUDA backend: elsewhere every promotion
    /// would fail.
    fn device_copy(&self) -> Option<&dyn DeviceCopy> {
        (cfg!(feature = "cuda") && self.devices.is_some()).then_some(self as &dyn DeviceCopy)
    }

    fn metadata(&self) -> &ModelMetadata {
        &self.metadata
    }

    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn runtime(&self) -> &str {
        "candle"
    }

    fn infer(&self, request: InferRequest) -> Result<Vec<Tensor>> {
        if let Some(name) = request.outputs.iter().find(|n| *n != OUTPUT_NAME) {
            return Err(invalid(InputError::UnknownOutput { name: name.clone(), expected: OUTPUT_NAME }));
        }
        let input = request.inputs.iter().find(|t| t.name == INPUT_NAME).ok_or_else(|| {
            invalid(InputError::Missing {
                expected: INPUT_NAME,
                got: request.inputs.iter().map(|t| t.name.clone()).collect(),
            })
        })?;
        let texts = texts(input).map_err(invalid)?;
        let n = texts.len();
        let embeddings = self.pool.install(|| self.embed(&texts)).map_err(|e| {
            Error::Inference(Context::new(format!("model {}: bert forward", self.model_id), e).into())
        })?;
        let data: Vec<u8> = embeddings.iter().flat_map(|v| v.to_le_bytes()).collect();
        Ok(vec![Tensor {
            name: OUTPUT_NAME.to_owned(),
            datatype: DataType::Fp32,
            shape: vec![n as i64, self.config.dim() as i64],
            data: TensorData::Raw(Bytes::from(data)),
        }])
    }
}

fn invalid(e: InputError) -> Error {
    Error::InvalidInput(e.into())
}

/// The strings of the text input, checked: BYTES, shape `[n]` or `[n, 1]`, UTF-8.
fn texts(input: &Tensor) -> Result<Vec<&str>, InputError> {
    let TensorData::Strings(elements) = &input.data else {
        return Err(InputError::NotBytes { name: input.name.clone(), datatype: input.datatype });
    };
    if input.datatype != DataType::Bytes {
        return Err(InputError::NotBytes { name: input.name.clone(), datatype: input.datatype });
    }
    let shape_ok = match input.shape.as_slice() {
        [n] | [n, 1] => usize::try_from(*n).is_ok_and(|n| n == elements.len()),
        _ => false,
    };
    if !shape_ok {
        return Err(InputError::Shape {
            name: input.name.clone(),
            shape: input.shape.clone(),
            count: elements.len(),
        });
    }
    elements
        .iter()
        .enumerate()
        .map(|(index, bytes)| {
            std::str::from_utf8(bytes).map_err(|source| InputError::NotUtf8 {
                name: input.name.clone(),
                index,
                source,
            })
        })
        .collect()
}

/// Reads `tokenizer.json` and sets it up for this runtime: truncation at the model's maximum length
/// (the file's own 128 is a leftover of training) and no padding (chunks are padded by `embed_chunk`).
/// Returns the tokenizer and its estimated heap.
fn load_tokenizer(path: &Path, config: &EmbedderConfig) -> Result<(Tokenizer, u64), LoadError> {
    let malformed = |source: tokenizers::Error| LoadError::Malformed { path: path.to_path_buf(), source };
    let bytes = read_file(path)?;
    let json: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| LoadError::Malformed { path: path.to_path_buf(), source: e.into() })?;
    let mut tokenizer = Tokenizer::from_bytes(&bytes).map_err(malformed)?;
    let special = tokenizer.get_post_processor().map_or(0, |p| p.added_tokens(false));
    if config.max_tokens <= special {
        return Err(LoadError::Unsupported {
            path: path.to_path_buf(),
            what: format!("{special} special tokens, no room for text in {} tokens", config.max_tokens),
        });
    }
    let truncation = TruncationParams { max_length: config.max_tokens, ..TruncationParams::default() };
    tokenizer.with_truncation(Some(truncation)).map_err(malformed)?;
    tokenizer.with_padding(None::<PaddingParams>);
    Ok((tokenizer, tokenizer_bytes(&json)))
}

/// Builds the encoder from safetensors bytes, returning it and the bytes of the tensors it holds.
fn load_weights(bytes: &[u8], path: &Path, config: &EmbedderConfig) -> Result<(Bert, u64), LoadError> {
    let tensors = candle_core::safetensors::SliceSafetensors::new(bytes)
        .map_err(|e| LoadError::Malformed { path: path.to_path_buf(), source: e.into() })?;
    let counting = CountingBackend::new(tensors);
    let vb = VarBuilder::from_backend(Box::new(&counting), DType::F32, Device::Cpu);
    let bert = Bert::load(vb, path, &config.bert)?;
    Ok((bert, counting.bytes()))
}

#[cfg(test)]
mod tests {
    use densemesh_runtime_core::{DeviceCopy, InferRequest, LoadRequest, LoadedModel, Tensor, TensorData};

    use super::*;

    fn minilm() -> CandleModel {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.models/all-minilm-l6-v2");
        assert!(dir.join("model.safetensors").is_file(), "run scripts/setup.sh to extract all-MiniLM-L6-v2");
        let pool = Arc::new(rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap());
        CandleModel::load(&LoadRequest::from_path("minilm", dir), pool).unwrap()
    }

    fn embed(model: &CandleModel, texts: &[&str]) -> Vec<u8> {
        let input = Tensor {
            name: INPUT_NAME.into(),
            datatype: DataType::Bytes,
            shape: vec![texts.len() as i64],
            data: TensorData::Strings(texts.iter().map(|t| Bytes::copy_from_slice(t.as_bytes())).collect()),
        };
        match model.infer(InferRequest { inputs: vec![input], outputs: vec![] }).unwrap().remove(0).data {
            TensorData::Raw(bytes) => bytes.to_vec(),
            other => panic!("{other:?}"),
        }
    }

    /// The device copy's plumbing, with the host standing in for the GPU (CI has none): a promoted
    /// model runs on its copy and answers bit for bit as before, and a demoted one goes back to the
    /// host copy. The GPU itself is checked by scripts/device-check.sh.
    #[test]
    fn a_promoted_model_runs_on_its_device_copy_and_a_demoted_one_on_the_host_with_the_same_answers() {
        let model = minilm();
        let texts = ["The weather is lovely today.", "", "Il fait beau aujourd'hui, n'est-ce pas ?"];
        let before = embed(&model, &texts);
        assert_eq!(DeviceCopy::device(&model), None);
        model.promote_to(3, &Device::Cpu).unwrap();
        assert_eq!(DeviceCopy::device(&model), Some(3));
        assert_eq!(embed(&model, &texts), before);
        model.demote();
        assert_eq!(DeviceCopy::device(&model), None);
        assert_eq!(embed(&model, &texts), before);
        // Charged to a device: the weights alone, not the tokenizer.
        assert!(model.device_bytes() > 80_000_000 && model.device_bytes() < model.size_bytes());
    }

    #[test]
    fn only_a_build_with_candles_cuda_backend_offers_models_to_the_gpu_tier() {
        let model = minilm();
        assert!(model.device_copy().is_none(), "not offered without devices");
        let model = model.with_devices(Arc::default());
        assert_eq!(model.device_copy().is_some(), cfg!(feature = "cuda"));
        if !cfg!(feature = "cuda") {
            let err = DeviceCopy::promote(&model, 0).unwrap_err().to_string();
            assert!(err.contains("cannot open CUDA device 0"), "{err}");
        }
    }
}
