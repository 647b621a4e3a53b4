"""Random but seeded weights at scales that make greedy tests meaningful, safetensors
writing, and the checks that a built checkpoint is fit for the tests (float32-robust
argmaxes, lossless reload through transformers)."""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .common import log

if TYPE_CHECKING:
    import torch

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


def init_params() -> dict[str, Any]:
    # Read at call time so editing (or monkeypatching) a scale invalidates cached weights.
    return {
        "logit_std": LOGIT_STD,
        "matrix_gain": MATRIX_GAIN,
        "out_proj_gain": OUT_PROJ_GAIN,
        "out_proj_names": list(OUT_PROJ_NAMES),
        "norm_jitter": NORM_JITTER,
        "bias_std": BIAS_STD,
    }


def _generator(seed: int, name: str) -> torch.Generator:
    import torch

    # One stream per tensor name: values do not depend on module iteration order, which
    # transformers is free to change between versions.
    g = torch.Generator()
    g.manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
    return g


def randomize_(model: Any, seed: int) -> None:
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
                elif p.ndim == 3:  # stacked experts [experts, out, in] (MoE models)
                    gain = OUT_PROJ_GAIN if p_name == "down_proj" else MATRIX_GAIN
                    p.copy_(noise * (gain / math.sqrt(p.shape[-1])))
                else:  # Conv1D stores [in, out], nn.Linear [out, in]
                    fan_in = p.shape[0] if isinstance(mod, Conv1D) else p.shape[1]
                    gain = OUT_PROJ_GAIN if mod_name.endswith(OUT_PROJ_NAMES) else MATRIX_GAIN
                    p.copy_(noise * (gain / math.sqrt(fan_in)))


def zero_vocab_padding_(model: Any, real_vocab: int) -> None:
    import torch

    with torch.no_grad():
        model.get_input_embeddings().weight[real_vocab:] = 0
        model.get_output_embeddings().weight[real_vocab:] = 0


def save_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


def probe_ids(vocab: int, seed: int = 0, batch: int = 4, length: int = 24) -> torch.Tensor:
    import torch

    g = torch.Generator()
    g.manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def check_greedy_robust(name: str, model: Any, ids: torch.Tensor) -> None:
    """Greedy tests compare argmaxes across frameworks, so float32 rounding must not flip
    them: the float32 argmax must equal the float64 one at every probe position, and the
    median top-2 gap must be far above rounding noise (a few near-ties are unavoidable)."""
    import copy

    logits = _logits(model, ids)
    double = copy.deepcopy(model).double()
    if getattr(double.config, "_experts_implementation", None) not in (None, "eager"):
        double.set_experts_implementation("eager")  # grouped_mm has no float64 kernel
    exact = _logits(double, ids)
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
    log(
        f"{name}: top-2 gap median {median:.3f}, min {gaps.min().item():.2e}, "
        f"<1e-2 in {frac_small:.1%} of {gaps.numel()} positions, fp32 noise {noise:.1e}"
    )


def assert_loads_identically(
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
def torch_rng_isolated() -> Iterator[None]:
    # Model constructors draw from torch's global RNG; keep the caller's stream unchanged.
    import torch

    with torch.random.fork_rng(devices=[]):
        yield


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
def build_environment() -> Iterator[None]:
    """What every torch-using builder runs under."""
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
