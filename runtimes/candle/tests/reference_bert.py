"""An independent sentence-embedding reference for the candle runtime's tests: BERT written out in numpy.

It shares nothing with the crate but the model files: the safetensors file is read by the small parser
below (8-byte little-endian header length, a JSON header, then the raw tensor bytes), the text is
tokenized by Hugging Face's `tokenizers` (as sentence-transformers does, with the tokenizer file's fixed
padding turned off and truncation at sentence-transformers' max_seq_length), and every sentence runs
alone in float64, so no padding and no attention mask can enter the result.

Usage: reference_bert.py MODEL_DIR < sentences.json > embeddings.json
stdin: a JSON list of strings; stdout: a JSON list of embeddings (lists of floats), in order.
"""

import json
import math
import os
import struct
import sys

import numpy as np
from tokenizers import Tokenizer

_DTYPES = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "I64": np.int64, "I32": np.int32}


def read_safetensors(path):
    """All tensors of a safetensors file as float64 numpy arrays (integer tensors are skipped)."""
    with open(path, "rb") as f:
        data = f.read()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    base = 8 + header_len
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__" or info["dtype"] not in ("F32", "F64", "F16"):
            continue
        start, end = info["data_offsets"]
        array = np.frombuffer(data[base + start : base + end], dtype=np.dtype(_DTYPES[info["dtype"]]).newbyteorder("<"))
        tensors[name] = array.reshape(info["shape"]).astype(np.float64)
    return tensors


def read_json(path, default=None):
    if not os.path.exists(path):
        return default
    with open(path, encoding="utf-8") as f:
        return json.load(f)


_erf = np.frompyfunc(math.erf, 1, 1)


def gelu(x):
    """BERT's exact (erf) GELU."""
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)).astype(np.float64))


def layer_norm(x, weight, bias, eps):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


class Reference:
    def __init__(self, model_dir):
        self.config = read_json(os.path.join(model_dir, "config.json"))
        weights = read_safetensors(os.path.join(model_dir, "model.safetensors"))
        # Checkpoints saved from BertForX prefix the encoder's names with "bert.".
        if any(k.startswith("bert.") for k in weights):
            weights = {k[len("bert.") :]: v for k, v in weights.items() if k.startswith("bert.")}
        self.w = weights
        st = read_json(os.path.join(model_dir, "sentence_bert_config.json"), {})
        self.max_len = min(st.get("max_seq_length") or self.config["max_position_embeddings"], self.config["max_position_embeddings"])
        self.lower = st.get("do_lower_case", False)
        modules = read_json(os.path.join(model_dir, "modules.json"), [])
        pooling_dir = next((m["path"] for m in modules if m["type"].endswith(".Pooling")), None)
        pooling = read_json(os.path.join(model_dir, pooling_dir, "config.json")) if pooling_dir else {"pooling_mode_mean_tokens": True}
        self.modes = [m for m in ("cls_token", "max_tokens", "mean_tokens", "mean_sqrt_len_tokens") if pooling.get(f"pooling_mode_{m}")]
        self.normalize = any(m["type"].endswith(".Normalize") for m in modules)
        self.tokenizer = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=self.max_len)

    def encode(self, ids, type_ids):
        w, c = self.w, self.config
        eps = c["layer_norm_eps"]
        x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][: len(ids)] + w["embeddings.token_type_embeddings.weight"][type_ids]
        x = layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)
        heads = c["num_attention_heads"]
        head_dim = c["hidden_size"] // heads
        seq = len(ids)
        for i in range(c["num_hidden_layers"]):
            p = f"encoder.layer.{i}."

            def dense(h, name):
                return h @ w[p + name + ".weight"].T + w[p + name + ".bias"]

            q = dense(x, "attention.self.query").reshape(seq, heads, head_dim).transpose(1, 0, 2)
            k = dense(x, "attention.self.key").reshape(seq, heads, head_dim).transpose(1, 0, 2)
            v = dense(x, "attention.self.value").reshape(seq, heads, head_dim).transpose(1, 0, 2)
            scores = q @ k.transpose(0, 2, 1) / math.sqrt(head_dim)
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            probs = scores / scores.sum(axis=-1, keepdims=True)
            context = (probs @ v).transpose(1, 0, 2).reshape(seq, heads * head_dim)
            x = layer_norm(dense(context, "attention.output.dense") + x, w[p + "attention.output.LayerNorm.weight"], w[p + "attention.output.LayerNorm.bias"], eps)
            inner = gelu(dense(x, "intermediate.dense"))
            x = layer_norm(dense(inner, "output.dense") + x, w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"], eps)
        return x

    def embed(self, text):
        if self.lower:
            text = text.lower()
        enc = self.tokenizer.encode(text)
        hidden = self.encode(np.array(enc.ids), np.array(enc.type_ids))
        parts = []
        for mode in self.modes:
            if mode == "cls_token":
                parts.append(hidden[0])
            elif mode == "max_tokens":
                parts.append(hidden.max(axis=0))
            elif mode == "mean_tokens":
                parts.append(hidden.mean(axis=0))
            else:
                parts.append(hidden.sum(axis=0) / math.sqrt(len(hidden)))
        out = np.concatenate(parts)
        if self.normalize:
            out = out / max(np.linalg.norm(out), 1e-12)
        return out


def main():
    reference = Reference(sys.argv[1])
    sentences = json.load(sys.stdin)
    json.dump([reference.embed(s).tolist() for s in sentences], sys.stdout)


if __name__ == "__main__":
    main()
