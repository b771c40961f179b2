"""The coordinator's ASGI app (FastAPI): a thin HTTP skin over `pocketfed.server.coordinator`.

Routes (OpenAPI at /openapi.json, docs at /docs):
    POST /v1/register                   signed by the key being registered
    POST /v1/checkin                    signed: eligibility -> a task, or "come back at T"
    GET  /v1/adapters/{sha256}          signed: a released global adapter (safetensors)
    GET  /v1/rounds/{id}/upload         signed: bytes received so far (resume point)
    PUT  /v1/rounds/{id}/upload?offset  signed: one chunk (application/octet-stream)
    POST /v1/rounds/{id}/commit         signed: size, sha256, tokens, metrics -> recorded
    GET  /v1/rounds/{id}/secagg         signed: the secure-aggregation stage and this device's view of it
    POST /v1/rounds/{id}/secagg/{kind}  signed: a step-0/1/2'/3 message (safetensors; kind = keys, shares,
                                        consistency, unmask);
                                        step 2 (the masked input) is the upload + commit above
    GET  /v1/release/latest, /v1/release/key                 public
    GET  /v1/status                     operator: `Authorization: Bearer <token>` (`server.operator`)

Every refusal is a 4xx with `{"error": code, "detail": sentence}`. Request bodies are capped
before they are read (`CHUNK_MAX_BYTES` for uploads, `JSON_MAX_BYTES` otherwise). A background
task ticks the round lifecycle, so deadlines pass even when no device calls.

A signed request is checked in two steps: its form and Ed25519 signature on the event loop (pure
computation), then, in the same trip to the thread pool as the handler's own work, that its key
is registered and its nonce unused (the store: SQLite is never touched on the event loop, where
a busy database would stall every connection). One trip per request, not one per step: each trip
is a thread hand-off both ways. A refusal of the body's fields (422) therefore comes before a
refusal of an unknown key or a replayed nonce (401); neither changes any state.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, Callable, TypeVar

from fastapi import Depends, FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pocketfed.server import coordinator as co
from pocketfed.server import operator
from pocketfed.protocol import secagg_wire as sw
from pocketfed.protocol import auth, wire

STATUS = {
    co.UNKNOWN_ROUND: 404, co.ROUND_CLOSED: 409, co.NOT_ASSIGNED: 403, co.DUPLICATE: 409,
    co.OFFSET_MISMATCH: 409, co.TOO_LARGE: 413, co.TRUNCATED: 400, co.HASH_MISMATCH: 400,
    co.INVALID_UPDATE: 422, co.NAME_TAKEN: 409, co.KEY_TAKEN: 409,
    co.NOT_ENROLLED: 403, co.ENROLLMENT_REFUSED: 403,
    co.WRONG_STAGE: 409, co.NOT_IN_COHORT: 403, co.INVALID_SECAGG: 422,
}
SECAGG_KINDS = {"keys": sw.KEYS, "shares": sw.SHARES, "consistency": sw.CONSISTENCY, "unmask": sw.UNMASK}
ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": wire.ErrorResponse} for s in (400, 401, 403, 404, 409, 413, 422)
}
Clock = Callable[[], float]
T = TypeVar("T")
# The signature headers, for the OpenAPI document: `auth.verify_headers` reads and checks them, so
# they are not declared as FastAPI parameters (which would parse and validate them a second time).
SIGNED: dict[str, Any] = {"parameters": [
    {"name": name, "in": "header", "required": True, "schema": {"type": "string", "maxLength": size}}
    for name, size in (("X-PF-Key", 64), ("X-PF-Timestamp", 24), ("X-PF-Nonce", 32), ("X-PF-Signature", 128))
]}


def _error(status: int, code: str, detail: str, received: int | None = None) -> JSONResponse:
    body = wire.ErrorResponse(error=code, detail=detail, received=received)
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status)


class BodyLimit:
    """Refuse (413) a request body over the limit before the app reads it."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = wire.CHUNK_MAX_BYTES if scope["path"].endswith("/upload") else wire.JSON_MAX_BYTES
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await _error(413, "body_too_large", f"request body is over {limit} bytes")(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            more = msg.get("more_body", False)
            if size > limit:
                return await _error(413, "body_too_large", f"request body is over {limit} bytes")(scope, receive, send)
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def create_app(c: co.Coordinator, clock: Clock = time.time, tick_every_s: float = 0.5,
               operator_token: str | None = None) -> FastAPI:
    """The app over `c`. `operator_token` guards /v1/status; None: the state folder's
    (`operator.load_or_create`, made on first use)."""
    token = operator_token if operator_token is not None else operator.load_or_create(c.store.folder)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        async def ticker() -> None:
            while True:
                await asyncio.sleep(tick_every_s)
                await run_in_threadpool(co.tick, c, clock())

        task = asyncio.create_task(ticker())
        yield
        task.cancel()

    app = FastAPI(title="pocketfed coordinator", version=str(wire.WIRE_VERSION), lifespan=lifespan,
                  description="Federated LoRA rounds: register, check in, download, upload, commit.")
    app.add_middleware(BodyLimit)
    app.state.coordinator = c

    @app.exception_handler(co.Refused)
    async def refused(_: Request, e: co.Refused) -> JSONResponse:
        return _error(STATUS[e.code], e.code, e.message, e.extra.get("received"))

    @app.exception_handler(auth.AuthError)
    async def unauthorized(_: Request, e: auth.AuthError) -> JSONResponse:
        return _error(401, e.code, e.message)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        errs = e.errors()
        first = errs[0] if errs else {}
        where = ".".join(str(x) for x in first.get("loc", ()))
        return _error(422, "invalid_request", f"{where}: {first.get('msg', 'invalid')}"[:500])

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return _error(e.status_code, f"http_{e.status_code}", str(e.detail))

    # ---- authentication ---------------------------------------------------------------------
    async def signed(request: Request) -> auth.SignedRequest:
        """Dependency: the request's form, timestamp and signature (registration and nonce: `as_device`)."""
        body = await request.body()
        path_qs = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return auth.verify_headers(request.headers, request.method, path_qs, body, clock(),
                                   c.cfg.deploy.max_clock_skew_s)

    def _fresh(signed: auth.SignedRequest, must_be_known: bool) -> str | None:
        device = c.store.device_by_key(signed.public_key)
        if must_be_known and device is None:
            raise auth.AuthError(auth.UNKNOWN_DEVICE, "no device is registered with this key; register first")
        horizon = clock() - 2 * c.cfg.deploy.max_clock_skew_s
        if not c.store.use_nonce(signed.public_key, signed.nonce, signed.timestamp, horizon):
            raise auth.AuthError(auth.REPLAYED, "this request's nonce was already used (replayed request)")
        return device

    async def as_device(request: auth.SignedRequest, work: Callable[[str], T]) -> T:
        """`work(device)` for the registered device that signed the request, its nonce spent: in one
        trip to the thread pool."""

        def run() -> T:
            device = _fresh(request, True)
            assert device is not None
            return work(device)

        return await run_in_threadpool(run)

    async def threaded(fn: Callable[..., Any], *args: Any) -> Any:
        return await run_in_threadpool(fn, *args)

    # What every task carries that is fixed for the coordinator's life (the config and the adapter
    # schema), built once rather than per check-in.
    cfg = c.cfg
    task_fixed = dict(
        model=c.model_id,
        lora=wire.LoraSpec(rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                           target_modules=list(cfg.lora.target_modules)),
        data=wire.DataSpec(seq_len=cfg.data.seq_len, test_fraction=cfg.data.test_fraction,
                           min_train_tokens=cfg.data.min_train_tokens),
        train=wire.TrainSpec(**{k: getattr(cfg.train, k) for k in wire.TrainSpec.model_fields}),
        codec=cfg.privacy.codec.value,
        adapter_schema=[wire.TensorSpec(name=k, shape=list(v.shape), dtype="float32") for k, v in c.like.items()],
        max_upload_bytes=c.max_upload_bytes, chunk_bytes=min(wire.CHUNK_MAX_BYTES, 2**20),
    )
    private = cfg.privacy.secagg or cfg.privacy.dp.value != "none"

    # ---- routes -------------------------------------------------------------------------------
    @app.post(f"{wire.PREFIX}/register", response_model=wire.RegisterResponse, responses=ERRORS, openapi_extra=SIGNED)
    async def register(req: wire.RegisterRequest, request: auth.SignedRequest = Depends(signed)) -> wire.RegisterResponse:
        """Register a device name with its Ed25519 key; signed by that key (proof of possession), and
        spending a one-time enrollment token unless the coordinator runs with open registration."""
        if request.public_key != req.public_key:
            raise auth.AuthError(auth.BAD_SIGNATURE, "the request must be signed by the key being registered")
        now = clock()

        def run() -> str:
            _fresh(request, False)
            return co.register(c, req.name, req.public_key, now, req.enrollment_token)

        return wire.RegisterResponse(device_id=await run_in_threadpool(run))

    @app.post(f"{wire.PREFIX}/checkin", response_model=wire.CheckinResponse, responses=ERRORS, openapi_extra=SIGNED)
    async def checkin(req: wire.CheckinRequest, request: auth.SignedRequest = Depends(signed)) -> wire.CheckinResponse:
        """Report eligibility; get a task in the open round, or when to come back."""
        now = clock()
        e = co.Eligibility(req.eligibility.charging, req.eligibility.idle, req.eligibility.unmetered,
                           req.eligibility.free_memory_mb)
        out = await as_device(request, lambda device: co.checkin(c, device, e, now))
        if isinstance(out, co.Wait):
            return wire.CheckinResponse(retry_at=out.retry_at, reason=out.reason, done=out.done)
        manifest, signature = co.manifest_for(c, out.version, now)
        task = wire.TaskSpec(
            round_id=out.round_id, round_index=out.idx, seed=out.seed, deadline=out.deadline,
            release=wire.SignedManifest(manifest=manifest, signature=signature),
            privacy=wire.PrivacySpec.from_plan(c.plan) if private else None, **task_fixed,
        )
        return wire.CheckinResponse(task=task, retry_at=out.deadline, reason="task")

    @app.get(f"{wire.PREFIX}/adapters/{{sha256}}", responses={**ERRORS, 200: {"content": {"application/octet-stream": {}}}},
             response_class=Response, openapi_extra=SIGNED)
    async def adapter(sha256: str = Path(pattern=r"^[0-9a-f]{64}$"), request: auth.SignedRequest = Depends(signed)) -> Response:
        """A released global adapter (safetensors); verify its sha256 against the signed manifest."""
        blob = await as_device(request, lambda _: c.store.get_blob(sha256) if c.store.is_release_blob(sha256) else None)
        if blob is None:
            return _error(404, "unknown_adapter", f"no released adapter has sha256 {sha256}")
        return Response(blob, media_type="application/octet-stream")

    @app.get(f"{wire.PREFIX}/rounds/{{round_id}}/upload", response_model=wire.UploadStatus, responses=ERRORS,
             openapi_extra=SIGNED)
    async def upload_status(round_id: int = Path(ge=0, le=2**62),
                            request: auth.SignedRequest = Depends(signed)) -> wire.UploadStatus:
        """How many bytes of this device's update for the round the server holds (to resume)."""
        now = clock()
        return wire.UploadStatus(received=await as_device(request, lambda device: co.upload_received(c, round_id, device, now)))

    @app.put(
        f"{wire.PREFIX}/rounds/{{round_id}}/upload", response_model=wire.UploadStatus, responses=ERRORS,
        openapi_extra={**SIGNED, "requestBody": {"required": True, "content": {"application/octet-stream": {
            "schema": {"type": "string", "format": "binary", "maxLength": wire.CHUNK_MAX_BYTES}}}}},
    )
    async def upload_chunk(raw: Request, round_id: int = Path(ge=0, le=2**62), offset: int = Query(ge=0, le=2**31),
                           request: auth.SignedRequest = Depends(signed)) -> wire.UploadStatus:
        """Append one chunk of the update at `offset` (= bytes received so far)."""
        body = await raw.body()
        if not body:
            return _error(400, "empty_chunk", "an upload chunk must hold at least one byte")  # type: ignore[return-value]
        now = clock()
        return wire.UploadStatus(received=await as_device(
            request, lambda device: co.receive_chunk(c, round_id, device, offset, body, now)))

    @app.post(f"{wire.PREFIX}/rounds/{{round_id}}/commit", response_model=wire.CommitResponse, responses=ERRORS,
              openapi_extra=SIGNED)
    async def commit(req: wire.CommitRequest, round_id: int = Path(ge=0, le=2**62),
                     request: auth.SignedRequest = Depends(signed)) -> wire.CommitResponse:
        """Finish an upload: the server checks size, hash, tensor schema and values, then records it."""
        now = clock()
        closed = await as_device(request, lambda device: co.commit_upload(
            c, round_id, device, req.size, req.sha256, req.num_tokens, dict(req.metrics), now))
        return wire.CommitResponse(accepted=True, round_closed=closed)

    @app.get(f"{wire.PREFIX}/rounds/{{round_id}}/secagg", response_model=wire.SecAggState, responses=ERRORS,
             openapi_extra=SIGNED)
    async def secagg_state(round_id: int = Path(ge=0, le=2**62),
                           request: auth.SignedRequest = Depends(signed)) -> wire.SecAggState:
        """The round's secure-aggregation stage, with what this device needs for it (keys, shares, U3)."""
        now = clock()
        return wire.SecAggState(**await as_device(request, lambda device: co.secagg_view(c, round_id, device, now)))

    @app.post(
        f"{wire.PREFIX}/rounds/{{round_id}}/secagg/{{kind}}", response_model=wire.Accepted, responses=ERRORS,
        openapi_extra={**SIGNED, "requestBody": {"required": True, "content": {"application/octet-stream": {
            "schema": {"type": "string", "format": "binary", "maxLength": wire.JSON_MAX_BYTES}}}}},
    )
    async def secagg_message(raw: Request, round_id: int = Path(ge=0, le=2**62),
                             kind: str = Path(pattern=r"^(keys|shares|consistency|unmask)$"),
                             request: auth.SignedRequest = Depends(signed)) -> wire.Accepted:
        """A step-0 (keys), step-1 (shares), step-2' (consistency) or step-3 (unmask) message as
        safetensors arrays."""
        body = await raw.body()
        now = clock()
        await as_device(request, lambda device: co.secagg_message(c, round_id, device, SECAGG_KINDS[kind], body, now))
        return wire.Accepted(accepted=True)

    @app.get(f"{wire.PREFIX}/release/latest", response_model=wire.SignedManifest)
    async def latest_release() -> wire.SignedManifest:
        """The newest global adapter's manifest, freshly signed."""
        v = await threaded(c.store.latest_version)
        manifest, signature = co.manifest_for(c, v, clock())
        return wire.SignedManifest(manifest=manifest, signature=signature)

    @app.get(f"{wire.PREFIX}/release/key", response_model=wire.ReleaseKey)
    async def release_key() -> wire.ReleaseKey:
        """The release public key (pin it on devices; better, ship it to them out of band)."""
        from pocketfed.release.signing import public_hex

        return wire.ReleaseKey(public_key=public_hex(c.release_key))

    @app.get(f"{wire.PREFIX}/status", response_model=wire.StatusResponse, responses=ERRORS)
    async def status(authorization: str | None = Header(None)) -> wire.StatusResponse:
        """Rounds, devices and round-level aggregates (no device names, nothing per device), for the
        operator: `Authorization: Bearer <token>` with the token in the state folder's operator.token."""
        operator.check(authorization, token)  # before any work: a refused request reads nothing
        return wire.StatusResponse(**await threaded(co.status, c, clock()))

    return app
