//! What a loaded model is charged: the bytes of the weight tensors it holds plus an estimate of its
//! tokenizer's heap.
//!
//! Weights are counted as they are loaded, through a [`SimpleBackend`] wrapper that records each tensor
//! the model asks for, so tensors the file holds but BERT does not use (the pooler, `position_ids`)
//! are not charged, and half-precision files are charged at the F32 they are widened to.
//!
//! The tokenizer is estimated from its file rather than measured, because a runtime library cannot
//! read the allocator's counters. A word-piece or BPE vocabulary is held twice, token to id and id to
//! token, each a hashbrown table (a power-of-two number of buckets at most 7/8 full, a 32-byte
//! `String`-and-id slot and one control byte per bucket) plus the token's own bytes; each BPE merge is
//! a 16-byte slot in a third table; added tokens are held the same way. The rest (normalizer,
//! pre-tokenizer, templates) is a few kilobytes, covered by a fixed allowance. For all-MiniLM-L6-v2
//! (30,522 word pieces) this gives 4.74 MB where a counting allocator measured 4.73 MB live after
//! `Tokenizer::from_bytes`: the tables, at 65,536 buckets each, are most of it.

use std::collections::HashMap;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::Init;
use candle_nn::var_builder::SimpleBackend;
use parking_lot::Mutex;
use serde_json::Value;

/// A hash-map slot holding a `String` (24 bytes) and a `u32` id, padded to 32.
const VOCAB_SLOT_BYTES: u64 = 32;
/// A hash-map slot of a BPE merge: a `(u32, u32)` pair to a `(rank, id)` pair.
const MERGE_SLOT_BYTES: u64 = 16;
/// Normalizer, pre-tokenizer, post-processor, decoder and the added-token matcher.
const TOKENIZER_FIXED_BYTES: u64 = 16 * 1024;

/// The heap of a hashbrown table of `entries` slots of `slot` bytes: buckets are a power of two kept
/// at most 7/8 full (4 or 8 for small tables), each with one control byte, plus one 16-byte group of
/// trailing control bytes.
fn hash_table_bytes(entries: u64, slot: u64) -> u64 {
    let buckets = match entries {
        0 => return 0,
        1..4 => 4,
        4..8 => 8,
        n => (n * 8).div_ceil(7).next_power_of_two(),
    };
    buckets * (slot + 1) + 16
}

/// A token list held both ways (token to id, id to token): two tables and two copies of every string.
fn two_way_vocab_bytes<'a>(tokens: impl Iterator<Item = &'a str>) -> u64 {
    let (count, string_bytes) = tokens.fold((0u64, 0u64), |(n, b), t| (n + 1, b + t.len() as u64));
    2 * hash_table_bytes(count, VOCAB_SLOT_BYTES) + 2 * string_bytes
}

/// A weights backend that remembers the size of every tensor handed out. The `VarBuilder` is given a
/// reference, so the tally can be read once the model is built and the builder dropped.
pub struct CountingBackend<B> {
    inner: B,
    loaded: Mutex<HashMap<String, u64>>,
}

impl<B: SimpleBackend> CountingBackend<B> {
    /// Wraps `inner`.
    pub fn new(inner: B) -> Self {
        Self { inner, loaded: Mutex::new(HashMap::new()) }
    }

    fn record(&self, name: &str, tensor: &Tensor) {
        let bytes = (tensor.elem_count() * tensor.dtype().size_in_bytes()) as u64;
        self.loaded.lock().insert(name.to_owned(), bytes);
    }

    /// Bytes of the distinct tensors handed out so far.
    pub fn bytes(&self) -> u64 {
        self.loaded.lock().values().sum()
    }
}

impl<B: SimpleBackend> SimpleBackend for &CountingBackend<B> {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let tensor = self.inner.get(s, name, h, dtype, dev)?;
        self.record(name, &tensor);
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let tensor = self.inner.get_unchecked(name, dtype, dev)?;
        self.record(name, &tensor);
        Ok(tensor)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

/// The estimated heap of a tokenizer loaded from `tokenizer_json` (see the module's documentation).
pub fn tokenizer_bytes(tokenizer_json: &Value) -> u64 {
    let model = &tokenizer_json["model"];
    let vocab = match &model["vocab"] {
        // WordPiece, BPE, WordLevel: {token: id}.
        Value::Object(map) => two_way_vocab_bytes(map.keys().map(String::as_str)),
        // Unigram: [[token, score], ...], held as a list and a token-to-id map: about the same.
        Value::Array(list) => two_way_vocab_bytes(list.iter().filter_map(|entry| entry[0].as_str())),
        _ => 0,
    };
    let merges = model["merges"].as_array().map_or(0, |m| hash_table_bytes(m.len() as u64, MERGE_SLOT_BYTES));
    let added = tokenizer_json["added_tokens"]
        .as_array()
        .map_or(0, |tokens| two_way_vocab_bytes(tokens.iter().filter_map(|t| t["content"].as_str())));
    vocab + merges + added + TOKENIZER_FIXED_BYTES
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_word_piece_vocabulary_is_charged_two_tables_and_two_copies_of_its_strings() {
        let file =
            json!({"model": {"type": "WordPiece", "vocab": {"[PAD]": 0, "hello": 1}}, "added_tokens": []});
        let table = 4 * (VOCAB_SLOT_BYTES + 1) + 16;
        assert_eq!(tokenizer_bytes(&file), 2 * table + 2 * 10 + TOKENIZER_FIXED_BYTES);
    }

    #[test]
    fn tables_grow_by_powers_of_two_at_seven_eighths_full() {
        assert_eq!(hash_table_bytes(0, 32), 0);
        assert_eq!(hash_table_bytes(7, 32), 8 * 33 + 16);
        assert_eq!(hash_table_bytes(28_672, 32), 32_768 * 33 + 16, "exactly 7/8 of 32,768");
        assert_eq!(hash_table_bytes(28_673, 32), 65_536 * 33 + 16);
        assert_eq!(hash_table_bytes(30_522, 32), 65_536 * 33 + 16, "MiniLM's vocabulary");
    }

    #[test]
    fn bpe_merges_add_a_table_to_the_vocabulary() {
        let without = json!({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}}});
        let with = json!({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"]}});
        assert_eq!(tokenizer_bytes(&with) - tokenizer_bytes(&without), 4 * (MERGE_SLOT_BYTES + 1) + 16);
    }

    #[test]
    fn only_tensors_handed_out_are_counted_once_each() {
        let mut tensors = HashMap::new();
        tensors.insert("used".to_owned(), Tensor::zeros((3, 4), DType::F32, &Device::Cpu).unwrap());
        tensors.insert("unused".to_owned(), Tensor::zeros(1000, DType::F32, &Device::Cpu).unwrap());
        let backend = CountingBackend::new(tensors);
        let vb = candle_nn::VarBuilder::from_backend(Box::new(&backend), DType::F32, Device::Cpu);
        vb.get((3, 4), "used").unwrap();
        vb.get((3, 4), "used").unwrap();
        assert_eq!(backend.bytes(), 48);
    }
}
