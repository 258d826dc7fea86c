"""A small, real stand-in for the platform's backend (``upload-gateway sample-backend``).

It accepts the platform's upload routes, stores each file under ``--store`` and answers in the
platform's shape ``{status, description, data}``; every other path answers a JSON echo. It also
records what reached it (method, path, headers, body length and SHA-256) at
``GET /_sample/requests`` — on the backend's own port, not through the gateway — so a newcomer can
see what the gateway let through, and the tests can prove that a rejected request sent nothing.
"""

from __future__ import annotations

import hashlib
import io
import re
import time
import uuid
from pathlib import Path
from typing import Any

import python_multipart
from aiohttp import web

RECORDS = web.AppKey("records", list)
STORE = web.AppKey("store", Path)
UPLOAD_PATHS = (
    re.compile(r"^/streams/[^/]+/objects(?:/[^/]+/child)?$"),
    re.compile(r"^/whatsapp/uploadmedia/[^/]+$"),
)
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def build_sample_backend(store: Path, extra: web.RouteTableDef | None = None) -> web.Application:
    """``extra`` routes (used by the tests) are matched before the catch-all."""
    app = web.Application(client_max_size=1024**3)
    app[RECORDS] = []
    app[STORE] = store
    store.mkdir(parents=True, exist_ok=True)
    app.router.add_get("/_sample/requests", _list_records)
    app.router.add_delete("/_sample/requests", _clear_records)
    if extra is not None:
        app.router.add_routes(extra)
    app.router.add_route("*", "/{tail:(?s:.*)}", _any)
    return app


def record(request: web.Request, body: bytes) -> None:
    """Remember what reached the backend; the tests read it to prove what was forwarded."""
    request.app[RECORDS].append(
        {
            "method": request.method,
            "path": request.raw_path,
            "headers": [[k, v] for k, v in request.headers.items()],
            "length": len(body),
            "sha256": hashlib.sha256(body).hexdigest(),
            "time": time.time(),
        }
    )


async def _list_records(request: web.Request) -> web.Response:
    return web.json_response(request.app[RECORDS])


async def _clear_records(request: web.Request) -> web.Response:
    request.app[RECORDS].clear()
    return web.json_response({"cleared": True})


async def _any(request: web.Request) -> web.Response:
    body = await request.read()
    record(request, body)
    if request.method in ("POST", "PUT") and any(p.match(request.path) for p in UPLOAD_PATHS):
        return _store_upload(request, body)
    return web.json_response(
        {
            "status": "success",
            "description": "echo",
            "data": {"method": request.method, "path": request.raw_path, "length": len(body)},
        }
    )


def _store_upload(request: web.Request, body: bytes) -> web.Response:
    """Save the files as the platform would and describe them in its answer shape."""
    folder = request.app[STORE] / uuid.uuid4().hex
    folder.mkdir(parents=True)
    saved: list[dict[str, Any]] = []
    fields: dict[str, str] = {}
    ctype = request.headers.get("Content-Type", "")
    if ctype.startswith("multipart/form-data"):

        def on_file(file: Any) -> None:
            name = _SAFE_NAME.sub("_", (file.file_name or b"file").decode(errors="replace"))[:100]
            file.file_object.seek(0)
            data = file.file_object.read()
            (folder / name).write_bytes(data)
            saved.append({"field": file.field_name.decode(), "fileName": name, "size": len(data)})

        def on_field(field: Any) -> None:
            fields[field.field_name.decode()] = (field.value or b"").decode(errors="replace")

        headers = {"Content-Type": ctype.encode(), "Content-Length": str(len(body)).encode()}
        python_multipart.parse_form(headers, io.BytesIO(body), on_field, on_file)
    else:
        (folder / "body").write_bytes(body)
        saved.append({"field": None, "fileName": "body", "size": len(body)})
    return web.json_response(
        {
            "status": "success",
            "description": "Files uploaded",
            "data": {"objectId": folder.name, "files": saved, "fields": fields},
        }
    )


def run_sample_backend(host: str, port: int, store: Path) -> None:
    web.run_app(build_sample_backend(store), host=host, port=port, access_log=None, print=None)
