//! The runtime's embeddings against an independent numpy BERT (`reference_bert.py`) and against the
//! similarities sentence-transformers publishes for all-MiniLM-L6-v2.
//!
//! The model is the real all-MiniLM-L6-v2 extracted by `scripts/setup.sh`; without it these tests fail
//! and say so, they never skip.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::{cosine, embed, minilm, model_dir, python, runtime, text_input};
use densemesh_runtime_candle::{INPUT_NAME, OUTPUT_NAME, PLATFORM};
use densemesh_runtime_core::{
    DataType, InferRequest, LoadRequest, ModelBytes, ModelMetadata, Runtime, TensorSpec,
};

/// Runs the numpy reference on `sentences`.
fn reference(sentences: &[&str]) -> Vec<Vec<f32>> {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference_bert.py");
    let mut child = Command::new(python())
        .arg(&script)
        .arg(model_dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the reference starts");
    let input = serde_json::to_vec(sentences).expect("sentences serialize");
    child.stdin.take().expect("stdin").write_all(&input).expect("sentences are sent");
    let output = child.wait_with_output().expect("the reference runs");
    assert!(output.status.success(), "reference_bert.py failed ({}): run scripts/setup.sh", output.status);
    let rows: Vec<Vec<f64>> = serde_json::from_slice(&output.stdout).expect("the reference prints JSON");
    rows.into_iter().map(|r| r.into_iter().map(|x| x as f32).collect()).collect()
}

/// Fifty sentences meant to hit every path of the tokenizer and the encoder.
fn varied_sentences() -> Vec<String> {
    let long = "The quick brown fox jumps over the lazy dog while the committee deliberates on the \
                budget for next year's infrastructure programme. "
        .repeat(20);
    let mut sentences: Vec<String> = [
        "",
        " ",
        "a",
        "Hello, world!",
        "The weather is lovely today.",
        "It's so sunny outside!",
        "He drove to the stadium.",
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "The girl is carrying a baby.",
        "A man is riding a horse.",
        "A woman is playing violin.",
        "Two men pushed carts through the woods.",
        "A monkey is playing drums.",
        "Café naïve résumé: déjà vu à la carte.",
        "Straße, Übermaß, Ärger und Öl.",
        "Ça va? Où est la bibliothèque?",
        "I love pizza 🍕🍕🔥 and 🎉 parties",
        "👨‍👩‍👧‍👦 family emoji with zero-width joiners",
        "🙂",
        "我喜欢吃苹果。",
        "日本語のテキストを埋め込みます。",
        "한국어 문장도 처리할 수 있나요?",
        "Привет, как дела?",
        "مرحبا بالعالم",
        "שלום עולם",
        "नमस्ते दुनिया",
        "Ελληνικά γράμματα: αβγδε",
        "!!!???...,,,;;;:::",
        "(parentheses) [brackets] {braces} <angles>",
        "email@example.com https://example.com/path?q=1&r=2",
        "fn main() { println!(\"hello\"); }",
        "3.14159 2.71828 1,000,000 42%",
        "ALL CAPS SENTENCE SHOUTING LOUDLY",
        "tabs\tand\nnewlines\r\nmixed",
        "supercalifragilisticexpialidocious antidisestablishmentarianism",
        "e\u{301}te\u{301} with combining accents",
        "control\u{7}chars\u{0}inside",
        "non\u{a0}breaking\u{2003}spaces",
        "The cat sat on the mat. The dog sat on the log.",
        "Is this a question? Yes, it is a question!",
        "Machine learning models map sentences to vectors.",
        "Sentence embeddings capture semantic meaning.",
        "The stock market fell sharply on Monday.",
        "She sells sea shells by the sea shore.",
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    sentences.push(long.clone());
    sentences.push(format!("{long} and then the story ends differently"));
    sentences.push("漢字".repeat(300));
    sentences.push("word ".repeat(40));
    assert_eq!(sentences.len(), 50);
    sentences
}

#[test]
fn matches_the_numpy_reference_on_fifty_varied_sentences() {
    let sentences = varied_sentences();
    let sentences: Vec<&str> = sentences.iter().map(String::as_str).collect();
    let expected = reference(&sentences);
    let got = embed(minilm(), &sentences);
    assert_eq!(got.len(), expected.len());
    let mut worst = (f64::INFINITY, 0);
    for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
        assert_eq!(g.len(), 384, "sentence {i}");
        let c = cosine(g, e);
        if c < worst.0 {
            worst = (c, i);
        }
    }
    assert!(
        worst.0 >= 0.9999,
        "sentence {} {:?}: cosine {} against the reference",
        worst.1,
        sentences[worst.1].chars().take(80).collect::<String>(),
        worst.0
    );
}

/// sentence-transformers' model card for all-MiniLM-L6-v2 prints these similarities.
const PUBLISHED: [&str; 3] =
    ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."];
const PUBLISHED_SIMILARITIES: [((usize, usize), f64); 3] =
    [((0, 1), 0.6660), ((0, 2), 0.1046), ((1, 2), 0.1411)];

fn assert_published(what: &str, embeddings: &[Vec<f32>]) {
    for ((a, b), published) in PUBLISHED_SIMILARITIES {
        let got = cosine(&embeddings[a], &embeddings[b]);
        assert!(
            (got - published).abs() <= 1e-4,
            "{what}: similarity of sentences {a} and {b} is {got:.6}, sentence-transformers publishes {published}"
        );
    }
}

#[test]
fn the_reference_reproduces_the_published_similarities() {
    assert_published("the numpy reference", &reference(&PUBLISHED));
}

#[test]
fn the_runtime_reproduces_the_published_similarities() {
    let embeddings = embed(minilm(), &PUBLISHED);
    assert_published("the candle runtime", &embeddings);
    for row in &embeddings {
        let norm: f32 = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "2_Normalize makes unit vectors, got norm {norm}");
    }
}

#[test]
fn a_sentence_gets_the_same_vector_alone_and_padded_in_a_batch() {
    let short = "A monkey is playing drums.";
    let long = "A long sentence that forces the short one to be padded by many positions, ".repeat(8);
    let alone = &embed(minilm(), &[short])[0];
    let batched = embed(minilm(), &[&long, short, "x"]);
    let max_diff = alone.iter().zip(&batched[1]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(max_diff < 1e-5, "padding moved the embedding by up to {max_diff}");
}

#[test]
fn text_past_the_maximum_length_is_truncated() {
    // 300 words are well past MiniLM's 256 tokens: what follows them cannot change the embedding.
    let long = "river ".repeat(300);
    let longer = format!("{long} but this ending is entirely different and about mountains");
    let rows = embed(minilm(), &[&long, &longer]);
    assert!(cosine(&rows[0], &rows[1]) > 0.999_999, "text past the maximum changed the embedding");
}

#[test]
fn more_sentences_than_a_chunk_keep_their_order() {
    let sentences: Vec<String> = (0..densemesh_runtime_candle::CHUNK_SENTENCES * 2 + 3)
        .map(|i| format!("sentence number {i} {}", "x ".repeat(i % 7)))
        .collect();
    let refs: Vec<&str> = sentences.iter().map(String::as_str).collect();
    let batch = embed(minilm(), &refs);
    for i in [0, 5, 40, refs.len() - 1] {
        let alone = &embed(minilm(), &[refs[i]])[0];
        assert!(cosine(alone, &batch[i]) > 0.999_99, "sentence {i} came back out of place");
    }
}

#[test]
fn an_n_by_1_input_and_an_empty_one_are_served() {
    let mut input = text_input(&["one", "two"]);
    input.shape = vec![2, 1];
    let outputs =
        minilm().infer(InferRequest { inputs: vec![input], outputs: vec![OUTPUT_NAME.to_owned()] }).unwrap();
    assert_eq!(outputs[0].shape, vec![2, 384]);
    let outputs = minilm().infer(InferRequest { inputs: vec![text_input(&[])], outputs: vec![] }).unwrap();
    assert_eq!(outputs[0].shape, vec![0, 384]);
}

#[test]
fn metadata_and_size_describe_the_model() {
    let model = minilm();
    let expected = ModelMetadata {
        platform: PLATFORM.to_owned(),
        inputs: vec![TensorSpec { name: INPUT_NAME.to_owned(), datatype: DataType::Bytes, shape: vec![-1] }],
        outputs: vec![TensorSpec {
            name: OUTPUT_NAME.to_owned(),
            datatype: DataType::Fp32,
            shape: vec![-1, 384],
        }],
    };
    assert_eq!(model.metadata(), &expected);
    // 22.6 M F32 parameters in the encoder (the file's pooler and position_ids are not loaded), plus
    // the tokenizer: a counting allocator measured 4.73 MB live after loading it.
    let encoder = 4
        * (30_522 * 384
            + 512 * 384
            + 2 * 384
            + 2 * 384
            + 6 * (4 * (384 * 384 + 384) + 2 * 384 * 1536 + 1536 + 384 + 4 * 384));
    let tokenizer = model.size_bytes() - encoder as u64;
    assert!(
        (4_500_000..5_000_000).contains(&tokenizer),
        "size {} leaves {tokenizer} bytes for the tokenizer",
        model.size_bytes()
    );
}

#[test]
fn the_directory_the_file_and_mapped_bytes_load_the_same_model() {
    let dir = model_dir();
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let mut from_bytes = LoadRequest::from_path("m", dir.join("model.safetensors"));
    from_bytes.contents = Some(ModelBytes(std::sync::Arc::new(bytes)));
    let expected = embed(minilm(), &PUBLISHED);
    for request in [LoadRequest::from_path("m", &dir), from_bytes] {
        let model = runtime().load(&request).unwrap();
        assert_eq!(model.size_bytes(), minilm().size_bytes());
        assert_eq!(embed(model.as_ref(), &PUBLISHED), expected, "{request:?}");
    }
}
