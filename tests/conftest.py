"""Shared test fixtures: where the reference data lives, and loaded model stages."""
import os
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FIXTURES = REPO_ROOT.parent / "shared" / "fixtures" / "cosyvoice2-tiny"
DEFAULT_CV3_FIXTURES = REPO_ROOT.parent / "shared" / "fixtures" / "cosyvoice3-tiny"


def fixtures_root() -> Path:
    """The reference fixture folder (env COSYVOICE_FIXTURES). A missing folder fails, never skips."""
    root = Path(os.environ.get("COSYVOICE_FIXTURES", DEFAULT_FIXTURES))
    if not (root / "model").is_dir() or not (root / "reference").is_dir():
        pytest.fail(f"fixture folder {root} is missing or incomplete (needs model/ and reference/); "
                    "set COSYVOICE_FIXTURES to the cosyvoice2-tiny fixture folder", pytrace=False)
    return root


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    return fixtures_root()


@pytest.fixture(scope="session")
def model_dir(fixture_dir) -> Path:
    return fixture_dir / "model"


@pytest.fixture(scope="session")
def reference(fixture_dir):
    """Loads reference/<name>.npz as a dict of arrays: reference('flow')['nonstream_mel']."""
    return _npz_loader(fixture_dir / "reference")


def _npz_loader(folder: Path):
    """load(name) -> the arrays of folder/<name>.npz as a dict, read once."""
    cache = {}

    def load(name: str) -> dict:
        if name not in cache:
            with np.load(folder / f"{name}.npz") as data:
                cache[name] = {key: data[key] for key in data.files}
        return cache[name]

    return load


@pytest.fixture(scope="session")
def cv3_fixture_dir() -> Path:
    """The CosyVoice3 fixture folder (env COSYVOICE3_FIXTURES). Tests using it skip when the default
    folder is absent, and fail when COSYVOICE3_FIXTURES names a folder that is missing or incomplete."""
    configured = os.environ.get("COSYVOICE3_FIXTURES")
    root = Path(configured or DEFAULT_CV3_FIXTURES)
    if not (root / "model").is_dir() or not (root / "reference").is_dir():
        message = f"CosyVoice3 fixture folder {root} is missing or incomplete (needs model/ and reference/)"
        if configured:
            pytest.fail(message, pytrace=False)
        pytest.skip(message + "; set COSYVOICE3_FIXTURES to the cosyvoice3-tiny fixture folder")
    return root


@pytest.fixture(scope="session")
def cv3_model_dir(cv3_fixture_dir) -> Path:
    return cv3_fixture_dir / "model"


@pytest.fixture(scope="session")
def cv3_reference(cv3_fixture_dir):
    """Like `reference`, for the CosyVoice3 fixture: cv3_reference('flow')['nonstream_mel']."""
    return _npz_loader(cv3_fixture_dir / "reference")


@pytest.fixture(scope="session")
def server(model_dir, fixture_dir):
    """One real `server.py` on 127.0.0.1 for the HTTP tests (see server_harness.py)."""
    from server_harness import run_test_server

    with run_test_server(model_dir, fixture_dir) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    """An httpx client of the shared server, with its API key."""
    with server.client() as http:
        yield http


def report_error(stage: str, actual, expected) -> tuple[float, float]:
    """Prints and returns the max absolute and max relative error of one comparison."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{stage}: shape {actual.shape} != {expected.shape}"
    abs_err = float(np.max(np.abs(actual - expected))) if actual.size else 0.0
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    rel_err = abs_err / scale if scale > 0 else abs_err
    print(f"[parity] {stage}: max_abs_err={abs_err:.3e} max_rel_err={rel_err:.3e}")
    return abs_err, rel_err
