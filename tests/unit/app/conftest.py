import sys
from pathlib import Path

import pytest

# the verified `tiny` device home the lock's tests use (tests/unit/runtime/device_home.py)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
from device_home import make_device_home  # noqa: E402


@pytest.fixture
def device_home(tmp_path) -> Path:
    return make_device_home(tmp_path)
