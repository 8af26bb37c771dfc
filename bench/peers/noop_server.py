"""The ceiling: a FastAPI endpoint that reads the body and answers a constant, served like our app.

Same uvicorn settings as `python -m app` (access log off), run with the same Python, so its req/s on the
seed case is the most any FastAPI app on this stack can do here; it computes nothing and checks nothing.

    .venv/bin/python -m bench.peers.noop_server --port 8103
"""

from __future__ import annotations

import argparse

import uvicorn
from fastapi import FastAPI, Request, Response

app = FastAPI()
_ANSWER = b'{"output": [[[[0.0]]]]}'


@app.post("/forward")
async def forward(request: Request) -> Response:
    await request.body()
    return Response(content=_ANSWER, media_type="application/json")


@app.get("/readyz")
async def ready() -> dict:
    return {"status": "ready"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8103)
    args = parser.parse_args()
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
