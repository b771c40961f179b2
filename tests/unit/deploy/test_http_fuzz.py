"""Property-based fuzzing of the coordinator's HTTP API against its own OpenAPI spec: no 5xx.

Requests are signed by a registered device (a requests auth hook), so the fuzzer reaches the
handlers behind authentication, not just the 401 in front of them.
"""

from __future__ import annotations

import pytest
import requests
import schemathesis
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from pocketfed.protocol import auth
from pocketfed.device.http_client import DeviceClient
from pocketfed.server import coordinator as co
from tests.unit.deploy.http_fixtures import OK, app_for, make_coordinator

KEY = Ed25519PrivateKey.generate()


class Sign(requests.auth.AuthBase):
    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        body = r.body if isinstance(r.body, bytes) else (r.body or "").encode()
        r.headers.update(auth.sign_headers(KEY, r.method or "GET", r.path_url, body))
        return r


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    c = make_coordinator(tmp_path_factory.mktemp("fuzz"))
    app = app_for(c)
    d = DeviceClient(TestClient(app), KEY)
    d.register("fuzzer", co.enroll(c.store)[0])
    d.checkin(OK)  # an open round with this device assigned
    return app


def test_no_server_errors(app):
    """Every operation, a bounded number of generated requests each (the schemathesis pytest
    plugin is not used: it does not run under this pytest)."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    session = requests.Session()
    session.auth = Sign()
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 9

    for op in operations:
        @given(case=op.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def fuzz(case):
            case.call_and_validate(session=session, checks=[not_a_server_error])

        fuzz()
