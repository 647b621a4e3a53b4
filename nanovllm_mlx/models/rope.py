"""Rotary position embeddings: frequencies for every scaling transformers knows that we
support, and their application to a step's flat tokens."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


def rope_type(scaling: dict | None) -> str:
    if not scaling:
        return "default"
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"unsupported rope scaling type {kind!r} (supported: {ROPE_TYPES})")
    return kind


def rope_inv_freq(
    head_dim: int,
    base: float,
    scaling: dict | None = None,
    max_position_embeddings: int | None = None,
    freq_factors: list[float] | None = None,
) -> tuple[np.ndarray, float]:
    """Inverse frequencies [head_dim / 2] and the attention factor, computed in float32 the
    way transformers' ROPE_INIT_FUNCTIONS do, so positions rotate identically.

    freq_factors: per-frequency divisors, which GGUF files of Llama 3.1+ carry instead of
    the rope_scaling parameters they were computed from (tensor rope_freqs.weight)."""
    dim = head_dim
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    pos_freqs = np.power(np.float32(base), exponents, dtype=np.float32)
    inv_freq = (np.float32(1.0) / pos_freqs).astype(np.float32)
    scaling = scaling or {}
    kind = rope_type(scaling)
    attention_factor = 1.0
    if kind == "linear":
        inv_freq = inv_freq / np.float32(scaling["factor"])
    elif kind == "dynamic":
        # Dynamic NTK only changes the base past max_position_embeddings, which is also
        # where the engine caps the context: inside it, this is the plain rotation.
        pass
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = (2 * math.pi / inv_freq).astype(np.float32)
        scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(factor), inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    elif kind == "yarn":
        inv_freq, attention_factor = _yarn(scaling, dim, base, max_position_embeddings, pos_freqs)
    if freq_factors is not None:
        factors = np.asarray(freq_factors, dtype=np.float32)
        if factors.shape != inv_freq.shape:
            raise ValueError(
                f"rope_freq_factors has {factors.size} entries, expected {inv_freq.size}"
            )
        inv_freq = inv_freq / factors
    return inv_freq.astype(np.float32), float(attention_factor)


def _yarn(
    scaling: dict,
    dim: int,
    base: float,
    max_position_embeddings: int | None,
    pos_freqs: np.ndarray,
) -> tuple[np.ndarray, float]:
    original = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or (max_position_embeddings or original) / original

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero in the ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = (1 - ramp).astype(np.float32)
    inv_extra = np.float32(1.0) / pos_freqs
    inv_inter = np.float32(1.0) / (np.float32(factor) * pos_freqs)
    inv_freq = inv_inter * (1 - extrapolation) + inv_extra * extrapolation
    return inv_freq.astype(np.float32), attention_factor


class RotaryEmbedding:
    """Rotates q or k of flat tokens, each at its own position ("rotate half" layout).

    Not an nn.Module: its periods are not parameters, so loading and casting never touch
    them."""

    def __init__(self, head_dim: int, inv_freq: np.ndarray, traditional: bool = False):
        self.head_dim = head_dim
        # traditional: rotate adjacent pairs (x0, x1), (x2, x3), ... as DeepSeek's
        # interleaved rope weights expect, instead of the two halves.
        self.traditional = traditional
        # mx.fast.rope takes periods (position / period is the angle), not inverse frequencies.
        self._periods = mx.array(1.0 / inv_freq.astype(np.float64), dtype=mx.float32)

    def __call__(self, x: mx.array, positions: mx.array) -> mx.array:
        """x [T, H, 1, D], positions [T] -> [T, H, D]. The size-1 axis makes each flat token
        its own "batch" row with its own offset."""
        x = mx.fast.rope(
            x,
            self.head_dim,
            traditional=self.traditional,
            base=None,
            scale=1.0,
            offset=positions,
            freqs=self._periods,
        )
        return x.squeeze(2)  # one op; x[:, :, 0, :] is a slice and a squeeze
