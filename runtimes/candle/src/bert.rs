//! The BERT encoder: token, position and segment embeddings, then `num_hidden_layers` post-norm
//! transformer layers, on candle's CPU tensors.
//!
//! This crate's own, rather than `candle-transformers`' model zoo, which was the most expensive crate
//! of the workspace to compile (hundreds of architectures) for the one this runtime serves. It reads a
//! Hugging Face `BertModel` checkpoint by its tensor names (`embeddings.word_embeddings.weight`,
//! `encoder.layer.{i}.attention.self.query.weight`, ...), bare or under the `bert.` prefix that
//! `BertFor*` checkpoints add, checks every tensor's shape against `config.json`, and names the tensor
//! at fault when one is missing or misshapen.
//!
//! Activations stay `[batch × tokens, hidden]` through each layer so every dense layer is one matrix
//! product over the whole chunk; only attention splits them into `[batch, heads, tokens, head]`.

use std::path::Path;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{LayerNorm, Linear, Module, VarBuilder};
use serde::Deserialize;

use crate::error::LoadError;

/// The fields of `config.json` the encoder is built from, as the file has them. Defaults are those of
/// transformers' `BertConfig`, which fills in whatever a file leaves out the same way.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfigFile {
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    max_position_embeddings: usize,
    #[serde(default = "default_type_vocab_size")]
    type_vocab_size: usize,
    #[serde(default = "default_hidden_act")]
    hidden_act: String,
    #[serde(default = "default_layer_norm_eps")]
    layer_norm_eps: f64,
    #[serde(default = "default_position_embedding_type")]
    position_embedding_type: String,
}

fn default_type_vocab_size() -> usize {
    2
}

fn default_hidden_act() -> String {
    "gelu".to_owned()
}

fn default_layer_norm_eps() -> f64 {
    1e-12
}

fn default_position_embedding_type() -> String {
    "absolute".to_owned()
}

/// The feed-forward activation, by `hidden_act`'s name in transformers' `ACT2FN`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `gelu`: the exact form, `x · Φ(x)` with the error function; what BERT was trained with.
    GeluErf,
    /// `gelu_new`, `gelu_pytorch_tanh`: the tanh approximation. Serving a model trained with one form
    /// through the other moves its embeddings, so the names are not interchangeable.
    GeluTanh,
    /// `relu`.
    Relu,
}

impl Activation {
    fn from_name(name: &str) -> Option<Self> {
        match name {
            "gelu" => Some(Self::GeluErf),
            "gelu_new" | "gelu_pytorch_tanh" => Some(Self::GeluTanh),
            "relu" => Some(Self::Relu),
            _ => None,
        }
    }

    fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::GeluErf => x.gelu_erf(),
            Self::GeluTanh => x.gelu(),
            Self::Relu => x.relu(),
        }
    }
}

/// A checked BERT shape: every size positive, the heads dividing the hidden size, an activation and a
/// position scheme this encoder computes.
#[derive(Debug, Clone, PartialEq)]
pub struct BertConfig {
    /// Rows of the word-embedding table.
    pub vocab_size: usize,
    /// Width of every token vector.
    pub hidden_size: usize,
    /// Encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Width of the feed-forward layer.
    pub intermediate_size: usize,
    /// Rows of the position-embedding table: the longest input in tokens.
    pub max_position_embeddings: usize,
    /// Rows of the segment (token type) table.
    pub type_vocab_size: usize,
    /// The feed-forward activation.
    pub activation: Activation,
    /// The epsilon of every LayerNorm.
    pub layer_norm_eps: f64,
}

impl TryFrom<BertConfigFile> for BertConfig {
    /// What the file asks for that this encoder does not compute.
    type Error = String;

    fn try_from(file: BertConfigFile) -> std::result::Result<Self, String> {
        let activation = Activation::from_name(&file.hidden_act)
            .ok_or_else(|| format!("hidden_act {}", file.hidden_act))?;
        // Relative position schemes add terms to the attention scores that absolute BERT lacks: the
        // model would run and return wrong vectors.
        if file.position_embedding_type != "absolute" {
            return Err(format!("position_embedding_type {}", file.position_embedding_type));
        }
        let sizes = [
            ("vocab_size", file.vocab_size),
            ("hidden_size", file.hidden_size),
            ("num_attention_heads", file.num_attention_heads),
            ("intermediate_size", file.intermediate_size),
            ("max_position_embeddings", file.max_position_embeddings),
            ("type_vocab_size", file.type_vocab_size),
        ];
        if let Some((name, _)) = sizes.iter().find(|(_, size)| *size == 0) {
            return Err(format!("{name} 0"));
        }
        if !file.hidden_size.is_multiple_of(file.num_attention_heads) {
            return Err(format!(
                "hidden_size {} split over {} attention heads",
                file.hidden_size, file.num_attention_heads
            ));
        }
        Ok(Self {
            vocab_size: file.vocab_size,
            hidden_size: file.hidden_size,
            num_hidden_layers: file.num_hidden_layers,
            num_attention_heads: file.num_attention_heads,
            intermediate_size: file.intermediate_size,
            max_position_embeddings: file.max_position_embeddings,
            type_vocab_size: file.type_vocab_size,
            activation,
            layer_norm_eps: file.layer_norm_eps,
        })
    }
}

/// What an attention score is given where the key is padding: `-f32::MAX`, so that after softmax the
/// padding's weight is exactly zero and a sentence's vectors do not depend on its batch.
const MASKED_SCORE: f64 = -(f32::MAX as f64);

/// The name prefix `BertFor*` checkpoints put before the encoder's tensors.
const BERT_PREFIX: &str = "bert.";

/// Tensors read by name from a weights file, each checked against the shape the configuration
/// implies, with errors naming the file and the tensor.
struct Weights<'a> {
    vb: VarBuilder<'a>,
    path: &'a Path,
    prefix: &'static str,
}

impl Weights<'_> {
    fn get(&self, name: &str, shape: &[usize]) -> std::result::Result<Tensor, LoadError> {
        let tensor = format!("{}{name}", self.prefix);
        if !self.vb.contains_tensor(&tensor) {
            return Err(LoadError::MissingTensor { path: self.path.to_path_buf(), tensor });
        }
        let loaded = self
            .vb
            .get_unchecked(&tensor)
            .map_err(|e| LoadError::Malformed { path: self.path.to_path_buf(), source: e.into() })?;
        if loaded.dims() != shape {
            return Err(LoadError::TensorShape {
                path: self.path.to_path_buf(),
                tensor,
                expected: shape.to_vec(),
                got: loaded.dims().to_vec(),
            });
        }
        Ok(loaded)
    }

    /// `{name}.weight` (`[outputs, inputs]`, PyTorch's layout) and `{name}.bias`.
    fn linear(&self, name: &str, inputs: usize, outputs: usize) -> std::result::Result<Linear, LoadError> {
        let weight = self.get(&format!("{name}.weight"), &[outputs, inputs])?;
        let bias = self.get(&format!("{name}.bias"), &[outputs])?;
        Ok(Linear::new(weight, Some(bias)))
    }

    fn layer_norm(&self, name: &str, size: usize, eps: f64) -> std::result::Result<LayerNorm, LoadError> {
        let weight = self.get(&format!("{name}.weight"), &[size])?;
        let bias = self.get(&format!("{name}.bias"), &[size])?;
        Ok(LayerNorm::new(weight, bias, eps))
    }
}

/// One encoder layer: self-attention, then the feed-forward block, each followed by its residual and
/// LayerNorm (BERT normalizes after the residual, not before).
struct EncoderLayer {
    query: Linear,
    key: Linear,
    value: Linear,
    attention_output: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

fn linear_on(linear: &Linear, device: &Device) -> Result<Linear> {
    let bias = linear.bias().map(|b| b.to_device(device)).transpose()?;
    Ok(Linear::new(linear.weight().to_device(device)?, bias))
}

fn norm_on(norm: &LayerNorm, device: &Device) -> Result<LayerNorm> {
    let weight = norm.weight().to_device(device)?;
    Ok(match norm.bias() {
        Some(bias) => LayerNorm::new(weight, bias.to_device(device)?, norm.eps()),
        None => LayerNorm::new_no_bias(weight, norm.eps()),
    })
}

impl EncoderLayer {
    fn on(&self, device: &Device) -> Result<Self> {
        Ok(Self {
            query: linear_on(&self.query, device)?,
            key: linear_on(&self.key, device)?,
            value: linear_on(&self.value, device)?,
            attention_output: linear_on(&self.attention_output, device)?,
            attention_norm: norm_on(&self.attention_norm, device)?,
            intermediate: linear_on(&self.intermediate, device)?,
            output: linear_on(&self.output, device)?,
            output_norm: norm_on(&self.output_norm, device)?,
        })
    }

    fn load(
        weights: &Weights<'_>,
        index: usize,
        config: &BertConfig,
    ) -> std::result::Result<Self, LoadError> {
        let p = format!("encoder.layer.{index}");
        let (hidden, inner, eps) = (config.hidden_size, config.intermediate_size, config.layer_norm_eps);
        Ok(Self {
            query: weights.linear(&format!("{p}.attention.self.query"), hidden, hidden)?,
            key: weights.linear(&format!("{p}.attention.self.key"), hidden, hidden)?,
            value: weights.linear(&format!("{p}.attention.self.value"), hidden, hidden)?,
            attention_output: weights.linear(&format!("{p}.attention.output.dense"), hidden, hidden)?,
            attention_norm: weights.layer_norm(&format!("{p}.attention.output.LayerNorm"), hidden, eps)?,
            intermediate: weights.linear(&format!("{p}.intermediate.dense"), hidden, inner)?,
            output: weights.linear(&format!("{p}.output.dense"), inner, hidden)?,
            output_norm: weights.layer_norm(&format!("{p}.output.LayerNorm"), hidden, eps)?,
        })
    }
}

/// A loaded BERT encoder.
pub struct Bert {
    word_embeddings: Tensor,
    position_embeddings: Tensor,
    token_type_embeddings: Tensor,
    embeddings_norm: LayerNorm,
    layers: Vec<EncoderLayer>,
    heads: usize,
    hidden_size: usize,
    activation: Activation,
}

impl Bert {
    /// Builds the encoder from the tensors of `vb` (the weights file at `path`, named in errors). The
    /// pooler and any task head the file holds are not read, so they are neither loaded nor charged.
    pub fn load(
        vb: VarBuilder<'_>,
        path: &Path,
        config: &BertConfig,
    ) -> std::result::Result<Self, LoadError> {
        let first = "embeddings.word_embeddings.weight";
        let prefix = if !vb.contains_tensor(first) && vb.contains_tensor(&format!("{BERT_PREFIX}{first}")) {
            BERT_PREFIX
        } else {
            ""
        };
        let weights = Weights { vb, path, prefix };
        let hidden = config.hidden_size;
        let layers = (0..config.num_hidden_layers)
            .map(|i| EncoderLayer::load(&weights, i, config))
            .collect::<std::result::Result<_, _>>()?;
        Ok(Self {
            word_embeddings: weights.get(first, &[config.vocab_size, hidden])?,
            position_embeddings: weights
                .get("embeddings.position_embeddings.weight", &[config.max_position_embeddings, hidden])?,
            token_type_embeddings: weights
                .get("embeddings.token_type_embeddings.weight", &[config.type_vocab_size, hidden])?,
            embeddings_norm: weights.layer_norm("embeddings.LayerNorm", hidden, config.layer_norm_eps)?,
            layers,
            heads: config.num_attention_heads,
            hidden_size: hidden,
            activation: config.activation,
        })
    }

    /// A copy of the encoder with every weight on `device` (a host-to-device copy for a GPU): what a
    /// promotion to the GPU tier makes, the host copy staying as it is.
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        Ok(Self {
            word_embeddings: self.word_embeddings.to_device(device)?,
            position_embeddings: self.position_embeddings.to_device(device)?,
            token_type_embeddings: self.token_type_embeddings.to_device(device)?,
            embeddings_norm: norm_on(&self.embeddings_norm, device)?,
            layers: self.layers.iter().map(|l| l.on(device)).collect::<Result<_>>()?,
            heads: self.heads,
            hidden_size: self.hidden_size,
            activation: self.activation,
        })
    }

    /// The device its weights are on.
    pub fn device(&self) -> &Device {
        self.word_embeddings.device()
    }

    /// The last layer's token vectors, `[batch, tokens, hidden]`, for `ids` and `type_ids` (`[batch,
    /// tokens]`, U32) under `mask` (`[batch, tokens]`, 1 for a real token, 0 for padding). Padding
    /// keys get no attention, so each sentence's real tokens come out as they would unpadded.
    pub fn forward(&self, ids: &Tensor, type_ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (batch, tokens) = ids.dims2()?;
        let hidden = self.hidden_size;
        let words = self.word_embeddings.index_select(&ids.flatten_all()?, 0)?;
        let types = self.token_type_embeddings.index_select(&type_ids.flatten_all()?, 0)?;
        let positions = self.position_embeddings.narrow(0, 0, tokens)?;
        let embedded = (words + types)?.reshape((batch, tokens, hidden))?.broadcast_add(&positions)?;
        let mut x = self.embeddings_norm.forward(&embedded.reshape((batch * tokens, hidden))?)?;

        // Added to every score: 0 for a real key, MASKED_SCORE for padding.
        let mask_bias =
            mask.to_dtype(DType::F32)?.affine(-MASKED_SCORE, MASKED_SCORE)?.reshape((batch, 1, 1, tokens))?;
        for layer in &self.layers {
            x = self.layer_forward(layer, &x, &mask_bias, batch, tokens)?;
        }
        x.reshape((batch, tokens, hidden))
    }

    /// One layer over `x` (`[batch × tokens, hidden]`).
    fn layer_forward(
        &self,
        layer: &EncoderLayer,
        x: &Tensor,
        mask_bias: &Tensor,
        batch: usize,
        tokens: usize,
    ) -> Result<Tensor> {
        let head_size = self.hidden_size / self.heads;
        let by_head =
            |t: Tensor| t.reshape((batch, tokens, self.heads, head_size))?.transpose(1, 2)?.contiguous();
        // Scaling the queries rather than the scores: tokens × hidden multiplications instead of
        // heads × tokens².
        let query = by_head((layer.query.forward(x)? * (1.0 / (head_size as f64).sqrt()))?)?;
        let key = by_head(layer.key.forward(x)?)?;
        let value = by_head(layer.value.forward(x)?)?;
        let scores = query.matmul(&key.t()?)?.broadcast_add(mask_bias)?;
        let weights = candle_nn::ops::softmax_last_dim(&scores)?;
        let context = weights.matmul(&value)?.transpose(1, 2)?.reshape((batch * tokens, self.hidden_size))?;
        let attended = layer.attention_norm.forward(&(layer.attention_output.forward(&context)? + x)?)?;

        let inner = self.activation.apply(&layer.intermediate.forward(&attended)?)?;
        layer.output_norm.forward(&(layer.output.forward(&inner)? + &attended)?)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::Device;

    use super::*;

    /// A BERT of 2 layers, hidden size 8 in 2 heads, feed-forward 16, 20 words, 10 positions.
    fn config() -> BertConfig {
        let file: BertConfigFile = serde_json::from_value(serde_json::json!({
            "vocab_size": 20, "hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2,
            "intermediate_size": 16, "max_position_embeddings": 10,
        }))
        .unwrap();
        BertConfig::try_from(file).unwrap()
    }

    /// Random tensors under every name `config()` needs, each name prefixed by `prefix`.
    fn weights(prefix: &str) -> HashMap<String, Tensor> {
        let mut shapes: Vec<(String, Vec<usize>)> = vec![
            ("embeddings.word_embeddings.weight".into(), vec![20, 8]),
            ("embeddings.position_embeddings.weight".into(), vec![10, 8]),
            ("embeddings.token_type_embeddings.weight".into(), vec![2, 8]),
        ];
        let norm = |name: String, shapes: &mut Vec<(String, Vec<usize>)>| {
            shapes.push((format!("{name}.weight"), vec![8]));
            shapes.push((format!("{name}.bias"), vec![8]));
        };
        norm("embeddings.LayerNorm".into(), &mut shapes);
        for i in 0..2 {
            let p = format!("encoder.layer.{i}");
            for (name, outputs, inputs) in [
                ("attention.self.query", 8, 8),
                ("attention.self.key", 8, 8),
                ("attention.self.value", 8, 8),
                ("attention.output.dense", 8, 8),
                ("intermediate.dense", 16, 8),
                ("output.dense", 8, 16),
            ] {
                shapes.push((format!("{p}.{name}.weight"), vec![outputs, inputs]));
                shapes.push((format!("{p}.{name}.bias"), vec![outputs]));
            }
            norm(format!("{p}.attention.output.LayerNorm"), &mut shapes);
            norm(format!("{p}.output.LayerNorm"), &mut shapes);
        }
        shapes
            .into_iter()
            .map(|(name, shape)| {
                let tensor = Tensor::randn(0f32, 0.5, shape, &Device::Cpu).unwrap();
                (format!("{prefix}{name}"), tensor)
            })
            .collect()
    }

    fn load(tensors: HashMap<String, Tensor>) -> std::result::Result<Bert, LoadError> {
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
        Bert::load(vb, Path::new("model.safetensors"), &config())
    }

    fn ids(rows: &[&[u32]]) -> Tensor {
        Tensor::new(rows.iter().map(|r| r.to_vec()).collect::<Vec<_>>(), &Device::Cpu).unwrap()
    }

    #[test]
    fn padding_does_not_change_a_sentences_vectors() {
        let bert = load(weights("")).unwrap();
        let alone =
            bert.forward(&ids(&[&[1, 5, 7, 2]]), &ids(&[&[0, 0, 0, 0]]), &ids(&[&[1, 1, 1, 1]])).unwrap();
        let padded = bert
            .forward(
                &ids(&[&[1, 5, 7, 2, 0, 0], &[1, 9, 3, 4, 8, 2]]),
                &ids(&[&[0; 6], &[0; 6]]),
                &ids(&[&[1, 1, 1, 1, 0, 0], &[1; 6]]),
            )
            .unwrap();
        assert_eq!(padded.dims(), &[2, 6, 8]);
        let alone: Vec<Vec<f32>> = alone.squeeze(0).unwrap().to_vec2().unwrap();
        let padded: Vec<Vec<f32>> = padded.get(0).unwrap().narrow(0, 0, 4).unwrap().to_vec2().unwrap();
        for (a, p) in alone.iter().flatten().zip(padded.iter().flatten()) {
            assert!((a - p).abs() < 1e-5, "{alone:?} != {padded:?}");
        }
    }

    #[test]
    fn a_bert_prefix_is_read_like_bare_names() {
        let bare = weights("");
        let prefixed: HashMap<String, Tensor> =
            bare.iter().map(|(name, t)| (format!("bert.{name}"), t.clone())).collect();
        let (a, b) = (load(bare).unwrap(), load(prefixed).unwrap());
        let input = ids(&[&[1, 4, 2]]);
        let mask = ids(&[&[1, 1, 1]]);
        let type_ids = ids(&[&[0, 0, 0]]);
        let (a, b) =
            (a.forward(&input, &type_ids, &mask).unwrap(), b.forward(&input, &type_ids, &mask).unwrap());
        assert_eq!(
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    fn a_missing_tensor_is_named() {
        let mut tensors = weights("bert.");
        tensors.remove("bert.encoder.layer.1.intermediate.dense.bias");
        match load(tensors) {
            Err(LoadError::MissingTensor { tensor, .. }) => {
                assert_eq!(tensor, "bert.encoder.layer.1.intermediate.dense.bias")
            }
            Err(other) => panic!("{other}"),
            Ok(_) => panic!("loaded without a tensor"),
        }
    }

    #[test]
    fn a_misshapen_tensor_is_named_with_both_shapes() {
        let mut tensors = weights("");
        let name = "encoder.layer.0.attention.self.key.weight";
        tensors.insert(name.into(), Tensor::zeros((8, 7), DType::F32, &Device::Cpu).unwrap());
        match load(tensors) {
            Err(err @ LoadError::TensorShape { .. }) => {
                let LoadError::TensorShape { tensor, expected, got, .. } = &err else { unreachable!() };
                assert_eq!(
                    (tensor.as_str(), expected.as_slice(), got.as_slice()),
                    (name, &[8, 8][..], &[8, 7][..])
                );
                assert!(err.to_string().contains(name), "{err}");
            }
            Err(other) => panic!("{other}"),
            Ok(_) => panic!("loaded a misshapen tensor"),
        }
    }

    #[test]
    fn hidden_act_names_map_to_their_own_gelu() {
        assert_eq!(Activation::from_name("gelu"), Some(Activation::GeluErf));
        assert_eq!(Activation::from_name("gelu_new"), Some(Activation::GeluTanh));
        assert_eq!(Activation::from_name("gelu_pytorch_tanh"), Some(Activation::GeluTanh));
        assert_eq!(Activation::from_name("swish"), None);
        // The two forms differ by about 1e-3 near x = -2: enough to tell which one ran.
        let x = Tensor::new(&[-2f32], &Device::Cpu).unwrap();
        let erf = Activation::GeluErf.apply(&x).unwrap().to_vec1::<f32>().unwrap()[0];
        let tanh = Activation::GeluTanh.apply(&x).unwrap().to_vec1::<f32>().unwrap()[0];
        assert!((erf - -0.045_500_26).abs() < 1e-6, "erf gelu(-2) = {erf}");
        assert!((tanh - -0.045_402_3).abs() < 1e-6, "tanh gelu(-2) = {tanh}");
    }

    #[test]
    fn configurations_this_encoder_does_not_compute_are_refused_by_field() {
        for (field, value, refused) in [
            ("hidden_act", serde_json::json!("swish"), "hidden_act swish"),
            (
                "position_embedding_type",
                serde_json::json!("relative_key"),
                "position_embedding_type relative_key",
            ),
            ("num_attention_heads", serde_json::json!(3), "hidden_size 8 split over 3 attention heads"),
            ("hidden_size", serde_json::json!(0), "hidden_size 0"),
        ] {
            let mut json = serde_json::json!({
                "vocab_size": 20, "hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2,
                "intermediate_size": 16, "max_position_embeddings": 10,
            });
            json[field] = value;
            let file: BertConfigFile = serde_json::from_value(json).unwrap();
            assert_eq!(BertConfig::try_from(file).unwrap_err(), refused);
        }
    }
}
