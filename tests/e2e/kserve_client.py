"""Runs iris-logreg through kserve's own gRPC client; used by test_predict in a separate interpreter.

kserve registers the `inference.*` protobuf messages under their own descriptors, which clash with
tritonclient's in one process, and it pins protobuf<7, which grpcio-reflection>=1.85 refuses; so the test
runs this file with $KSERVE_PYTHON (default: the same python) and reads JSON from its stdout.

    python kserve_client.py GRPC_ADDR  ->  {"ready": true, "answers": [{"id": ..., "outputs": {...}}, ...]}
Exit code 3 when kserve is not installed.
"""
import asyncio
import json
import sys

import numpy as np

try:
    import kserve
except ImportError as e:
    print(f"kserve is not installed: {e}", file=sys.stderr)
    sys.exit(3)

X = np.random.default_rng(5).normal(5, 2, size=(3, 4)).astype(np.float32)


async def main(addr):
    client = kserve.InferenceGRPCClient(addr, retries=0)
    try:
        ready = await client.is_server_ready()
        raw = kserve.InferInput("input", list(X.shape), "FP32")
        raw.set_data_from_numpy(X)  # raw_input_contents
        typed = kserve.InferInput("input", list(X.shape), "FP32", data=X.reshape(-1).tolist())  # contents
        answers = []
        for tensor in (raw, typed):
            # model_name is bogus on purpose: the mm-model-id header picks the model.
            request = kserve.InferRequest(model_name="no-such-model", infer_inputs=[tensor], request_id="k1")
            response = await client.infer(request, headers=[("mm-model-id", "iris-logreg")])
            answers.append({
                "id": response.id,
                "outputs": {
                    o.name: {"datatype": o.datatype, "shape": list(o.shape), "data": o.as_numpy().reshape(-1).tolist()}
                    for o in response.outputs
                },
            })
        return {"ready": ready, "answers": answers}
    finally:
        await client.close()


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1]))))
