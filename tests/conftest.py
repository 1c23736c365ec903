"""Shared options and fixtures.

The multi-rank tests run their checks inside `deep_ep_py.testing.launch` children: each child function is a
module-level function of a test module, and the whole check sequence of one parametrization runs in one launch
(spawning is the slow part). Children raise AssertionError with the values in the message; the launcher brings
the first failing rank's traceback back as RankFailedError.
"""

from __future__ import annotations

import os
import sys

import pytest

# Children unpickle test functions by module name and get this sys.path: make tests/ (for the brute-force
# helpers) and the repository root (for an uninstalled deep_ep_py) importable in both.
_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
_REPO_ROOT = os.path.dirname(_TESTS_DIR)
for _path in (_REPO_ROOT, _TESTS_DIR):
    if _path not in sys.path:
        sys.path.insert(0, _path)


def pytest_addoption(parser):
    parser.addoption(
        "--deep-ep-backend",
        default=os.environ.get("DEEP_EP_PY_TEST_BACKEND", "reference"),
        help="Buffer backend= the semantics tests construct (default: reference; 'default' passes no backend=)",
    )


@pytest.fixture(scope="session")
def backend(request) -> str:
    """The backend name the semantics tests pass to Buffer(..., backend=); 'default' means pass nothing."""
    return request.config.getoption("--deep-ep-backend")


@pytest.fixture(scope="session")
def launch_timeout_s() -> float:
    return float(os.environ.get("DEEP_EP_PY_TEST_TIMEOUT_S", "180"))
