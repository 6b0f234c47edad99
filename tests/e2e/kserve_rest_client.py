"""Runs iris-logreg through kserve's own REST client (V2 protocol); used by test_rest in a separate
interpreter, for the reasons kserve_client.py gives.

    python kserve_rest_client.py HTTP_ADDR  ->  {"live": .., "ready": .., "model_ready": .., "answers": [...], "error": {...}}
Exit code 3 when kserve is not installed.
"""
import asyncio
import json
import sys

import numpy as np

try:
    import httpx
    import kserve
    from kserve.protocol.infer_type import RequestedOutput
except ImportError as e:
    print(f"kserve is not installed: {e}", file=sys.stderr)
    sys.exit(3)

X = np.random.default_rng(5).normal(5, 2, size=(3, 4)).astype(np.float32)


def outputs_of(response):
    return {
        o.name: {"datatype": o.datatype, "shape": list(o.shape), "data": o.as_numpy().reshape(-1).tolist()}
        for o in response.outputs
    }


async def main(addr):
    base = f"http://{addr}"
    client = kserve.InferenceRESTClient(kserve.RESTConfig(protocol="v2", retries=0, timeout=60))
    try:
        result = {
            "live": await client.is_server_live(base),
            "ready": await client.is_server_ready(base),
            "model_ready": await client.is_model_ready(base, "iris-logreg"),
            "answers": [],
        }
        binary = kserve.InferInput("input", list(X.shape), "FP32")
        binary.set_data_from_numpy(X, binary_data=True)  # after the JSON, binary_data_size
        as_json = kserve.InferInput("input", list(X.shape), "FP32")
        as_json.set_data_from_numpy(X, binary_data=False)  # JSON "data"
        for tensor, outputs in ((binary, [RequestedOutput("label", {"binary_data": True}),
                                          RequestedOutput("probabilities", {"binary_data": True})]),
                                (as_json, None)):
            # The path names no model that exists: the mm-model-id header picks it, as over gRPC.
            request = kserve.InferRequest(model_name="no-such-model", infer_inputs=[tensor], request_id="k1",
                                          request_outputs=outputs)
            response = await client.infer(base, request, model_name="no-such-model",
                                          headers={"mm-model-id": "iris-logreg"})
            result["answers"].append({"id": response.id, "outputs": outputs_of(response)})
        try:
            bad = kserve.InferInput("input", [1, 3], "FP32", data=[1.0, 2.0, 3.0])
            await client.infer(base, kserve.InferRequest(model_name="iris-logreg", infer_inputs=[bad]),
                               model_name="iris-logreg")
            result["error"] = None
        except httpx.HTTPStatusError as e:
            result["error"] = {"status": e.response.status_code, "message": str(e)}
        return result
    finally:
        await client.close()


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1]))))
