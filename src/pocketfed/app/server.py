"""The device app's local server: the page's assets and its JSON API, over one loaded model.

    create_app(home) -> FastAPI        loads <home>/model once, verifies the privacy lock once

    GET  /                  the page (index.html); /app.css, /app.js, /favicon.svg: its assets
    GET  /api/suggest?text= {"words": [...], "ms", "cpu_ms", "lock_ok", "stale"}  next words for the text
    GET  /api/lock          the lock as last verified (checks, sentence, release, personal adapter)
    POST /api/lock          verify again now (re-hashes the weight files), then as GET
    GET  /api/ledger        what left this device: messages and refusals, newest first

Why each guard:
- Content-Security-Policy 'self' only: the page runs no inline script, loads nothing from another
  origin, and may connect only to this server; a text or ledger field that slipped into the page
  as markup could not run or send anything.
- Trusted Host header (127.0.0.1 / localhost): a page bound to loopback is still reachable by a
  web site through DNS rebinding (its own name re-pointed at 127.0.0.1), which would let that site
  read the ledger and the user's suggestions; the browser sends the site's name as Host, so a
  request naming another host is refused.
- One suggestion at a time (a lock around `suggest`): the model's KV cache (`runtime.Session`) is
  one token sequence, shared by consecutive requests so a keystroke pays only for its new tokens.
  A request that a newer one overtook while it waited returns `stale` without running: the page
  has dropped it, and a burst of keystrokes on a slow device must not queue up model work.
- A fifth check beside the lock's four (`loaded_check`): the model the app runs is still the one on
  disk that the lock hashes.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse, Response
from starlette.middleware.trustedhost import TrustedHostMiddleware

from pocketfed.errors import UserError
from pocketfed.runtime.home import MODEL_RECORD
from pocketfed.runtime.home import model_dir as home_model_dir
from pocketfed.runtime.model import LoadedModel, load
from pocketfed.runtime.privacy_lock import Check, LockReport, verify
from pocketfed.runtime.suggest import suggest

from pocketfed.app import ledger_rows

# The lock's hover text, shown only when every check passes (issue 14).
LOCK_TEXT = "This suggestion was generated on your device and your personal data was not shared"

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; font-src 'self'; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost")
MAX_TEXT = 4000  # characters of text before the cursor looked at; suggest keeps the last 256 tokens
ASSETS = {  # URL path -> (file in static/, media type)
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.css": ("app.css", "text/css; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/favicon.svg": ("favicon.svg", "image/svg+xml"),
}


@dataclass
class _State:
    home: Path
    model_dir: Path
    model: LoadedModel
    loaded_record: str | None  # sha256 of the model record (model/pocketfed.json) when the model was loaded
    lock: dict[str, Any] = field(default_factory=dict)  # the last verification, as the page shows it
    suggest_lock: threading.Lock = field(default_factory=threading.Lock)
    asked: int = 0  # suggestion requests so far; a request overtaken while it waited is not run
    asked_lock: threading.Lock = field(default_factory=threading.Lock)


def _record_sha256(model_dir: Path) -> str | None:
    try:
        return hashlib.sha256((model_dir / MODEL_RECORD).read_bytes()).hexdigest()
    except OSError:
        return None


def loaded_check(model_dir: Path, loaded_record: str | None) -> Check:
    """The lock hashes the files on disk; this says they are still the files this app loaded. The
    device rebuilds <home>/model after each release (a new folder renamed into place) while the
    app may keep running the model it loaded at start: a clean lock over the new files would vouch
    for weights that are not the ones making the suggestions."""
    if _record_sha256(model_dir) == loaded_record:
        return Check("loaded", True, "the model running is the one on disk")
    return Check("loaded", False, f"the on-device model in {model_dir.name}/ changed since this app loaded it "
                                  "(a new release was installed?); restart `pocketfed app` to run it")


def lock_json(report: LockReport, verified_at: float, extra: Sequence[Check] = ()) -> dict[str, Any]:
    """The lock as the page shows it: `hover` is LOCK_TEXT only when every check passed (the lock's
    and `extra`); otherwise the warning names the failing checks and the first one's sentence."""
    checks = (*report.checks, *extra)
    failing = [c.name for c in checks if not c.ok]
    ok = bool(report.ok) and not failing
    line = report.line if ok or not report.ok else next(c.detail for c in checks if not c.ok)
    return jsonable_encoder({
        "ok": ok,
        "hover": LOCK_TEXT if ok else f"Privacy lock failed: {line}",
        "line": line,
        "failing": failing,
        "checks": [asdict(c) for c in checks],
        "sent": report.sent,
        "refusals": report.refusals,
        "release": report.release,
        "personal": report.personal,
        "verified_at": verified_at,
    })


def _failed_lock(reason: str, verified_at: float) -> dict[str, Any]:
    """The lock when verification itself could not run (a home taken apart while the app runs)."""
    return {"ok": False, "hover": f"Privacy lock failed: {reason}", "line": reason, "failing": ["home"],
            "checks": [], "sent": {}, "refusals": 0, "release": {}, "personal": None, "verified_at": verified_at}


def _verify(state: _State) -> dict[str, Any]:
    now = time.time()
    try:
        return lock_json(verify(state.home, state.model_dir), now, [loaded_check(state.model_dir, state.loaded_record)])
    except UserError as e:
        return _failed_lock(str(e), now)


def _read_assets() -> dict[str, tuple[bytes, str]]:
    static = resources.files("pocketfed.app") / "static"
    return {path: (static.joinpath(name).read_bytes(), media) for path, (name, media) in ASSETS.items()}


def create_app(home: str | Path, model_dir: str | Path | None = None, *, threads: int | None = None,
               spin: bool | None = None, allowed_hosts: Sequence[str] = LOOPBACK_HOSTS,
               model: LoadedModel | None = None) -> FastAPI:
    """The app over `home`'s runtime model (default `<home>/model`), loaded once here (or `model`,
    already loaded from `model_dir`), with the lock verified once here."""
    home = Path(home).expanduser()
    if not home.is_dir():
        raise UserError(f"device home {str(home)!r} does not exist; give the --home of `pocketfed device`")
    folder = Path(model_dir).expanduser() if model_dir is not None else home_model_dir(home)
    record = _record_sha256(folder)  # before loading: a rebuild during the load then shows as a change
    state = _State(home=home, model_dir=folder, model=model or load(folder, threads, spin), loaded_record=record)
    state.lock = _verify(state)
    assets = _read_assets()

    api = FastAPI(title="pocketfed device app", docs_url=None, redoc_url=None, openapi_url=None)
    api.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))

    @api.middleware("http")
    async def headers(request: Any, call_next: Any) -> Response:
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Cache-Control"] = "no-store"  # the ledger and lock change; assets are tiny
        return response

    def asset(path: str) -> Any:
        body, media = assets[path]
        return lambda: Response(body, media_type=media)

    for path in ASSETS:
        api.get(path, include_in_schema=False)(asset(path))

    # plain `def` handlers: FastAPI runs them in its thread pool, so hashing or a model step never
    # blocks the event loop
    @api.get("/api/suggest")
    def suggest_words(text: str = Query("", max_length=100_000)) -> dict[str, Any]:
        start = time.perf_counter()
        with state.asked_lock:
            state.asked += 1
            mine = state.asked
        with state.suggest_lock:
            if mine != state.asked:  # typed on while this waited: the page has dropped it already
                return {"words": [], "stale": True, "ms": 0.0, "cpu_ms": 0.0, "lock_ok": state.lock["ok"]}
            cpu = time.process_time()
            words = suggest(state.model, text[-MAX_TEXT:])
            cpu_ms = (time.process_time() - cpu) * 1000  # all threads' CPU time: what a loaded machine does not inflate
        return {"words": words, "stale": False, "ms": (time.perf_counter() - start) * 1000, "cpu_ms": cpu_ms,
                "lock_ok": state.lock["ok"]}

    @api.get("/api/lock")
    def get_lock() -> JSONResponse:
        return JSONResponse(state.lock)

    @api.post("/api/lock")
    def check_lock() -> JSONResponse:
        state.lock = _verify(state)
        return JSONResponse(state.lock)

    @api.get("/api/ledger")
    def ledger() -> dict[str, Any]:
        return ledger_rows.read(state.home).as_json()

    api.state.app_state = state  # for tests and the CLI's start-up message
    return api
