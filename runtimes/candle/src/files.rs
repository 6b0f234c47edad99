//! The model directory: which files a sentence-embedding model is made of, and what its configuration
//! files say, read into plain data before any weight is touched.
//!
//! The layout is a sentence-transformers model as published: `model.safetensors`, `config.json` and
//! `tokenizer.json` side by side, plus, when present, `modules.json` (the module pipeline),
//! `sentence_bert_config.json` (maximum length, lower-casing) and the pooling module's folder
//! (`1_Pooling/config.json`). A plain BERT checkpoint without the sentence-transformers files is served
//! with mean pooling, unnormalized, truncated at `max_position_embeddings`: sentence-transformers'
//! own defaults for such a model.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::bert::{BertConfig, BertConfigFile};
use crate::error::LoadError;
use crate::pooling::{Pooling, PoolingMode};

/// The weights file's name, which a model repository entry's main file must have.
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// Where a model's files are.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// The directory holding every file.
    pub dir: PathBuf,
}

impl ModelFiles {
    /// The files of the model whose main file (`model.safetensors`) or directory is `path`.
    pub fn locate(path: &Path) -> Self {
        let dir = if path.is_dir() {
            path.to_path_buf()
        } else {
            path.parent().map(Path::to_path_buf).unwrap_or_default()
        };
        Self { dir }
    }

    /// The path of one file of the model.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// Everything the configuration files say about how to embed text.
#[derive(Debug, Clone)]
pub struct EmbedderConfig {
    /// The transformer's shape (`config.json`).
    pub bert: BertConfig,
    /// Longest input in tokens, special tokens included; longer inputs are truncated, as
    /// sentence-transformers truncates at its `max_seq_length`.
    pub max_tokens: usize,
    /// Whether sentence-transformers lower-cases the text before tokenizing (`do_lower_case`).
    pub lower_case: bool,
    /// How token vectors become one vector.
    pub pooling: Pooling,
    /// Whether the pooled vector is scaled to unit length (a `Normalize` module).
    pub normalize: bool,
}

/// `config.json` fields this runtime checks beyond the encoder's shape.
#[derive(Deserialize)]
struct ModelKind {
    #[serde(default)]
    model_type: Option<String>,
}

/// `sentence_bert_config.json`.
#[derive(Deserialize)]
struct SentenceBertConfig {
    #[serde(default)]
    max_seq_length: Option<usize>,
    #[serde(default)]
    do_lower_case: bool,
}

/// One entry of `modules.json`.
#[derive(Deserialize)]
struct Module {
    path: String,
    #[serde(rename = "type")]
    kind: String,
}

/// `1_Pooling/config.json`; newer sentence-transformers versions add modes this runtime refuses.
#[derive(Deserialize)]
struct PoolingFile {
    word_embedding_dimension: Option<usize>,
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
    #[serde(default)]
    pooling_mode_weightedmean_tokens: bool,
    #[serde(default)]
    pooling_mode_lasttoken: bool,
}

impl EmbedderConfig {
    /// Reads and checks the configuration files of `files`.
    pub fn read(files: &ModelFiles) -> Result<Self, LoadError> {
        let config_path = files.file("config.json");
        let bert: BertConfigFile = read_json(&config_path)?;
        let kind: ModelKind = read_json(&config_path)?;
        // RoBERTa-style checkpoints load into BERT's shapes but offset their positions by the
        // padding id: they would run and return wrong vectors.
        if let Some(model_type) = kind.model_type.filter(|t| t != "bert") {
            return Err(LoadError::Unsupported {
                path: config_path,
                what: format!("model_type {model_type}"),
            });
        }
        let bert = BertConfig::try_from(bert)
            .map_err(|what| LoadError::Unsupported { path: config_path.clone(), what })?;

        let st_path = files.file("sentence_bert_config.json");
        let st: SentenceBertConfig = if st_path.exists() {
            read_json(&st_path)?
        } else {
            SentenceBertConfig { max_seq_length: None, do_lower_case: false }
        };
        // Positions past the embedding table do not exist, whatever sentence-transformers allows.
        let max_tokens =
            st.max_seq_length.unwrap_or(bert.max_position_embeddings).min(bert.max_position_embeddings);
        if max_tokens < 2 {
            return Err(LoadError::Unsupported {
                path: st_path,
                what: format!("max_seq_length {max_tokens}"),
            });
        }

        let modules_path = files.file("modules.json");
        let (pooling, normalize) = if modules_path.exists() {
            let modules: Vec<Module> = read_json(&modules_path)?;
            pipeline(files, &modules_path, &modules, bert.hidden_size)?
        } else {
            // Without modules.json sentence-transformers wraps a checkpoint in mean pooling; a
            // 2_Normalize folder still says what the model was published with.
            let pooling = Pooling::new(vec![PoolingMode::Mean], bert.hidden_size);
            (pooling, files.file("2_Normalize").is_dir())
        };
        Ok(Self { bert, max_tokens, lower_case: st.do_lower_case, pooling, normalize })
    }

    /// The embedding's length.
    pub fn dim(&self) -> usize {
        self.pooling.output_dim()
    }
}

/// The pooling and normalization a `modules.json` pipeline asks for; any module that would change
/// the vector in a way this runtime does not (a `Dense` projection) refuses the load.
fn pipeline(
    files: &ModelFiles,
    modules_path: &Path,
    modules: &[Module],
    hidden_size: usize,
) -> Result<(Pooling, bool), LoadError> {
    let mut pooling = None;
    let mut normalize = false;
    for module in modules {
        match module.kind.rsplit('.').next().unwrap_or_default() {
            "Transformer" => {}
            "Pooling" => {
                pooling = Some(read_pooling(&files.dir.join(&module.path).join("config.json"), hidden_size)?)
            }
            "Normalize" => normalize = true,
            _ => {
                return Err(LoadError::Unsupported {
                    path: modules_path.to_path_buf(),
                    what: format!("module {} ({})", module.path, module.kind),
                });
            }
        }
    }
    let pooling = pooling.unwrap_or_else(|| Pooling::new(vec![PoolingMode::Mean], hidden_size));
    Ok((pooling, normalize))
}

fn read_pooling(path: &Path, hidden_size: usize) -> Result<Pooling, LoadError> {
    let file: PoolingFile = read_json(path)?;
    let unsupported = |what: &str| LoadError::Unsupported { path: path.to_path_buf(), what: what.to_owned() };
    if file.word_embedding_dimension.is_some_and(|d| d != hidden_size) {
        return Err(unsupported("a word_embedding_dimension other than config.json's hidden_size"));
    }
    if file.pooling_mode_weightedmean_tokens {
        return Err(unsupported("pooling_mode_weightedmean_tokens"));
    }
    if file.pooling_mode_lasttoken {
        return Err(unsupported("pooling_mode_lasttoken"));
    }
    // sentence-transformers concatenates the modes in this order.
    let modes: Vec<PoolingMode> = [
        (file.pooling_mode_cls_token, PoolingMode::Cls),
        (file.pooling_mode_max_tokens, PoolingMode::Max),
        (file.pooling_mode_mean_tokens, PoolingMode::Mean),
        (file.pooling_mode_mean_sqrt_len_tokens, PoolingMode::MeanSqrtLen),
    ]
    .into_iter()
    .filter_map(|(on, mode)| on.then_some(mode))
    .collect();
    if modes.is_empty() {
        return Err(unsupported("no pooling mode"));
    }
    Ok(Pooling::new(modes, hidden_size))
}

/// Reads a JSON file, naming it in every error.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, LoadError> {
    let bytes = read_file(path)?;
    serde_json::from_slice(&bytes)
        .map_err(|e| LoadError::Malformed { path: path.to_path_buf(), source: e.into() })
}

/// Reads a file, telling a missing file from an unreadable one.
pub fn read_file(path: &Path) -> Result<Vec<u8>, LoadError> {
    std::fs::read(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => LoadError::Missing { path: path.to_path_buf() },
        _ => LoadError::Read { path: path.to_path_buf(), source },
    })
}
