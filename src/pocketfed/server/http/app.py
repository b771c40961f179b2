"""The coordinator's ASGI app (FastAPI): a thin HTTP skin over `pocketfed.server.coordinator`.

Routes (OpenAPI at /openapi.json, docs at /docs):
    POST /v1/register                   signed by the key being registered
    POST /v1/checkin                    signed: eligibility -> a task, or "come back at T"
    GET  /v1/adapters/{sha256}          signed: a released global adapter (safetensors)
    GET  /v1/rounds/{id}/upload         signed: bytes received so far (resume point)
    PUT  /v1/rounds/{id}/upload?offset  signed: one chunk (application/octet-stream)
    POST /v1/rounds/{id}/commit         signed: size, sha256, tokens, metrics -> recorded
    GET  /v1/rounds/{id}/secagg         signed: the secure-aggregation stage and this device's view of it
    POST /v1/evaluations/{id}/report    signed: a federated-evaluation report in the clear (without secagg)
    POST /v1/rounds/{id}/secagg/{kind}  signed: a step-0/1/2'/3 message (safetensors; kind = keys, shares,
                                        consistency, unmask);
                                        step 2 (the masked input) is the upload + commit above
    GET  /v1/release/latest, /v1/release/key                 public
    GET  /v1/status                     operator: `Authorization: Bearer <token>` (`server.operator`)

Every refusal is a 4xx with `{"error": code, "detail": sentence}`. A background task ticks the
round lifecycle, so deadlines pass even when no device calls; a tick that fails is logged with its
round and the next one runs as planned.

A request passes the `Gate` before the app sees it. From the headers alone, before a byte of the
body is read: the declared size (`CHUNK_MAX_BYTES` for uploads, `JSON_MAX_BYTES` otherwise, 413),
and for a signed route the signature headers' form, the timestamp window and, but for /register,
that the key is registered (401; the connection is closed, the body never read). Then the body,
under the read timeouts (408): an upload's chunk is streamed into a private file, any other body
(64 KiB at most) is held in memory, and the Ed25519 signature is checked over the sha256 computed
as the bytes arrived (401, the file removed). Nothing of a stranger's is buffered or recorded.
The route then spends the nonce in the same trip to the thread pool as its own work (SQLite is
never touched on the event loop, where a busy database would stall every connection; the key
check uses the store's cache there and goes to the thread pool only on a miss). A refusal of the
body's fields (422) comes before a replayed nonce's (401); neither changes any state. Connection
limits (timeouts before a request and between requests, the connection cap) are uvicorn's, set by
`pocketfed.server.http.limits`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from pathlib import Path as FilePath
from typing import Any, BinaryIO, Callable, TypeVar

from fastapi import Depends, FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import URL, Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pocketfed.server import coordinator as co
from pocketfed.server import operations, operator
from pocketfed.server.http.traffic import CountTraffic
from pocketfed.protocol import secagg_wire as sw
from pocketfed.protocol import auth, fedeval, wire

STATUS = {
    co.UNKNOWN_ROUND: 404, co.ROUND_CLOSED: 409, co.NOT_ASSIGNED: 403, co.DUPLICATE: 409,
    co.OFFSET_MISMATCH: 409, co.TOO_LARGE: 413, co.TRUNCATED: 400, co.HASH_MISMATCH: 400,
    co.INVALID_UPDATE: 422, co.NAME_TAKEN: 409, co.KEY_TAKEN: 409,
    co.NOT_ENROLLED: 403, co.ENROLLMENT_REFUSED: 403,
    co.WRONG_STAGE: 409, co.NOT_IN_COHORT: 403, co.INVALID_SECAGG: 422,
}
STATUS.update({operations.DEVICE_REVOKED: 403, operations.RELEASES_FROZEN: 409})
SECAGG_KINDS = {"keys": sw.KEYS, "shares": sw.SHARES, "consistency": sw.CONSISTENCY, "unmask": sw.UNMASK}
ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": wire.ErrorResponse} for s in (400, 401, 403, 404, 409, 413, 422)
}
Clock = Callable[[], float]
T = TypeVar("T")
log = logging.getLogger("pocketfed.server")
# The signature headers, for the OpenAPI document: the `Gate` reads and checks them, so
# they are not declared as FastAPI parameters (which would parse and validate them a second time).
SIGNED: dict[str, Any] = {"parameters": [
    {"name": name, "in": "header", "required": True, "schema": {"type": "string", "maxLength": size}}
    for name, size in (("X-PF-Key", 64), ("X-PF-Timestamp", 24), ("X-PF-Nonce", 32), ("X-PF-Signature", 128))
]}


def _error(status: int, code: str, detail: str, received: int | None = None, close: bool = False) -> JSONResponse:
    """A refusal; `close`: the connection closes after it (for one answered before its body was read)."""
    body = wire.ErrorResponse(error=code, detail=detail, received=received)
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status,
                        headers={"connection": "close"} if close else None)


class Gate:
    """What a request must pass before the app sees it (pure ASGI, on the event loop; see the module
    docstring for the order). The app finds the verified request in scope["state"]: "pf_signed" (an
    `auth.SignedRequest`) and, for an upload, "pf_chunk" (the file holding the chunk, removed once
    the request is answered)."""

    def __init__(self, app: ASGIApp, coordinator: co.Coordinator, clock: Clock, api: FastAPI):
        self.app, self.c, self.clock, self.api = app, coordinator, clock, api
        self._signed: list[APIRoute] | None = None

    def _route(self, scope: Scope) -> APIRoute | None:
        """The signed route the request is for (the routes whose OpenAPI lists the signature headers)."""
        if self._signed is None:  # the routes exist once the app serves; the middleware is built then
            self._signed = [r for r in self.api.routes if isinstance(r, APIRoute)
                            and (r.openapi_extra or {}).get("parameters") is SIGNED["parameters"]]
        return next((r for r in self._signed if r.matches(scope)[0] is Match.FULL), None)

    async def _registered(self, public_key: str) -> bool:
        if self.c.store.cached_device(public_key) is not None:
            return True
        return await run_in_threadpool(self.c.store.device_by_key, public_key) is not None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        d, route = self.c.cfg.deploy, self._route(scope)
        upload = route is not None and route.name == "upload_chunk"
        limit = wire.CHUNK_MAX_BYTES if upload else wire.JSON_MAX_BYTES
        headers = Headers(scope=scope)
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await _error(413, "body_too_large", f"request body is over {limit} bytes", close=True)(scope, receive, send)
        checked: auth.Headers | None = None
        if route is not None:  # the headers alone: nothing of the body is read for a stranger
            try:
                checked = auth.check_headers(headers, self.clock(), d.max_clock_skew_s)
                if route.name != "register" and not await self._registered(checked.public_key):
                    raise auth.AuthError(auth.UNKNOWN_DEVICE, "no device is registered with this key; register first")
            except auth.AuthError as e:
                return await _error(401, e.code, e.message, close=True)(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + d.request_timeout_s
        chunk = self.c.store.incoming_path() if upload else None
        sink: BinaryIO | None = open(chunk, "wb") if chunk is not None else None  # noqa: SIM115 (closed below)
        try:
            parts, size, digest, more = [], 0, hashlib.sha256(), True
            while more:
                try:  # a silent client gives up its connection: read_timeout_s per read, request_timeout_s in all
                    msg = await asyncio.wait_for(receive(), max(0.0, min(d.read_timeout_s, deadline - loop.time())))
                except asyncio.TimeoutError:
                    return await _error(408, "request_timeout", f"the request body did not arrive in time (at most "
                                        f"{d.read_timeout_s:g} s between reads, {d.request_timeout_s:g} s in all)",
                                        close=True)(scope, receive, send)
                if msg["type"] == "http.disconnect":
                    return
                body = msg.get("body", b"")
                size += len(body)
                if size > limit:
                    return await _error(413, "body_too_large", f"request body is over {limit} bytes", close=True)(
                        scope, receive, send)
                digest.update(body)
                if sink is not None:
                    sink.write(body)
                    sink.flush()  # to the OS now: what the process holds per connection is one read
                else:
                    parts.append(body)
                more = msg.get("more_body", False)
            if sink is not None:
                sink.close()
            state = scope.setdefault("state", {})
            if checked is not None:
                url = URL(scope=scope)
                try:
                    state["pf_signed"] = checked.verify(scope["method"], url.path + (f"?{url.query}" if url.query else ""),
                                                        digest.hexdigest())
                except auth.AuthError as e:
                    return await _error(401, e.code, e.message)(scope, receive, send)
            if chunk is not None:
                state["pf_chunk"] = chunk
            whole, sent = b"".join(parts), False

            async def replay() -> Message:
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "http.request", "body": whole, "more_body": False}
                return await receive()

            await self.app(scope, replay, send)
        finally:
            if sink is not None:
                sink.close()
            if chunk is not None:
                chunk.unlink(missing_ok=True)


async def _tick_forever(c: co.Coordinator, clock: Clock, every_s: float) -> None:
    """Tick the lifecycle every `every_s` seconds, for good: a tick that raises (a database another
    process holds locked, a full disk, a bug) is logged with the open round, and the next tick runs
    as planned, so deadlines keep passing. A run of failures logs its first traceback, then one line
    each, and says when the ticks work again."""
    failures = 0
    while True:
        await asyncio.sleep(every_s)
        try:
            await run_in_threadpool(co.tick, c, clock())
        except Exception as e:  # noqa: BLE001 (logged; the ticker must outlive any one tick)
            failures += 1
            round_id = await run_in_threadpool(_open_round_id, c)
            log.error("background tick failed (open round %s, failure %d in a row): %s: %s",
                      round_id, failures, type(e).__name__, e, exc_info=failures == 1)
        else:
            if failures:
                log.warning("background ticks work again after %d failures", failures)
            failures = 0


def _open_round_id(c: co.Coordinator) -> str:
    try:
        r = c.store.open_round()
    except Exception as e:  # noqa: BLE001 (the store may be what failed)
        return f"unknown: {type(e).__name__}"
    return "none" if r is None else str(r.round_id)


def create_app(c: co.Coordinator, clock: Clock = time.time, tick_every_s: float = 0.5,
               operator_token: str | None = None) -> FastAPI:
    """The app over `c`. `operator_token` guards /v1/status; None: the state folder's
    (`operator.load_or_create`, made on first use)."""
    token = operator_token if operator_token is not None else operator.load_or_create(c.store.folder)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        task = asyncio.create_task(_tick_forever(c, clock, tick_every_s))
        yield
        task.cancel()

    app = FastAPI(title="pocketfed coordinator", version=str(wire.WIRE_VERSION), lifespan=lifespan,
                  description="Federated LoRA rounds: register, check in, download, upload, commit.")
    app.add_middleware(Gate, coordinator=c, clock=clock, api=app)
    app.add_middleware(CountTraffic, counter=c.traffic)  # bytes up and down per round, for the console
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
        """Dependency: the request the `Gate` verified (form, timestamp, registered key, signature;
        the nonce is spent with the route's work: `as_device`)."""
        verified = request.scope.get("state", {}).get("pf_signed")
        if not isinstance(verified, auth.SignedRequest):  # the Gate verifies every signed route's request
            raise auth.AuthError(auth.BAD_HEADERS, "this request was not checked as a signed one")
        return verified

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
            if operations.is_revoked(c, device):
                raise co.Refused(operations.DEVICE_REVOKED, f"device {device!r} was revoked by the operator; "
                                 "its requests are refused")
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
                           target_modules=list(cfg.lora.target_modules), layers=cfg.lora.layers),
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
            # a registered key's request spends its nonce first (a replay is refused); a new key's
            # only once it is registered, so a stranger's refused attempts add no nonce rows (and a
            # replay of a refused attempt is refused again, the same way)
            if c.store.device_by_key(request.public_key) is not None:
                _fresh(request, True)
                return co.register(c, req.name, req.public_key, now, req.enrollment_token)
            name = co.register(c, req.name, req.public_key, now, req.enrollment_token)
            _fresh(request, True)
            return name

        return wire.RegisterResponse(device_id=await run_in_threadpool(run))

    @app.post(f"{wire.PREFIX}/checkin", response_model=wire.CheckinResponse, responses=ERRORS, openapi_extra=SIGNED)
    async def checkin(req: wire.CheckinRequest, request: auth.SignedRequest = Depends(signed)) -> wire.CheckinResponse:
        """Report eligibility; get a task in the open round, or when to come back."""
        now = clock()
        e = co.Eligibility(req.eligibility.charging, req.eligibility.idle, req.eligibility.unmetered,
                           req.eligibility.free_memory_mb, req.eligibility.profile)
        out = await as_device(request, lambda device: co.checkin(c, device, e, now))
        if isinstance(out, co.Wait):
            return wire.CheckinResponse(retry_at=out.retry_at, reason=out.reason, done=out.done)
        manifest, signature = co.manifest_for(c, out.version, now)
        task = wire.TaskSpec(
            round_id=out.round_id, round_index=out.idx, seed=out.seed, deadline=out.deadline,
            release=wire.SignedManifest(manifest=manifest, signature=signature),
            privacy=wire.PrivacySpec.from_plan(c.plan) if private else None, **task_fixed,
            evaluate=wire.EvalSpec(max_tokens=cfg.deploy.eval_max_tokens) if out.evaluate else None,
        )
        return wire.CheckinResponse(task=task, retry_at=out.deadline, reason="evaluate" if out.evaluate else "task")

    @app.post(f"{wire.PREFIX}/evaluations/{{round_id}}/report", response_model=wire.Accepted, responses=ERRORS,
              openapi_extra=SIGNED)
    async def eval_report(req: wire.EvalReport, round_id: int = Path(ge=0, le=2**62),
                          request: auth.SignedRequest = Depends(signed)) -> wire.Accepted:
        """One device's federated-evaluation sums, in the clear (evaluations without secure aggregation)."""
        now = clock()
        sums = fedeval.Sums(req.loss_sum, req.tokens, req.top1_hits, req.top3_hits)
        await as_device(request, lambda device: co.eval_report(c, round_id, device, sums, now))
        return wire.Accepted(accepted=True)

    @app.get(f"{wire.PREFIX}/adapters/{{sha256}}", responses={**ERRORS, 200: {"content": {"application/octet-stream": {}}}},
             response_class=Response, openapi_extra=SIGNED)
    async def adapter(sha256: str = Path(pattern=r"^[0-9a-f]{64}$"), request: auth.SignedRequest = Depends(signed)) -> Response:
        """A released global adapter (safetensors); verify its sha256 against the signed manifest."""
        blob = await as_device(request, lambda _: c.store.get_blob(sha256) if operations.is_served(c, sha256) else None)
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
        chunk: FilePath = raw.scope["state"]["pf_chunk"]  # streamed to disk and verified by the Gate
        if chunk.stat().st_size == 0:
            return _error(400, "empty_chunk", "an upload chunk must hold at least one byte")  # type: ignore[return-value]
        now = clock()
        return wire.UploadStatus(received=await as_device(
            request, lambda device: co.receive_chunk(c, round_id, device, offset, chunk, now)))

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
        v = await threaded(operations.released_version, c)  # the frozen one while releases are frozen
        manifest, signature = co.manifest_for(c, v, clock())
        return wire.SignedManifest(manifest=manifest, signature=signature)

    @app.get(f"{wire.PREFIX}/release/key", response_model=wire.ReleaseKey)
    async def release_key() -> wire.ReleaseKey:
        """The release public key (pin it on devices; better, ship it to them out of band)."""
        from pocketfed.signing import public_hex

        return wire.ReleaseKey(public_key=public_hex(c.release_key))

    @app.get(f"{wire.PREFIX}/status", response_model=wire.StatusResponse, responses=ERRORS)
    async def status(authorization: str | None = Header(None)) -> wire.StatusResponse:
        """Rounds, devices and round-level aggregates (no device names, nothing per device), for the
        operator: `Authorization: Bearer <token>` with the token in the state folder's operator.token."""
        operator.check(authorization, token)  # before any work: a refused request reads nothing
        return wire.StatusResponse(**await threaded(co.status, c, clock()))

    from pocketfed.console.routes import mount_console  # /console and its JSON API, for the operator

    mount_console(app, c, token, clock)
    return app
