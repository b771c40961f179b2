"""The operator's credential: one random bearer token, kept in the coordinator's state folder.

    first start   <state>/operator.token = secrets.token_urlsafe(32) (256 bits from the OS CSPRNG),
                  created with mode 0600; the startup log names the file, never its content
    a request     `Authorization: Bearer <token>`, compared in constant time (hmac.compare_digest)
                  -> AuthError (401) when it is missing, malformed or wrong

Who holds the file can read the coordinator's status (and, later, drive its console); devices
never need it: they sign their requests with their own Ed25519 keys (`pocketfed.protocol.auth`).
A token rather than a key pair because the operator reads it on the server's own machine (or copies
it once), and a constant-time string compare is the whole check.
"""

from __future__ import annotations

import hmac
import re
import secrets
from pathlib import Path

from pocketfed.errors import UserError
from pocketfed.files import write_atomic
from pocketfed.protocol.auth import AuthError

TOKEN_FILE = "operator.token"
TOKEN = re.compile(r"^[A-Za-z0-9_-]{43,128}$")  # token_urlsafe(32) is 43 characters
MISSING, WRONG = "operator_auth_required", "operator_auth_refused"


def token_path(folder: Path) -> Path:
    return Path(folder) / TOKEN_FILE


def load_or_create(folder: Path) -> str:
    """The operator token of the state in `folder`, created (mode 0600) on first use."""
    path = token_path(folder)
    if not path.is_file():
        write_atomic(path, secrets.token_urlsafe(32) + "\n", mode=0o600)
    return read(path)


def read(path: Path) -> str:
    """The token in `path` (an operator's copy of `<state>/operator.token`); UserError if unusable."""
    try:
        token = Path(path).expanduser().read_text().strip()
    except OSError:
        raise UserError(f"operator token file {str(path)!r} cannot be read; it is <state>/{TOKEN_FILE}, "
                        "written by `pocketfed server --db <state>` on its first start") from None
    if not TOKEN.fullmatch(token):
        raise UserError(f"{str(path)!r} does not hold an operator token (43-128 letters, digits, - or _)")
    return token


def check(authorization: str | None, token: str) -> None:
    """Accept `Authorization: Bearer <token>`; raise AuthError (401) otherwise. The compare takes the
    same time wherever the first wrong character is, so timing does not reveal a prefix."""
    if not authorization:
        raise AuthError(MISSING, "this route needs the operator token: send 'Authorization: Bearer <token>' "
                                 f"with the token from the coordinator's <state>/{TOKEN_FILE}")
    scheme, _, given = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise AuthError(WRONG, f"the operator token is wrong (it is the content of <state>/{TOKEN_FILE})")
