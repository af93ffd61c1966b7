"""Shared test fixtures: where the reference data lives, and loaded model stages."""
import os
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FIXTURES = REPO_ROOT.parent / "shared" / "fixtures" / "cosyvoice2-tiny"
DEFAULT_CV3_FIXTURES = REPO_ROOT.parent / "shared" / "fixtures" / "cosyvoice3-tiny"


def fixtures_root(variable: str = "COSYVOICE_FIXTURES", default: Path = DEFAULT_FIXTURES) -> Path:
    """A reference fixture folder (env `variable`). A missing folder fails, never skips."""
    root = Path(os.environ.get(variable, default))
    if not (root / "model").is_dir() or not (root / "reference").is_dir():
        pytest.fail(f"fixture folder {root} is missing or incomplete (needs model/ and reference/); "
                    f"set {variable} to the {default.name} fixture folder", pytrace=False)
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
    """The CosyVoice3 fixture folder (env COSYVOICE3_FIXTURES)."""
    return fixtures_root("COSYVOICE3_FIXTURES", DEFAULT_CV3_FIXTURES)


@pytest.fixture(scope="session")
def cv3_model_dir(cv3_fixture_dir) -> Path:
    return cv3_fixture_dir / "model"


@pytest.fixture(scope="session")
def cv3_reference(cv3_fixture_dir):
    """Like `reference`, for the CosyVoice3 fixture: cv3_reference('flow')['nonstream_mel']."""
    return _npz_loader(cv3_fixture_dir / "reference")


@pytest.fixture(scope="session")
def server(model_dir, fixture_dir):
    """One real `server.py` on 127.0.0.1 for the HTTP, WebSocket and gRPC tests (see server_harness.py)."""
    from server_harness import run_test_server

    with run_test_server(model_dir, fixture_dir, grpc=True) as running:
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
