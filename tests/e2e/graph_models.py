"""Small ONNX models for the inference-graph tests and bench: a scaling step, a linear classifier and an
argmax, written with the `onnx` package so each test builds its own repository."""
import sys

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from meshd import REPO

sys.path.insert(0, str(REPO / "examples"))
from generate_models import IR_VERSION, OPSET  # noqa: E402

FEATURES, CLASSES = 4, 3
# The classifier's weights: fixed, so a test can compute the answer with numpy.
WEIGHTS = np.random.default_rng(7).normal(size=(FEATURES, CLASSES)).astype(np.float32)
BIAS = np.array([0.1, -0.2, 0.05], dtype=np.float32)


def _save(graph, path):
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="densemesh-test")
    model.ir_version = IR_VERSION
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())


def scale_model(path, factor, offset):
    """x FP32 [-1, 4] -> scaled = x * factor + offset."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "factor"], ["m"]), helper.make_node("Add", ["m", "offset"], ["scaled"])],
        "scale",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, FEATURES])],
        [helper.make_tensor_value_info("scaled", TensorProto.FLOAT, [None, FEATURES])],
        [numpy_helper.from_array(np.array(factor, dtype=np.float32), "factor"),
         numpy_helper.from_array(np.array(offset, dtype=np.float32), "offset")],
    )
    _save(graph, path)


def classify_model(path):
    """input FP32 [-1, 4] -> logits FP32 [-1, 3] = input @ WEIGHTS + BIAS."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["logits"])],
        "classify",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, FEATURES])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, CLASSES])],
        [numpy_helper.from_array(WEIGHTS, "w"), numpy_helper.from_array(BIAS, "b")],
    )
    _save(graph, path)


def argmax_model(path):
    """logits FP32 [-1, 3] -> class INT64 [-1, 1]."""
    graph = helper.make_graph(
        [helper.make_node("ArgMax", ["logits"], ["class"], axis=1, keepdims=1)],
        "argmax",
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, CLASSES])],
        [helper.make_tensor_value_info("class", TensorProto.INT64, [None, 1])],
    )
    _save(graph, path)


def write_repository(repo):
    """scale (x*2+1), triple (x*3), classify, argmax, and broken (not a model: it fails to load)."""
    scale_model(repo / "scale" / "model.onnx", 2.0, 1.0)
    scale_model(repo / "triple" / "model.onnx", 3.0, 0.0)
    classify_model(repo / "classify" / "model.onnx")
    argmax_model(repo / "argmax" / "model.onnx")
    (repo / "broken").mkdir(parents=True, exist_ok=True)
    (repo / "broken" / "model.onnx").write_bytes(b"this is not an onnx model")
    return repo


def by_hand(x):
    """What the three-step sequence answers, computed with numpy."""
    return np.argmax((x * 2 + 1) @ WEIGHTS + BIAS, axis=1).reshape(-1, 1).astype(np.int64)


# The three-step sequence: scale -> classify (its input named from scale's output) -> argmax.
CHAIN = {"nodes": {"root": {"routerType": "Sequence", "steps": [
    {"name": "scale", "serviceName": "scale", "dependency": "Hard"},
    {"name": "classify", "serviceName": "classify", "data": "$response", "inputMap": {"input": "scaled"},
     "dependency": "Hard"},
    {"name": "argmax", "serviceName": "argmax", "data": "$response", "dependency": "Hard"},
]}}}
