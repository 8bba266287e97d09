"""pytest fixtures of tests/python: `policy`, each tiny lerobot export (lerobot_fixtures.py)."""
import os

import pytest

from lerobot_fixtures import POLICIES, paths


@pytest.fixture(scope="module", params=POLICIES)
def policy(request):
    for path in paths(request.param).values():
        assert os.path.exists(path), f"{path} is missing: run scripts/make_lerobot_fixtures.sh"
    return request.param


