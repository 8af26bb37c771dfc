"""LitServe peer: kernels.conv2d behind a LitAPI, the way LitServe's docs serve a model.

Request (POST /predict), JSON:
    {"input": T, "weight": T, "bias": T | null, "stride": 1, "padding": 1, ...}
where T is nested lists, or {"shape": [...], "b64": "<little-endian float32 bytes>"}
(LitServe's documented way to move binary data, e.g. images, is base64 inside the JSON body).
Response: {"output": T} in the request's encoding, serialised with orjson into a Response, which
LitServe passes through as is (its docs return Response objects from encode_response for binary
outputs); that avoids FastAPI's slow jsonable_encoder on large lists.

    .venv-peers/bin/python -m bench.peers.litserve_server --port 8101 --workers-per-device 1
"""

from __future__ import annotations

import argparse

import litserve as ls
import orjson
from fastapi import Response

from bench.peers import common


class ConvAPI(ls.LitAPI):
    def __init__(self, algorithm: str, workers: int) -> None:
        super().__init__()
        self.algorithm = algorithm
        self.workers = workers

    def setup(self, device: str) -> None:
        common.set_threads(self.workers)
        # Imported per worker process so each has its registry; warms up the allocator and kernels.
        import torch

        self.conv = common.conv
        self.conv(torch.zeros(1, 1, 3, 3), torch.zeros(1, 1, 3, 3), None, {"padding": 1}, self.algorithm)

    def decode_request(self, request) -> tuple:
        as_b64 = isinstance(request["input"], dict)
        tensors = []
        for name in ("input", "weight", "bias"):
            value = request.get(name)
            if value is None:
                tensors.append(None)
            elif isinstance(value, dict):
                tensors.append(common.tensor_from_b64(value["shape"], value["b64"]))
            else:
                tensors.append(common.tensor_from_lists(value))
        params = {name: request[name] for name in common.CONV_ARGS if name in request}
        return (*tensors, params, as_b64)

    def predict(self, x: tuple) -> tuple:
        input, weight, bias, params, as_b64 = x
        return self.conv(input, weight, bias, params, self.algorithm), as_b64

    def encode_response(self, output: tuple) -> Response:
        tensor, as_b64 = output
        if as_b64:
            body = {"output": {"shape": list(tensor.shape), "b64": common.tensor_to_b64(tensor)}}
        else:
            body = {"output": tensor.contiguous().numpy()}
        return Response(content=orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8101)
    parser.add_argument("--algorithm", default="im2col")
    parser.add_argument("--workers-per-device", type=int, default=1)
    parser.add_argument("--api-servers", type=int, default=1)
    parser.add_argument("--fast-queue", action="store_true", help="ZeroMQ instead of multiprocessing queues between processes")
    args = parser.parse_args()
    server = ls.LitServer(
        ConvAPI(args.algorithm, args.workers_per_device),
        accelerator="cpu",
        devices=1,
        workers_per_device=args.workers_per_device,
        timeout=120,
        fast_queue=args.fast_queue,
        max_payload_size=256 << 20,  # its "256MB" string form fails in 0.2.19
    )
    server.run(host="127.0.0.1", port=args.port, num_api_servers=args.api_servers, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
