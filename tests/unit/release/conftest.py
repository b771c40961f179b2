import pytest
from pf_release_fixtures import Fixtures, get_fixtures


@pytest.fixture(scope="session")
def pf(tmp_path_factory) -> Fixtures:
    return get_fixtures(tmp_path_factory)
