"""Codec throughput: decode (orjson.loads + app.codec.decode_tensor) and encode (encode_tensor + orjson.dumps)
of a 1M-element float32 tensor in each encoding, as the service does them.

    .venv/bin/python -m bench.bench_codec                 # 1M elements, 7 repetitions
    .venv/bin/python -m bench.bench_codec --elements 4194304 --reps 5

MB/s are given two ways: of the JSON text (what the wire carries) and of the tensor's raw float32 bytes
(what the client means to send). A benchmark, not a test: it asserts only that each round trip is exact.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from functools import partial

import orjson
import torch

from app.codec import decode_tensor, encode_tensor

ENCODINGS = ("list", "flat", "base64")


def _encode(tensor: torch.Tensor, encoding: str) -> bytes:
    return orjson.dumps({"input": encode_tensor(tensor, encoding)}, option=orjson.OPT_SERIALIZE_NUMPY)


def _decode(payload: bytes, rank: int, elements: int) -> torch.Tensor:
    return decode_tensor(orjson.loads(payload)["input"], "input", list_dtype=torch.float32, ranks=(rank,), max_elements=elements)


def _median_seconds(run, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=1 << 20)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    side = int(math.sqrt(args.elements // 64))
    tensor = torch.randn(1, 64, side, args.elements // (64 * side), generator=torch.Generator().manual_seed(0))
    raw_mb = tensor.numel() * 4 / 1e6
    print(
        f"tensor {list(tensor.shape)} float32 = {tensor.numel():,} elements, {raw_mb:.1f} MB raw; torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(
        f"{'encoding':<8} {'JSON MB':>8} {'decode ms':>10} {'decode MB/s':>12} {'(raw MB/s)':>11} {'encode ms':>10} {'encode MB/s':>12} {'(raw MB/s)':>11}"
    )
    for encoding in ENCODINGS:
        payload = _encode(tensor, encoding)
        assert torch.equal(_decode(payload, tensor.dim(), tensor.numel()), tensor)
        json_mb = len(payload) / 1e6
        decode_s = _median_seconds(partial(_decode, payload, tensor.dim(), tensor.numel()), args.reps)
        encode_s = _median_seconds(partial(_encode, tensor, encoding), args.reps)
        print(
            f"{encoding:<8} {json_mb:>8.1f} {decode_s * 1e3:>10.1f} {json_mb / decode_s:>12.0f} {raw_mb / decode_s:>11.0f}"
            f" {encode_s * 1e3:>10.1f} {json_mb / encode_s:>12.0f} {raw_mb / encode_s:>11.0f}"
        )


if __name__ == "__main__":
    main()
