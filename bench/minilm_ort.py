"""all-MiniLM-L6-v2 embeddings: densemesh (candle, over gRPC) against ONNX Runtime on the same weights.

    .venv/bin/python bench/minilm_ort.py                      # release meshd, ~3 minutes
    .venv/bin/python bench/minilm_ort.py --bin-dir /tmp/bin --requests 100

Three paths, each fed the same sentence (batch 1) or 32 copies of it (batch 32), one client, one request
at a time, in alternating rounds so that drift on a shared machine hits all alike:
1. `meshd_candle`: meshd serving the safetensors model (format `huggingface`, candle) over gRPC, the text
   sent as a V2 BYTES tensor; meshd tokenizes.
2. `ort_in_process`: onnxruntime-python in this process on the ONNX export of the same weights
   (bench/minilm_onnx.py, checked against the numpy BERT reference before it is used), tokenized here
   with the model's tokenizer (`tokenizers`), the tokenization inside the timing.
3. `meshd_ort`: the same ONNX file served by meshd's ONNX Runtime over gRPC, with token-id inputs
   (INT64 input_ids, attention_mask, token_type_ids) tokenized here, the tokenization inside the timing.

Needs target/release/meshd (cargo build --release -p densemesh-mesh --bins), the .venv of scripts/setup.sh
and .models/all-minilm-l6-v2.
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "e2e"))
sys.path.insert(0, str(REPO / "bench"))

from meshd import Meshd  # noqa: E402
from minilm_onnx import MINILM, check, export, feeds, tokenizer  # noqa: E402
from runtimes import embed_request, summary  # noqa: E402
from tritonclient.grpc import service_pb2  # noqa: E402

SENTENCE = "A man is playing a guitar on a quiet street corner in the evening."


def ids_request(tok, sentences):
    """A V2 request of token ids, as a client of a plain ONNX embedding model sends it."""
    request = service_pb2.ModelInferRequest(model_name="minilm-onnx")
    for name, array in feeds(tok, sentences).items():
        request.inputs.add(name=name, datatype="INT64", shape=list(array.shape))
        request.raw_input_contents.append(array.tobytes())
    return request


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bin-dir", default=str(REPO / "target" / "release"))
    parser.add_argument("--requests", type=int, default=200, help="timed batch-1 requests per path")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0,
                        help="ONNX Runtime intra-op threads, in process and in meshd (--ort-threads); 0: one per core")
    args = parser.parse_args()
    import onnxruntime as ort

    os.environ["MESHD_BIN"] = str(Path(args.bin_dir) / "meshd")
    with tempfile.TemporaryDirectory(prefix="bench-minilm-ort-") as work:
        work = Path(work)
        repo = work / "repo"
        (repo / "minilm-onnx").mkdir(parents=True)
        onnx_path = repo / "minilm-onnx" / "model.onnx"
        export(MINILM, onnx_path)
        check(onnx_path)
        (repo / "minilm").symlink_to(MINILM, target_is_directory=True)

        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        tok = tokenizer(MINILM, 256)
        server = Meshd(repo, "--local-model-roots", f"{repo},{MINILM}", "--ort-threads", str(args.threads))
        try:
            results = {"threads": args.threads, "cores": os.cpu_count(), "load_before": os.getloadavg()}
            for batch in (1, 32):
                sentences = [SENTENCE] * batch
                text_request = embed_request([s.encode() for s in sentences])
                paths = {
                    "meshd_candle": lambda: server.stub.ModelInfer(text_request, timeout=120),
                    "ort_in_process": lambda: session.run(["embedding"], feeds(tok, sentences)),
                    "meshd_ort": lambda: server.stub.ModelInfer(ids_request(tok, sentences), timeout=120),
                }
                # The same embedding from each (and each model loaded before the timing).
                candle = np.frombuffer(paths["meshd_candle"]().raw_output_contents[0], dtype=np.float32)
                local = paths["ort_in_process"]()[0].reshape(-1)
                remote = np.frombuffer(paths["meshd_ort"]().raw_output_contents[0], dtype=np.float32)
                assert np.allclose(candle, local, atol=1e-4) and np.allclose(remote, local, atol=1e-5)
                n = max(10, args.requests // (8 if batch > 1 else 1))
                per_round = max(1, n // args.rounds)
                latencies = {name: [] for name in paths}
                for _ in range(args.rounds):
                    for name, call in paths.items():
                        for _ in range(per_round):
                            started = time.perf_counter_ns()
                            call()
                            latencies[name].append((time.perf_counter_ns() - started) / 1000)
                for name, values in latencies.items():
                    results[f"batch{batch}_{name}"] = summary(values)
            results["load_after"] = os.getloadavg()
        finally:
            server.stop()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
