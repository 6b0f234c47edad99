"""Generates the tiny evaluator's reference cases: ONNX models and ONNX Runtime's outputs for them.

Usage: python make_models.py OUT_DIR COUNT SEED

Writes OUT_DIR/case-NNNN.onnx and OUT_DIR/case-NNNN.json ({"kind", "inputs", "outputs"}, each tensor
{"name", "dtype", "shape", "data"}), for COUNT generated models: about 70% tiny MLPs of random shapes,
weights, activations and layer forms (MatMul+Add, Gemm with and without C, transposed B, Softmax,
ArgMax, Flatten/Reshape/Squeeze/Unsqueeze/Concat/Cast, opsets 11, 13 and 17), and 30% scikit-learn
models converted by skl2onnx (LogisticRegression with int and string labels, binary and multiclass,
LinearRegression with one and several targets, DecisionTree and RandomForest classifiers and
regressors, StandardScaler and Normalizer pipelines). Then the project's examples/models, with
random inputs. Outputs come from onnxruntime's CPU provider, one thread.
"""

import json
import os
import shutil
import sys
import warnings

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

warnings.filterwarnings("ignore")

DTYPES = {
    np.dtype(np.float32): "FP32", np.dtype(np.float64): "FP64", np.dtype(np.int64): "INT64",
    np.dtype(np.int32): "INT32", np.dtype(np.int16): "INT16", np.dtype(np.int8): "INT8",
    np.dtype(np.uint8): "UINT8", np.dtype(np.uint16): "UINT16", np.dtype(np.uint32): "UINT32",
    np.dtype(np.uint64): "UINT64", np.dtype(np.float16): "FP16", np.dtype(np.bool_): "BOOL",
}


def tensor(name, array):
    array = np.asarray(array)
    if array.dtype.kind in "OUS":
        return {"name": name, "dtype": "BYTES", "shape": list(array.shape),
                "data": [str(x) for x in array.reshape(-1)]}
    dtype = DTYPES[array.dtype]
    if dtype == "FP16":
        data = [int(x) for x in array.reshape(-1).view(np.uint16)]
    elif dtype == "BOOL":
        data = [int(x) for x in array.reshape(-1)]
    else:
        data = array.reshape(-1).tolist()
    return {"name": name, "dtype": dtype, "shape": list(array.shape), "data": data}


def write(out, index, kind, model_bytes, feeds):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    results = session.run(names, feeds)
    with open(os.path.join(out, f"case-{index:04}.onnx"), "wb") as f:
        f.write(model_bytes)
    case = {"kind": kind, "inputs": [tensor(k, v) for k, v in feeds.items()],
            "outputs": [tensor(n, r) for n, r in zip(names, results)]}
    with open(os.path.join(out, f"case-{index:04}.json"), "w") as f:
        json.dump(case, f)


def mlp(rng):
    """A random tiny MLP and a feed for it."""
    opset = int(rng.choice([11, 13, 17]))
    batch = int(rng.integers(1, 5))
    widths = [int(w) for w in rng.integers(1, 33, size=int(rng.integers(2, 5)))]
    nodes, inits = [], []
    x = "x"
    current = x
    dynamic_batch = bool(rng.integers(0, 2))
    for i, (fan_in, fan_out) in enumerate(zip(widths, widths[1:])):
        w = (rng.normal(size=(fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32)
        b = (rng.normal(size=(fan_out,)) * 0.1).astype(np.float32)
        form = rng.choice(["matmul", "gemm", "gemm_noc", "gemm_t"])
        out = f"h{i}"
        if form == "matmul":
            inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
            nodes += [helper.make_node("MatMul", [current, f"w{i}"], [f"m{i}"]),
                      helper.make_node("Add", [f"m{i}", f"b{i}"], [out])]
        elif form == "gemm":
            inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
            nodes.append(helper.make_node("Gemm", [current, f"w{i}", f"b{i}"], [out],
                                          alpha=float(rng.uniform(0.5, 1.5)), beta=float(rng.uniform(0.5, 1.5))))
        elif form == "gemm_noc":
            inits.append(numpy_helper.from_array(w, f"w{i}"))
            nodes.append(helper.make_node("Gemm", [current, f"w{i}"], [out]))
        else:
            inits += [numpy_helper.from_array(np.ascontiguousarray(w.T), f"w{i}"),
                      numpy_helper.from_array(b.reshape(1, -1), f"b{i}")]
            nodes.append(helper.make_node("Gemm", [current, f"w{i}", f"b{i}"], [out], transB=1))
        current = out
        if i + 2 < len(widths):
            act = str(rng.choice(["Relu", "Sigmoid", "Tanh"]))
            nodes.append(helper.make_node(act, [current], [f"a{i}"]))
            current = f"a{i}"
    width = widths[-1]
    outputs = []
    tail = str(rng.choice(["plain", "softmax", "argmax", "reshape", "concat", "unsqueeze", "cast", "scale"]))
    if tail == "softmax":
        nodes.append(helper.make_node("Softmax", [current], ["y"], axis=1 if opset < 13 else -1))
        outputs.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, width]))
    elif tail == "argmax":
        nodes.append(helper.make_node("ArgMax", [current], ["y"], axis=1, keepdims=0))
        nodes.append(helper.make_node("Identity", [current], ["scores"]))
        outputs += [helper.make_tensor_value_info("y", TensorProto.INT64, [None]),
                    helper.make_tensor_value_info("scores", TensorProto.FLOAT, [None, width])]
    elif tail == "reshape":
        inits.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), "flat"))
        nodes.append(helper.make_node("Flatten", [current], ["f"], axis=1))
        nodes.append(helper.make_node("Reshape", ["f", "flat"], ["y"]))
        outputs.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, [None]))
    elif tail == "concat":
        nodes.append(helper.make_node("Sub", [current, "x_mean"], ["centred"]))
        inits.append(numpy_helper.from_array(np.array([0.25], dtype=np.float32), "x_mean"))
        nodes.append(helper.make_node("Concat", [current, "centred"], ["y"], axis=1))
        outputs.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2 * width]))
    elif tail == "unsqueeze":
        if opset < 13:
            nodes.append(helper.make_node("Unsqueeze", [current], ["u"], axes=[1]))
            nodes.append(helper.make_node("Squeeze", ["u"], ["y"], axes=[1]))
        else:
            inits.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "axes"))
            nodes.append(helper.make_node("Unsqueeze", [current, "axes"], ["u"]))
            nodes.append(helper.make_node("Squeeze", ["u", "axes"], ["y"]))
        outputs.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, width]))
    elif tail == "cast":
        nodes.append(helper.make_node("Cast", [current], ["d"], to=TensorProto.DOUBLE))
        nodes.append(helper.make_node("Mul", ["d", "d"], ["y"]))
        outputs.append(helper.make_tensor_value_info("y", TensorProto.DOUBLE, [None, width]))
    elif tail == "scale":
        inits.append(numpy_helper.from_array(rng.uniform(0.5, 2, size=(width,)).astype(np.float32), "div"))
        nodes.append(helper.make_node("Div", [current, "div"], ["y"]))
        outputs.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, width]))
    else:
        nodes.append(helper.make_node("Identity", [current], ["y"]))
        outputs.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, width]))
    inputs = [helper.make_tensor_value_info(x, TensorProto.FLOAT, [None if dynamic_batch else batch, widths[0]])]
    graph = helper.make_graph(nodes, "mlp", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    onnx.checker.check_model(model)
    feed = {x: rng.normal(size=(batch, widths[0])).astype(np.float32)}
    return f"mlp/{tail}/opset{opset}", model.SerializeToString(), feed


def sklearn_model(rng):
    from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor
    from sklearn.linear_model import LinearRegression, LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import Normalizer, StandardScaler
    from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor
    from skl2onnx import to_onnx

    features = int(rng.integers(2, 9))
    X = (rng.normal(size=(60, features)) * rng.uniform(0.5, 3)).astype(np.float32)
    classes = int(rng.integers(2, 5))
    y_class = np.argmax(X[:, :min(classes, features)] + rng.normal(size=(60, min(classes, features))) * 0.5, axis=1) % classes
    y_class[:classes] = np.arange(classes)  # every class present
    y_reg = X @ rng.normal(size=features) + rng.normal(size=60) * 0.1
    kind = str(rng.choice(["logreg", "logreg_str", "linreg", "linreg_multi", "dtc", "dtr", "rfc", "rfr",
                           "scaler_logreg", "normalizer_linreg", "scaler_rfr"]))
    depth = int(rng.integers(1, 6))
    trees = int(rng.integers(1, 8))
    if kind == "logreg":
        model, y = LogisticRegression(max_iter=500), y_class
    elif kind == "logreg_str":
        model, y = LogisticRegression(max_iter=500), np.array(["cat", "dog", "eel", "fox"])[y_class]
    elif kind == "linreg":
        model, y = LinearRegression(), y_reg
    elif kind == "linreg_multi":
        model, y = LinearRegression(), np.stack([y_reg, -2 * y_reg + 1], axis=1)
    elif kind == "dtc":
        model, y = DecisionTreeClassifier(max_depth=depth, random_state=int(rng.integers(1 << 30))), y_class
    elif kind == "dtr":
        model, y = DecisionTreeRegressor(max_depth=depth, random_state=int(rng.integers(1 << 30))), y_reg
    elif kind == "rfc":
        model, y = RandomForestClassifier(n_estimators=trees, max_depth=depth, random_state=int(rng.integers(1 << 30))), y_class
    elif kind == "rfr":
        model, y = RandomForestRegressor(n_estimators=trees, max_depth=depth, random_state=int(rng.integers(1 << 30))), y_reg
    elif kind == "scaler_logreg":
        model, y = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)), y_class
    elif kind == "normalizer_linreg":
        model, y = make_pipeline(Normalizer(norm=str(rng.choice(["l1", "l2", "max"]))), LinearRegression()), y_reg
    else:
        model, y = make_pipeline(StandardScaler(), RandomForestRegressor(n_estimators=trees, max_depth=depth)), y_reg
    model.fit(X, y)
    options = {"zipmap": False} if hasattr(model, "predict_proba") else None
    onx = to_onnx(model, X[:1], options=options, target_opset={"": 17, "ai.onnx.ml": 3})
    feed = {onx.graph.input[0].name: rng.normal(size=(int(rng.integers(1, 6)), features)).astype(np.float32)}
    return f"sklearn/{kind}", onx.SerializeToString(), feed


def example_feeds(model_bytes, rng):
    """Random inputs for one of examples/models, from its declared inputs."""
    model = onnx.load_from_string(model_bytes)
    feeds = {}
    for info in model.graph.input:
        t = info.type.tensor_type
        shape = [d.dim_value if d.dim_value > 0 else 2 for d in t.shape.dim]
        np_type = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
        if t.elem_type == TensorProto.STRING:
            feeds[info.name] = np.array(["a", "bc", "d"][: max(1, int(np.prod(shape)))] * 1, dtype=object).reshape(-1)[: int(np.prod(shape))].reshape(shape)
        elif np_type == np.bool_:
            feeds[info.name] = rng.integers(0, 2, size=shape).astype(np.bool_)
        elif np.issubdtype(np_type, np.integer):
            feeds[info.name] = rng.integers(0, 100, size=shape).astype(np_type)
        else:
            feeds[info.name] = rng.normal(size=shape).astype(np_type)
    return feeds


def main():
    out, count, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rng = np.random.default_rng(seed)
    os.makedirs(out, exist_ok=True)
    index = 0
    for i in range(count):
        kind, model_bytes, feed = mlp(rng) if rng.random() < 0.7 else sklearn_model(rng)
        write(out, index, kind, model_bytes, feed)
        index += 1
    examples = os.path.join(os.path.dirname(__file__), "..", "..", "..", "examples", "models")
    for name in sorted(os.listdir(examples)):
        path = os.path.join(examples, name, "model.onnx")
        with open(path, "rb") as f:
            model_bytes = f.read()
        write(out, index, f"example/{name}", model_bytes, example_feeds(model_bytes, rng))
        index += 1


if __name__ == "__main__":
    main()
