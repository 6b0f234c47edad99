"""Regenerates runtimes/ort/src/warmup.onnx: the smallest model ONNX Runtime will run.

OrtRuntime builds one session from it at start-up, so ONNX Runtime's one-time allocations (kernel
registries, thread pool) happen before any real model's memory is measured.
"""
from pathlib import Path

import onnx
from onnx import TensorProto, helper

x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "warmup", [x], [y])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="densemesh")
model.ir_version = 8
onnx.checker.check_model(model)
out = Path(__file__).resolve().parent.parent / "src" / "warmup.onnx"
out.write_bytes(model.SerializeToString())
print(f"wrote {out} ({out.stat().st_size} bytes)")
