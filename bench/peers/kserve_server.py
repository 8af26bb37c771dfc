"""KServe peer: kernels.conv2d as a kserve.Model on KServe's Python model server, V2 (Open Inference) protocol.

Request: POST /v2/models/conv2d/infer with V2 inputs "input" (N, C_in, H, W), "weight"
(C_out, C_in/groups, kH, kW) and optionally "bias" (C_out,), all FP32, and the conv arguments as
request parameters ({"padding": 1, ...}). Tensors travel either as V2 JSON (flat "data" lists) or
with the V2 binary tensor extension (JSON header, then raw little-endian bytes; the header's length in
Inference-Header-Content-Length), with "binary_data_output": true to get the output back as bytes.

    .venv-peers/bin/python -m bench.peers.kserve_server --port 8102 --workers 1
"""

from __future__ import annotations

import argparse
import logging
import sys

import uvicorn

from bench.peers import common


def _loopback_only() -> None:
    """KServe 0.21 hard-codes host 0.0.0.0 in its uvicorn.Config; the benchmark keeps every socket on loopback."""
    from kserve.protocol.rest import server as rest_server

    class LoopbackConfig(uvicorn.Config):
        def __init__(self, *args, **kwargs) -> None:
            kwargs["host"] = "127.0.0.1"
            super().__init__(*args, **kwargs)

    rest_server.uvicorn.Config = LoopbackConfig  # the module's own `uvicorn` name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8102)
    parser.add_argument("--algorithm", default="im2col")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (KServe's --workers)")
    args, _ = parser.parse_known_args()
    # kserve parses sys.argv at import time; hand it only what it knows.
    sys.argv = [sys.argv[0]]

    import kserve
    from kserve import InferOutput, InferRequest, InferResponse

    _loopback_only()

    class ConvModel(kserve.Model):
        def __init__(self, name: str, algorithm: str, workers: int) -> None:
            super().__init__(name)
            self.algorithm = algorithm
            self.workers = workers
            self.load()

        def load(self) -> bool:
            common.set_threads(self.workers)
            self.ready = True
            return self.ready

        def predict(self, payload: InferRequest, headers: dict | None = None, response_headers: dict | None = None) -> InferResponse:
            import torch

            tensors = {tensor.name: torch.from_numpy(tensor.as_numpy()) for tensor in payload.inputs}
            params = dict(payload.parameters or {})
            output = common.conv(tensors["input"], tensors["weight"], tensors.get("bias"), params, self.algorithm)
            result = InferOutput(name="output", shape=list(output.shape), datatype="FP32")
            binary = payload.use_binary_outputs
            result.set_data_from_numpy(output.contiguous().numpy(), binary_data=binary)
            return InferResponse(response_id=payload.id or "", model_name=self.name, infer_outputs=[result], use_binary_outputs=binary)

    model = ConvModel("conv2d", args.algorithm, args.workers)
    server = kserve.ModelServer(http_port=args.port, workers=args.workers, enable_grpc=False, enable_latency_logging=False)
    # An access-log and a timing-log line per request are debugging aids, not serving costs to measure.
    for name in ("uvicorn.access", "kserve.trace"):
        logging.getLogger(name).setLevel(logging.WARNING)
    server.start([model])


if __name__ == "__main__":
    main()
