"""The device's HTTP client: signed requests to the coordinator, over TLS with a pinned CA.

Each method is one request (the upload is a few: resume point, chunks, commit). A 4xx answer
raises `ServerRefused` with the server's error code and sentence; a connection failure raises
`Unreachable`. The device loop (`pocketfed.device.agent`) decides what to do with either.

A client made with `egress` (the device's ledger door, `(kind, payload) -> bytes`) sends the
registration and every check-in as the bytes that door returns, so each is written down before it
leaves; without it (tests, tools) the same JSON is sent unrecorded. `status` is the operator's call
(GET /v1/status with `Authorization: Bearer <operator token>`), not a device's.
"""

from __future__ import annotations

import hashlib
import json
import ssl
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pocketfed import egress as kinds
from pocketfed.errors import UserError
from pocketfed.protocol import auth, wire

Egress = Callable[[str, Mapping[str, Any]], bytes]
"""The device's one door out: (kind, payload) -> the exact bytes to send, recorded first."""


class ServerRefused(Exception):
    def __init__(self, status: int, code: str, detail: str, received: int | None = None):
        super().__init__(f"{status} {code}: {detail}")
        self.status, self.code, self.detail, self.received = status, code, detail, received


class Unreachable(Exception):
    """The server could not be reached (connection refused, TLS failure, timeout), or timed out
    receiving the request (408: its read timeouts, `deploy.read_timeout_s`); the caller retries."""


def connect(url: str, ca: str | Path | None, timeout_s: float = 30.0) -> httpx.Client:
    """An HTTP client for `url` (https with `ca` pinned, or http on loopback for trials)."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise UserError(f"--server must be a URL like https://127.0.0.1:8443, got {url!r}")
    if parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise UserError(f"--server {url!r}: plain http is allowed only on loopback; use https with --ca")
    verify: ssl.SSLContext | bool = False
    if parts.scheme == "https":
        if ca is None:
            raise UserError("--ca is needed for an https server: the CA certificate that signed the server's certificate")
        if not Path(ca).is_file():
            raise UserError(f"CA certificate {str(ca)!r} does not exist (make one with `pocketfed certs --out certs/`)")
        try:
            verify = ssl.create_default_context(cafile=str(ca))
        except ssl.SSLError:
            raise UserError(f"{str(ca)!r} is not a PEM CA certificate") from None
    return httpx.Client(base_url=url.rstrip("/"), verify=verify, timeout=timeout_s)


class DeviceClient:
    def __init__(self, http: httpx.Client, key: Ed25519PrivateKey, egress: Egress | None = None):
        self.http, self.key, self.egress = http, key, egress

    def _request(self, method: str, path_qs: str, body: bytes = b"", content_type: str = "application/json",
                 signed: bool = True, extra: Mapping[str, str] | None = None) -> httpx.Response:
        headers = {"content-type": content_type} if body else {}
        headers.update(extra or {})
        if signed:
            headers.update(auth.sign_headers(self.key, method, path_qs, body))
        try:
            resp = self.http.request(method, path_qs, content=body, headers=headers)
        except httpx.TransportError as e:
            raise Unreachable(f"{type(e).__name__}: {e}") from None
        if resp.status_code == 408:  # the server gave up waiting for this request's bytes: a slow link, retried
            raise Unreachable(f"the server timed out the request: {resp.text[:200]}")
        if resp.status_code >= 400:
            try:
                err = resp.json()
                raise ServerRefused(resp.status_code, str(err.get("error")), str(err.get("detail")), err.get("received"))
            except (ValueError, AttributeError):
                raise ServerRefused(resp.status_code, f"http_{resp.status_code}", resp.text[:200]) from None
        return resp

    def _json(self, method: str, path_qs: str, payload: Any = None, signed: bool = True) -> Any:
        body = json.dumps(payload).encode() if payload is not None else b""
        return self._request(method, path_qs, body, signed=signed).json()

    def _recorded(self, kind: str, path: str, payload: dict[str, Any]) -> Any:
        """POST `payload` as the bytes the egress door returns (it records them first), or as JSON."""
        body = self.egress(kind, payload) if self.egress is not None else json.dumps(payload).encode()
        return self._request("POST", path, body).json()

    def register(self, name: str, enrollment_token: str | None = None) -> str:
        req = wire.RegisterRequest(name=name, public_key=auth.public_hex(self.key), enrollment_token=enrollment_token)
        out = self._recorded(kinds.REGISTRATION, f"{wire.PREFIX}/register", req.model_dump())
        return wire.RegisterResponse.model_validate(out).device_id

    def checkin(self, eligibility: wire.Eligibility) -> wire.CheckinResponse:
        req = wire.CheckinRequest(eligibility=eligibility)
        return wire.CheckinResponse.model_validate(self._recorded(kinds.CHECKIN, f"{wire.PREFIX}/checkin", req.model_dump()))

    def adapter(self, sha256: str) -> bytes:
        """The adapter blob, checked against `sha256` (from a verified manifest)."""
        data = self._request("GET", f"{wire.PREFIX}/adapters/{sha256}").content
        if hashlib.sha256(data).hexdigest() != sha256:
            raise ServerRefused(200, "hash_mismatch", "downloaded adapter does not match the manifest's sha256")
        return data

    def latest_release(self) -> wire.SignedManifest:
        """The newest release's manifest, freshly signed (the device verifies it before use)."""
        return wire.SignedManifest.model_validate(self._json("GET", f"{wire.PREFIX}/release/latest", signed=False))

    def release_key(self) -> str:
        return wire.ReleaseKey.model_validate(self._json("GET", f"{wire.PREFIX}/release/key", signed=False)).public_key

    def status(self, operator_token: str) -> wire.StatusResponse:
        """The coordinator's status: an operator's call, with the token from its state folder
        (`pocketfed.server.operator`), not signed by a device key."""
        resp = self._request("GET", f"{wire.PREFIX}/status", signed=False,
                             extra={"authorization": f"Bearer {operator_token}"})
        return wire.StatusResponse.model_validate(resp.json())

    def upload(self, round_id: int, data: bytes, chunk_bytes: int) -> None:
        """Send `data` in chunks from wherever the server's copy ends (resumable)."""
        base = f"{wire.PREFIX}/rounds/{round_id}/upload"
        offset = wire.UploadStatus.model_validate(self._json("GET", base)).received
        if offset > len(data):
            offset = 0  # the server holds something else: its commit check will say so
        while offset < len(data):
            chunk = data[offset : offset + chunk_bytes]
            try:
                resp = self._request("PUT", f"{base}?offset={offset}", chunk, "application/octet-stream")
                offset = wire.UploadStatus.model_validate(resp.json()).received
            except ServerRefused as e:
                if e.code != "offset_mismatch" or e.received is None:
                    raise
                offset = e.received

    def commit(self, round_id: int, data: bytes, num_tokens: int, metrics: dict[str, float]) -> wire.CommitResponse:
        req = wire.CommitRequest(size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                                 num_tokens=num_tokens, metrics=metrics)
        return wire.CommitResponse.model_validate(self._json("POST", f"{wire.PREFIX}/rounds/{round_id}/commit", req.model_dump()))

    def eval_report(self, round_id: int, body: bytes) -> None:
        """Post a federated-evaluation report in the clear: the ledger's exact bytes (kind eval_report)."""
        self._request("POST", f"{wire.PREFIX}/evaluations/{round_id}/report", body)

    def secagg_state(self, round_id: int) -> wire.SecAggState:
        return wire.SecAggState.model_validate(self._json("GET", f"{wire.PREFIX}/rounds/{round_id}/secagg"))

    def secagg_send(self, round_id: int, kind: str, body: bytes) -> None:
        """Post a step-0/1/3 message (kind: keys, shares, unmask) as the ledger's exact bytes."""
        self._request("POST", f"{wire.PREFIX}/rounds/{round_id}/secagg/{kind}", body, "application/octet-stream")
