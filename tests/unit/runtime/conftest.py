import sys
from pathlib import Path

import pytest

# The exports the runtime tests run on are built by the release fixtures (once per session).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "release"))
from pf_release_fixtures import Fixtures, get_fixtures  # noqa: E402


@pytest.fixture(scope="session")
def pf(tmp_path_factory) -> Fixtures:
    return get_fixtures(tmp_path_factory)


@pytest.fixture
def device_home(tmp_path) -> Path:
    """A verified device home on `tiny` (tests/unit/runtime/device_home.py `make_device_home`)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from device_home import make_device_home

    return make_device_home(tmp_path)
