"""all-MiniLM-L6-v2 as an ONNX graph built without torch, for comparing densemesh's candle runtime with
ONNX Runtime on the same weights.

The graph is written node by node with `onnx.helper` from the safetensors file (read with numpy, as the
candle tests' reference does): BERT's embeddings, 6 encoder layers (exact erf GELU, additive attention
mask), then sentence-transformers' pooling (mean over the attention mask) and L2 normalization, so the
graph's one output is the sentence embedding. Inputs are `input_ids`, `attention_mask` and
`token_type_ids`, INT64 `[batch, seq]`, as Hugging Face's tokenizers produce them.

    .venv/bin/python bench/minilm_onnx.py export OUT.onnx     # writes it, then checks it (below)
    .venv/bin/python bench/minilm_onnx.py check OUT.onnx

`check` runs ONNX Runtime on varied sentences (empty, long, non-ASCII), all in one padded batch, against
the numpy BERT of runtimes/candle/tests/reference_bert.py, each sentence alone in float64: the cosine
must be at least 0.9999 for every one.
"""
import json
import math
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
MINILM = REPO / ".models" / "all-minilm-l6-v2"
sys.path.insert(0, str(REPO / "runtimes" / "candle" / "tests"))

from reference_bert import Reference, read_json, read_safetensors  # noqa: E402

OPSET = 17  # LayerNormalization


class Graph:
    """Nodes, initializers and fresh names."""

    def __init__(self):
        self.nodes, self.inits, self.count = [], [], 0

    def name(self, hint):
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, hint, array):
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, op_type, inputs, hint=None, **attrs):
        out = self.name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], **attrs))
        return out


def export(model_dir, out_path):
    config = read_json(model_dir / "config.json")
    w = {k.removeprefix("bert."): v.astype(np.float32) for k, v in read_safetensors(model_dir / "model.safetensors").items()}
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim, eps = hidden // heads, config["layer_norm_eps"]
    assert config.get("hidden_act", "gelu") == "gelu", "the graph has BERT's exact GELU only"
    g = Graph()

    def dense(x, prefix):
        # torch's Linear stores [out, in]; MatMul wants [in, out].
        return g.op("Add", [g.op("MatMul", [x, g.const(prefix + ".w", w[prefix + ".weight"].T.copy())]),
                            g.const(prefix + ".b", w[prefix + ".bias"])])

    def layer_norm(x, prefix):
        return g.op("LayerNormalization", [x, g.const(prefix + ".g", w[prefix + ".weight"]),
                                           g.const(prefix + ".b", w[prefix + ".bias"])], axis=-1, epsilon=eps)

    # Embeddings: word + position (0..seq) + token type, then LayerNorm.
    seq = g.op("Gather", [g.op("Shape", ["input_ids"]), g.const("one", np.array(1, dtype=np.int64))], axis=0)
    positions = g.op("Range", [g.const("zero", np.array(0, dtype=np.int64)), seq, g.const("step", np.array(1, dtype=np.int64))])
    x = g.op("Add", [
        g.op("Add", [g.op("Gather", [g.const("word", w["embeddings.word_embeddings.weight"]), "input_ids"]),
                     g.op("Gather", [g.const("pos", w["embeddings.position_embeddings.weight"]), positions])]),
        g.op("Gather", [g.const("type", w["embeddings.token_type_embeddings.weight"]), "token_type_ids"]),
    ])
    x = layer_norm(x, "embeddings.LayerNorm")

    # The mask as float [batch, seq], and as an additive attention bias [batch, 1, 1, seq].
    mask = g.op("Cast", ["attention_mask"], to=TensorProto.FLOAT)
    bias = g.op("Mul", [g.op("Sub", [g.const("1", np.array(1.0, dtype=np.float32)), mask]),
                        g.const("neg", np.array(-1e9, dtype=np.float32))])
    bias = g.op("Unsqueeze", [bias, g.const("axes12", np.array([1, 2], dtype=np.int64))])
    split_heads = g.const("split", np.array([0, 0, heads, head_dim], dtype=np.int64))
    merge_heads = g.const("merge", np.array([0, 0, hidden], dtype=np.int64))
    scale = g.const("scale", np.array(1.0 / math.sqrt(head_dim), dtype=np.float32))
    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        q = g.op("Transpose", [g.op("Reshape", [dense(x, p + "attention.self.query"), split_heads])], perm=[0, 2, 1, 3])
        k = g.op("Transpose", [g.op("Reshape", [dense(x, p + "attention.self.key"), split_heads])], perm=[0, 2, 3, 1])
        v = g.op("Transpose", [g.op("Reshape", [dense(x, p + "attention.self.value"), split_heads])], perm=[0, 2, 1, 3])
        scores = g.op("Add", [g.op("Mul", [g.op("MatMul", [q, k]), scale]), bias])
        context = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])
        context = g.op("Reshape", [g.op("Transpose", [context], perm=[0, 2, 1, 3]), merge_heads])
        x = layer_norm(g.op("Add", [dense(context, p + "attention.output.dense"), x]), p + "attention.output.LayerNorm")
        inner = dense(x, p + "intermediate.dense")
        # Exact GELU: x * 0.5 * (1 + erf(x / sqrt 2)).
        erf = g.op("Erf", [g.op("Div", [inner, g.const("sqrt2", np.array(math.sqrt(2.0), dtype=np.float32))])])
        inner = g.op("Mul", [g.op("Mul", [inner, g.const("half", np.array(0.5, dtype=np.float32))]),
                             g.op("Add", [erf, g.const("1", np.array(1.0, dtype=np.float32))])])
        x = layer_norm(g.op("Add", [dense(inner, p + "output.dense"), x]), p + "output.LayerNorm")

    # Mean over the tokens the mask keeps, then L2 normalization (modules.json's Pooling, Normalize).
    modules = read_json(model_dir / "modules.json", [])
    pooling_dir = next(m["path"] for m in modules if m["type"].endswith(".Pooling"))
    pooling = read_json(model_dir / pooling_dir / "config.json")
    assert pooling.get("pooling_mode_mean_tokens") and not any(
        pooling.get(f"pooling_mode_{m}") for m in ("cls_token", "max_tokens", "mean_sqrt_len_tokens")
    ), "the graph pools by mean only"
    axis1 = g.const("axis1", np.array([1], dtype=np.int64))
    mask3 = g.op("Unsqueeze", [mask, g.const("axis2", np.array([2], dtype=np.int64))])
    summed = g.op("ReduceSum", [g.op("Mul", [x, mask3]), axis1], keepdims=0)
    counted = g.op("Max", [g.op("ReduceSum", [mask3, axis1], keepdims=0), g.const("tiny", np.array(1e-9, dtype=np.float32))])
    pooled = g.op("Div", [summed, counted])
    if any(m["type"].endswith(".Normalize") for m in modules):
        norm = g.op("Max", [g.op("ReduceL2", [pooled], axes=[-1], keepdims=1),
                            g.const("eps", np.array(1e-12, dtype=np.float32))])
        pooled = g.op("Div", [pooled, norm])
    g.nodes.append(helper.make_node("Identity", [pooled], ["embedding"]))

    ids = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"])
           for n in ("input_ids", "attention_mask", "token_type_ids")]
    out = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", hidden])
    graph = helper.make_graph(g.nodes, "all-MiniLM-L6-v2", ids, [out], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="densemesh-bench")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(out_path))


def tokenizer(model_dir, max_len):
    """The model's tokenizer padding to the longest in a batch (the file pads to 128 always)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    tok.enable_truncation(max_length=max_len)
    return tok


def feeds(tok, sentences):
    encoded = tok.encode_batch(sentences)
    return {
        "input_ids": np.array([e.ids for e in encoded], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encoded], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encoded], dtype=np.int64),
    }


SENTENCES = [
    "", " ", "a", "Hello, world!", "The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium.",
    "Café naïve résumé: déjà vu à la carte.", "I love pizza 🍕🍕🔥 and 🎉 parties", "我喜欢吃苹果。", "Привет, как дела?",
    "مرحبا بالعالم", "tabs\tand\nnewlines\r\nmixed", "fn main() { println!(\"hello\"); }", "3.14159 2.71828 1,000,000 42%",
    "supercalifragilisticexpialidocious antidisestablishmentarianism", "word " * 40,
    "The committee reviewed the quarterly report and approved the budget for next year's infrastructure programme. " * 20,
    "漢字" * 300,
]


def check(onnx_path, model_dir=MINILM):
    import onnxruntime as ort

    reference = Reference(str(model_dir))
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    tok = tokenizer(model_dir, reference.max_len)
    got = session.run(["embedding"], feeds(tok, SENTENCES))[0]
    worst = 1.0
    for sentence, vector in zip(SENTENCES, got):
        expected = reference.embed(sentence)
        cosine = float(vector @ expected / (np.linalg.norm(vector) * np.linalg.norm(expected)))
        assert cosine >= 0.9999, f"cosine {cosine} for {sentence[:40]!r}"
        worst = min(worst, cosine)
    similarity = got[4:7] @ got[4:7].T
    # sentence-transformers' published figures for the quickstart sentences.
    assert abs(similarity[0, 1] - 0.6660) < 1e-3 and abs(similarity[0, 2] - 0.1046) < 1e-3, similarity
    print(json.dumps({"sentences": len(SENTENCES), "worst_cosine": worst, "quickstart": [
        round(float(similarity[0, 1]), 4), round(float(similarity[0, 2]), 4), round(float(similarity[1, 2]), 4)]}))


def main():
    command, path = sys.argv[1], Path(sys.argv[2])
    if command == "export":
        export(MINILM, path)
    elif command != "check":
        sys.exit(f"unknown command {command!r}: export or check")
    check(path)


if __name__ == "__main__":
    main()
