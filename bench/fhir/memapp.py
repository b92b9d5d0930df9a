"""The physical limit for read-by-id: Starlette + uvicorn serving pre-loaded resource bytes.

Same framework, same server (uvicorn.run with the same arguments as `lienthong serve`:
the same number of worker processes, default loop/http implementations, log_level=warning), same
route shape and the same bytes and headers a read returns, but no database and no thread pool.

    python bench/fhir/memapp.py --data FILE --host 127.0.0.1 --port P [--workers N]

FILE is JSON: {"Type/id": {"body": "<resource json>", "etag": "W/\"1\"", "modified": "<http date>"}}.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

FHIR_JSON = "application/fhir+json; charset=utf-8"


def build(data_file: Path) -> Starlette:
    raw = orjson.loads(data_file.read_bytes())
    store: dict[str, tuple[bytes, dict[str, str]]] = {
        key: (v["body"].encode(), {"ETag": v["etag"], "Last-Modified": v["modified"]}) for key, v in raw.items()
    }

    async def read(request: Request) -> Response:
        p = request.path_params
        found = store.get(f"{p['rtype']}/{p['rid']}")
        if found is None:
            return Response(b'{"resourceType":"OperationOutcome"}', status_code=404, media_type=FHIR_JSON)
        return Response(found[0], headers=found[1], media_type=FHIR_JSON)

    async def health(request: Request) -> Response:
        return Response(b"ok")

    return Starlette(routes=[Route("/health", health), Route("/fhir/{rtype}/{rid}", read, methods=["GET"])])


def app_from_env() -> Starlette:
    """The app for uvicorn's worker processes (several workers need a factory, not an app object)."""
    import os

    return build(Path(os.environ["MEMAPP_DATA"]))


def main() -> None:
    import os
    import sys

    import uvicorn

    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    if args.workers > 1:  # as `lienthong serve --workers N` runs
        os.environ["MEMAPP_DATA"] = str(args.data.resolve())
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        uvicorn.run("memapp:app_from_env", factory=True, host=args.host, port=args.port, workers=args.workers,
                    log_level="warning")
    else:
        uvicorn.run(build(args.data), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
