"""The reference for the exchange benchmark: the same Starlette/uvicorn stack answering a POST.

It reads the whole request body (the same payload bytes a transfer carries) and answers a small JSON
acknowledgement, with no database, no signature and no thread pool: the HTTP round-trip limit.

    python bench/exchange/echoapp.py --port P
"""

from __future__ import annotations

import argparse

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


async def message(request: Request) -> Response:
    body = await request.body()
    return Response(orjson.dumps({"accepted": True, "size": len(body)}), media_type="application/json")


async def health(request: Request) -> Response:
    return Response(b"ok")


app = Starlette(routes=[Route("/messages", message, methods=["POST"]), Route("/health", health)])

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")  # as `lienthong serve` runs it
