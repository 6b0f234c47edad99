"""Regenerates the example models in examples/models (and the scikit-learn original for MLServer).

Deterministic: fixed seeds, so re-running rewrites identical files. Also importable, and usable from the
command line, to write bigger "dense" models for tests and benchmarks that are not committed:

    python3 examples/generate_models.py                      # examples/models + examples/sklearn
    python3 examples/generate_models.py --dense DIR --count 6 --mb 4
"""
import argparse
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
OPSET = 17
IR_VERSION = 8


def _save(model: onnx.ModelProto, path: Path) -> None:
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())


def _model(graph) -> onnx.ModelProto:
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="densemesh")


def iris_logreg(models: Path, sklearn_dir: Path) -> None:
    """scikit-learn LogisticRegression on iris, converted with skl2onnx; the original kept for MLServer."""
    import joblib
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    x, y = load_iris(return_X_y=True)
    clf = LogisticRegression(max_iter=500, random_state=0).fit(x.astype(np.float32), y)
    onx = to_onnx(
        clf,
        initial_types=[("input", FloatTensorType([None, 4]))],
        options={id(clf): {"zipmap": False}},
        target_opset={"": OPSET, "ai.onnx.ml": 3},
    )
    onx.ir_version = IR_VERSION
    path = models / "iris-logreg" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(onx.SerializeToString())

    out = sklearn_dir / "iris-logreg"
    out.mkdir(parents=True, exist_ok=True)
    joblib.dump(clf, out / "model.joblib")
    settings = {
        "name": "iris-logreg",
        "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"uri": "./model.joblib"},
        # Declared so V2 ModelMetadata describes the input, as meshd does from the ONNX file.
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}],
    }
    (out / "model-settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    (sklearn_dir / "settings.json").write_text(json.dumps({"parallel_workers": 0}, indent=2) + "\n")


def mlp_regressor(models: Path) -> None:
    """scikit-learn MLPRegressor (8 inputs, hidden 32 and 16) on synthetic data."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.neural_network import MLPRegressor

    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 8)).astype(np.float32)
    y = (x @ rng.normal(size=8) + np.sin(x[:, 0])).astype(np.float32)
    reg = MLPRegressor(hidden_layer_sizes=(32, 16), max_iter=300, random_state=0).fit(x, y)
    onx = to_onnx(reg, initial_types=[("input", FloatTensorType([None, 8]))], target_opset=OPSET)
    onx.ir_version = IR_VERSION
    path = models / "mlp-regressor" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(onx.SerializeToString())


def multi_input(models: Path) -> None:
    """Several inputs and int64/bool tensors: masked sums, a scaled cast and a reduction over a mask."""
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [None, 4])
    mask = helper.make_tensor_value_info("mask", TensorProto.BOOL, [None, 4])
    scale = helper.make_tensor_value_info("scale", TensorProto.FLOAT, [1])
    masked_sum = helper.make_tensor_value_info("masked_sum", TensorProto.INT64, [None])
    scaled = helper.make_tensor_value_info("scaled", TensorProto.FLOAT, [None, 4])
    any_masked = helper.make_tensor_value_info("any_masked", TensorProto.BOOL, [None])
    axes = numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")
    zero = numpy_helper.from_array(np.array(0, dtype=np.int64), "zero")
    nodes = [
        helper.make_node("Where", ["mask", "ids", "zero"], ["kept"]),
        helper.make_node("ReduceSum", ["kept", "axes"], ["masked_sum"], keepdims=0),
        helper.make_node("Cast", ["ids"], ["ids_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["ids_f", "scale"], ["scaled"]),
        helper.make_node("Cast", ["mask"], ["mask_i"], to=TensorProto.INT64),
        helper.make_node("ReduceMax", ["mask_i"], ["max_i"], axes=[1], keepdims=0),
        helper.make_node("Cast", ["max_i"], ["any_masked"], to=TensorProto.BOOL),
    ]
    graph = helper.make_graph(nodes, "multi_input", [ids, mask, scale], [masked_sum, scaled, any_masked], [axes, zero])
    _save(_model(graph), models / "multi-input" / "model.onnx")


DTYPES = {
    "bool": TensorProto.BOOL,
    "uint8": TensorProto.UINT8,
    "uint16": TensorProto.UINT16,
    "uint32": TensorProto.UINT32,
    "uint64": TensorProto.UINT64,
    "int8": TensorProto.INT8,
    "int16": TensorProto.INT16,
    "int32": TensorProto.INT32,
    "int64": TensorProto.INT64,
    "fp16": TensorProto.FLOAT16,
    "fp32": TensorProto.FLOAT,
    "fp64": TensorProto.DOUBLE,
    "string": TensorProto.STRING,
}


def dtypes(models: Path) -> None:
    """One Identity per V2 datatype ONNX has: in_<t> -> out_<t>, each 1-D of any length."""
    inputs, outputs, nodes = [], [], []
    for name, ty in DTYPES.items():
        inputs.append(helper.make_tensor_value_info(f"in_{name}", ty, [None]))
        outputs.append(helper.make_tensor_value_info(f"out_{name}", ty, [None]))
        nodes.append(helper.make_node("Identity", [f"in_{name}"], [f"out_{name}"]))
    _save(_model(helper.make_graph(nodes, "dtypes", inputs, outputs)), models / "dtypes" / "model.onnx")


def make_dense_model(
    path: Path, mb: float = 4.0, seed: int = 0, *, hidden: int = 256, layers: int | None = None, out: int = 16
) -> None:
    """A float32 MLP: x FP32 [-1, hidden] -> `layers` x (MatMul hidden x hidden, Tanh) -> y FP32 [-1, out].

    `layers` defaults to as many as make the weights about `mb` MiB (at least one), so
    `make_dense_model(p, 100)` writes a ~100 MiB model. Same arguments, same bytes.
    """
    rng = np.random.default_rng(seed)
    width = hidden
    if layers is None:
        layers = max(1, int(mb * (1 << 20) / 4) // (width * width))
    inits, nodes = [], []
    prev = "x"
    for i in range(layers):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"]))
        nodes.append(helper.make_node("Tanh", [f"h{i}"], [f"a{i}"]))
        prev = f"a{i}"
    head = (rng.standard_normal((width, out)) / np.sqrt(width)).astype(np.float32)
    inits.append(numpy_helper.from_array(head, "head"))
    nodes.append(helper.make_node("MatMul", [prev, "head"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "dense",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, out])],
        inits,
    )
    _save(_model(graph), path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dense", type=Path, help="write dense-<i>/model.onnx models here instead")
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--mb", type=float, default=4.0, help="weights per dense model, in MiB")
    parser.add_argument("--hidden", type=int, default=256, help="width of the dense models' input and layers")
    args = parser.parse_args()
    if args.dense:
        for i in range(args.count):
            make_dense_model(args.dense / f"dense-{i}" / "model.onnx", args.mb, seed=i, hidden=args.hidden)
        return
    models = HERE / "models"
    iris_logreg(models, HERE / "sklearn")
    mlp_regressor(models)
    multi_input(models)
    dtypes(models)
    for p in sorted(models.glob("*/model.onnx")):
        print(f"{p.relative_to(HERE)}: {p.stat().st_size} bytes")


if __name__ == "__main__":
    main()
