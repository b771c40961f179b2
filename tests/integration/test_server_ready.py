"""`pocketfed server` says "ready" only once it listens: a client that connects on that line is served."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import httpx
import pytest

from tests.integration.test_http_rounds import free_port

pytestmark = pytest.mark.integration


def test_ready_line_comes_after_the_port_is_bound(tmp_path):
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "400"}
    server = subprocess.Popen([sys.executable, "-m", "pocketfed", "server", "--db", str(tmp_path / "state"),
                               "--port", str(port), "--model", "tiny"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    try:
        assert server.stdout is not None
        lines = []
        for line in server.stdout:  # blocks on the server's own progress, no fixed time limit
            lines.append(line)
            if "ready in" in line:
                break
        assert any("ready in" in x for x in lines), "".join(lines)
        token_file = tmp_path / "state" / "operator.token"  # made on first start, private to its owner
        token = token_file.read_text().strip()
        assert token_file.stat().st_mode & 0o777 == 0o600 and len(token) == 43  # secrets.token_urlsafe(32)
        lines.append(server.stdout.readline())  # the line after "ready" names the token's file, not the token
        assert "operator.token" in lines[-1] and token not in "".join(lines), "".join(lines)
        status = httpx.get(f"http://127.0.0.1:{port}/v1/status", timeout=60,  # no retry: it must answer now
                           headers={"authorization": f"Bearer {token}"})
        assert status.status_code == 200 and status.json()["model"]
        assert httpx.get(f"http://127.0.0.1:{port}/v1/status", timeout=60).status_code == 401

        # a second server on the same port never says ready, and exits non-zero
        with socket.socket() as s:
            s.connect(("127.0.0.1", port))
        second = subprocess.run([sys.executable, "-m", "pocketfed", "server", "--db", str(tmp_path / "state2"),
                                 "--port", str(port), "--model", "tiny"],
                                capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
        assert second.returncode != 0 and "ready in" not in second.stdout
    finally:
        server.kill()
        server.wait()
