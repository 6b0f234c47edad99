//! Bad requests and broken model directories: each gets the typed error the mesh maps to a status
//! code, with a message that names the input, the element or the file.

mod common;

use std::path::Path;

use bytes::Bytes;
use common::{minilm, model_dir, runtime, text_input};
use densemesh_runtime_candle::{InputError, LoadError};
use densemesh_runtime_core::{DataType, Error, InferRequest, LoadRequest, Runtime, Tensor, TensorData};

fn infer_error(inputs: Vec<Tensor>, outputs: Vec<String>) -> Error {
    match minilm().infer(InferRequest { inputs, outputs }) {
        Ok(_) => panic!("the request was served"),
        Err(e) => e,
    }
}

/// The [`InputError`] inside an `Error::InvalidInput`.
fn input_error(err: &Error) -> &InputError {
    let Error::InvalidInput(cause) = err else { panic!("not InvalidInput: {err}") };
    cause.downcast_ref::<InputError>().unwrap_or_else(|| panic!("cause is not an InputError: {cause}"))
}

#[test]
fn a_non_bytes_input_is_refused_by_name() {
    let input = Tensor {
        name: "text".into(),
        datatype: DataType::Fp32,
        shape: vec![1],
        data: TensorData::Raw(Bytes::from_static(&[0, 0, 128, 63])),
    };
    let err = infer_error(vec![input], vec![]);
    assert!(
        matches!(input_error(&err), InputError::NotBytes { name, datatype: DataType::Fp32 } if name == "text")
    );
    assert_eq!(err.to_string(), "invalid input: input text must be BYTES, got FP32");
}

#[test]
fn invalid_utf8_names_the_element() {
    let mut input = text_input(&["fine", "also fine", "x"]);
    input.data = TensorData::Strings(vec![
        Bytes::from_static(b"fine"),
        Bytes::from_static(b"also fine"),
        Bytes::from_static(b"caf\xe9"),
    ]);
    let err = infer_error(vec![input], vec![]);
    assert!(
        matches!(input_error(&err), InputError::NotUtf8 { name, index: 2, .. } if name == "text"),
        "{err}"
    );
    assert!(err.to_string().contains("input text element 2 is not valid UTF-8"), "{err}");
}

#[test]
fn a_missing_input_names_what_was_expected_and_what_came() {
    let mut input = text_input(&["hello"]);
    input.name = "sentences".into();
    let err = infer_error(vec![input], vec![]);
    assert!(
        matches!(input_error(&err), InputError::Missing { expected: "text", got } if got == &["sentences"])
    );
}

#[test]
fn a_shape_that_is_not_n_or_n_by_1_is_refused() {
    // (shape, elements sent): a row of two, a count that disagrees with the shape, rank 3, a scalar.
    for (shape, texts) in
        [(vec![1, 2], &["a", "b"][..]), (vec![2], &["only one"]), (vec![1, 1, 1], &["a"]), (vec![], &["a"])]
    {
        let mut input = text_input(texts);
        input.shape = shape.clone();
        let err = infer_error(vec![input], vec![]);
        assert!(
            matches!(input_error(&err), InputError::Shape { name, .. } if name == "text"),
            "{shape:?}: {err}"
        );
    }
}

#[test]
fn an_unknown_output_is_refused() {
    let err = infer_error(vec![text_input(&["hello"])], vec!["logits".into()]);
    assert!(matches!(input_error(&err), InputError::UnknownOutput { name, .. } if name == "logits"));
}

/// A copy of the model directory made of symbolic links (the weights are 90 MB), less `without`,
/// with `replace` files written instead of linked.
fn model_copy(without: &[&str], replace: &[(&str, &str)]) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let src = model_dir();
    for name in
        ["model.safetensors", "config.json", "tokenizer.json", "modules.json", "sentence_bert_config.json"]
    {
        if !without.contains(&name) {
            std::os::unix::fs::symlink(src.join(name), tmp.path().join(name)).unwrap();
        }
    }
    if !without.contains(&"1_Pooling/config.json") {
        std::fs::create_dir(tmp.path().join("1_Pooling")).unwrap();
        std::os::unix::fs::symlink(
            src.join("1_Pooling/config.json"),
            tmp.path().join("1_Pooling/config.json"),
        )
        .unwrap();
    }
    for (name, contents) in replace {
        let path = tmp.path().join(name);
        let _ = std::fs::remove_file(&path);
        std::fs::write(path, contents).unwrap();
    }
    tmp
}

/// Loads `dir` and returns the [`LoadError`] inside the `Error::Load`.
fn load_error(dir: &Path) -> LoadError {
    let request = LoadRequest::from_path("broken", dir.join("model.safetensors"));
    let err = match runtime().load(&request) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e,
    };
    assert!(err.to_string().starts_with("cannot load model broken: "), "{err}");
    let Error::Load { source, .. } = err else { panic!("not a load error: {err}") };
    *source.downcast::<LoadError>().unwrap_or_else(|e| panic!("cause is not a LoadError: {e}"))
}

#[test]
fn each_missing_file_is_named() {
    for file in ["model.safetensors", "config.json", "tokenizer.json", "1_Pooling/config.json"] {
        let dir = model_copy(&[file], &[]);
        match load_error(dir.path()) {
            LoadError::Missing { path } => assert!(path.ends_with(file), "{file}: named {}", path.display()),
            other => panic!("{file}: {other}"),
        }
    }
}

#[test]
fn a_model_that_is_not_there_is_named_by_its_main_file() {
    let empty = tempfile::tempdir().unwrap();
    match load_error(empty.path()) {
        LoadError::Missing { path } => assert_eq!(path, empty.path().join("model.safetensors")),
        other => panic!("{other}"),
    }
}

#[test]
fn each_malformed_file_is_named() {
    for file in
        ["model.safetensors", "config.json", "tokenizer.json", "modules.json", "sentence_bert_config.json"]
    {
        let dir = model_copy(&[], &[(file, "{ not json")]);
        match load_error(dir.path()) {
            LoadError::Malformed { path, .. } => {
                assert!(path.ends_with(file), "{file}: named {}", path.display())
            }
            other => panic!("{file}: {other}"),
        }
    }
}

#[test]
fn modules_that_would_change_the_vector_are_refused() {
    let modules = r#"[{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]"#;
    let dir = model_copy(&[], &[("modules.json", modules)]);
    let err = load_error(dir.path());
    assert!(matches!(&err, LoadError::Unsupported { path, .. } if path.ends_with("modules.json")), "{err}");
    assert!(err.to_string().contains("2_Dense"), "{err}");

    let config =
        std::fs::read_to_string(model_dir().join("config.json")).unwrap().replace("\"bert\"", "\"roberta\"");
    let dir = model_copy(&[], &[("config.json", &config)]);
    let err = load_error(dir.path());
    assert!(matches!(&err, LoadError::Unsupported { path, .. } if path.ends_with("config.json")), "{err}");
}

#[test]
fn without_sentence_transformers_files_a_checkpoint_is_mean_pooled_unnormalized() {
    let dir = model_copy(&["modules.json", "sentence_bert_config.json", "1_Pooling/config.json"], &[]);
    let model = runtime().load(&LoadRequest::from_path("plain", dir.path())).unwrap();
    let plain = &common::embed(model.as_ref(), &["The weather is lovely today."])[0];
    let published = &common::embed(minilm(), &["The weather is lovely today."])[0];
    let norm: f32 = plain.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() > 0.01, "a model without a Normalize module is not normalized (norm {norm})");
    assert!(common::cosine(plain, published) > 0.99999, "the same mean pooling, only unscaled");
}
