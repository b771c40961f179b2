"""The console's routes: the page, its static files, its JSON API.

On a coordinator (`mount_console`, called by `server.http.app.create_app`):
    GET  /console                          the page (a shell: it holds no data, so it needs no credential)
    GET  /console/static/{file}            its script, style and the vendored chart library
    GET  /console/api/overview             everything the panels show (`views.deployment`)
    POST /console/api/pause | resume       rounds: no new round opens while paused
    POST /console/api/cohort {"goal": n}   the next rounds' cohort size
    POST /console/api/freeze | unfreeze    releases
    POST /console/api/devices/{id}/revoke  a device, for good
Every API route needs the operator token (`Authorization: Bearer <token>`, as /v1/status):
without it, 401 before any work. The page asks for the token once and keeps it in the tab's
sessionStorage (never in a URL, so never in a log or the browser history); it polls the overview
every 2 s and redraws when its `stamp` moves (a round committed, an update arrived).

Over simulation run folders (`runs_app`, `pocketfed console runs/`): the same charts, read only,
GET /console (the runs page) and GET /console/api/runs; no credential (it serves files the user
already reads, on loopback by default).
"""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from fastapi import FastAPI, Header, Path as PathParam, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from pocketfed.console import views
from pocketfed.server import operations, operator
from pocketfed.server.service import Coordinator

STATIC = Path(str(resources.files("pocketfed.console") / "static"))
TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html", ".txt": "text/plain", ".png": "image/png"}
# the page's own rules: scripts and styles from this server only (the chart library is vendored)
CSP = "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'"


def _page(name: str) -> HTMLResponse:
    return HTMLResponse((STATIC / name).read_text(), headers={"Content-Security-Policy": CSP, "Cache-Control": "no-store"})


def _static(app: FastAPI) -> None:
    @app.get("/console/static/{name:path}", include_in_schema=False)
    async def static(name: str) -> Response:
        path = (STATIC / name).resolve()
        if not path.is_relative_to(STATIC.resolve()) or not path.is_file() or path.suffix not in TYPES:
            if name.startswith("vendor/"):  # the chart library is fetched at install time (make install)
                return JSONResponse({"error": "vendor_missing", "detail": f"{name} is not installed: run `make vendor` "
                                     "(part of `make install`) to fetch the pinned chart library"}, status_code=404)
            return JSONResponse({"error": "not_found", "detail": f"no console file {name!r}"}, status_code=404)
        return FileResponse(path, media_type=TYPES[path.suffix], headers={"Cache-Control": "no-cache"})


def mount_console(app: FastAPI, c: Coordinator, token: str, clock: Callable[[], float] = time.time) -> None:
    """Add the console to a coordinator's app; `token` is the operator's (`server.operator`)."""
    _static(app)

    @app.get("/console", include_in_schema=False)
    async def page() -> HTMLResponse:
        return _page("console.html")

    @app.get("/console/", include_in_schema=False)
    async def page_slash() -> RedirectResponse:
        return RedirectResponse("/console")

    @app.get("/console/api/overview", tags=["console"])
    async def overview(authorization: str | None = Header(None)) -> dict[str, Any]:
        """Rounds, quality, privacy, traffic, devices, releases and the action log (operator token)."""
        operator.check(authorization, token)  # before any work: a refused request reads nothing
        return await run_in_threadpool(views.deployment, c, clock())

    async def act(authorization: str | None, action: str, value: Any = None) -> JSONResponse:
        operator.check(authorization, token)
        try:
            controls = await run_in_threadpool(operations.act, c, action, value, token, clock())
        except operations.ActionRefused as e:
            return JSONResponse({"error": "invalid_action", "detail": str(e)}, status_code=422)
        return JSONResponse({"action": action, "controls": {"paused": controls.paused, "goal": operations.next_goal(c),
                                                             "frozen_at": controls.frozen_at,
                                                             "revoked": sorted(controls.revoked)}})

    @app.post("/console/api/pause", tags=["console"])
    async def pause(authorization: str | None = Header(None)) -> JSONResponse:
        """Pause rounds: no new round opens (the open one runs to its end)."""
        return await act(authorization, operations.PAUSE)

    @app.post("/console/api/resume", tags=["console"])
    async def resume(authorization: str | None = Header(None)) -> JSONResponse:
        return await act(authorization, operations.RESUME)

    @app.post("/console/api/cohort", tags=["console"],
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": {
                  "type": "object", "properties": {"goal": {"type": "integer"}}, "required": ["goal"]}}}}})
    async def cohort(request: Request, authorization: str | None = Header(None)) -> JSONResponse:
        """The goal of the rounds opened from now on (from deploy.quorum to 10000): `{"goal": n}`."""
        operator.check(authorization, token)  # before the body is even parsed
        try:
            body = json.loads(await request.body())
        except ValueError:
            body = None
        if not isinstance(body, dict) or "goal" not in body:
            return JSONResponse({"error": "invalid_action", "detail": 'the body must be JSON: {"goal": <cohort size>}'},
                                status_code=422)
        return await act(authorization, operations.COHORT, body["goal"])

    @app.post("/console/api/freeze", tags=["console"])
    async def freeze(authorization: str | None = Header(None)) -> JSONResponse:
        """Freeze releases at the latest version: nothing newer is signed or served."""
        return await act(authorization, operations.FREEZE)

    @app.post("/console/api/unfreeze", tags=["console"])
    async def unfreeze(authorization: str | None = Header(None)) -> JSONResponse:
        return await act(authorization, operations.UNFREEZE)

    @app.post("/console/api/devices/{device_id}/revoke", tags=["console"])
    async def revoke(device_id: str = PathParam(max_length=128), authorization: str | None = Header(None)) -> JSONResponse:
        """Revoke a device: its signed requests are refused from now on (403 device_revoked)."""
        return await act(authorization, operations.REVOKE, device_id)


def runs_app(root: Path) -> FastAPI:
    """The read-only console over the simulation runs under `root`."""
    app = FastAPI(title="pocketfed console (simulation runs)", docs_url=None, redoc_url=None)
    _static(app)

    @app.get("/", include_in_schema=False)
    async def home() -> RedirectResponse:
        return RedirectResponse("/console")

    @app.get("/console", include_in_schema=False)
    async def page() -> HTMLResponse:
        return _page("runs.html")

    @app.get("/console/api/runs")
    async def runs(request: Request) -> dict[str, Any]:
        return await run_in_threadpool(views.runs, root)

    return app
