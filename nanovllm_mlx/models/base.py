"""What the engine relies on from a model; every architecture file implements this.

The engine never looks inside a model: it sizes the KV pools from `spec`, calls the model
on a step's flat tokens with the attention metadata, and asks for logits of the rows it
samples. Checkpoint quirks (names, layouts, buffers) stay in each model's `sanitize`.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from nanovllm_mlx.attention.metadata import AttentionMetadata, KVCache


@dataclass(frozen=True, slots=True)
class ModelSpec:
    n_layers: int
    n_kv_heads: int  # KV heads each layer's cache holds
    head_dim: int
    context_length: int  # longest sequence the model serves (positions)
    vocab_size: int  # rows of the logits, padding included
    # Per layer: its sliding window W (the query at p sees keys (p - W, p]) or None for
    # full attention; empty: every layer is full.
    layer_windows: tuple[int | None, ...] = ()
    # Multi-head latent attention: each layer caches one K pool (n_kv_heads 1, head_dim
    # the latent plus the rope key) and no V pool; the keys' first latent_value_dim dims
    # are the values (KVCache.value_dim). None: K and V pools of head_dim each.
    latent_value_dim: int | None = None
    # Layers that keep a recurrent state per sequence instead of K/V (linear attention:
    # Qwen3.5's Gated DeltaNet), and that state's per-slot (conv, recurrent) shapes.
    state_layers: tuple[int, ...] = ()
    state_shapes: tuple[tuple[int, ...], tuple[int, ...]] | None = None

    # The layers pass attention sinks (gpt-oss): the backend must implement them.
    attention_sinks: bool = False

    @property
    def kv_layers(self) -> tuple[int, ...]:
        """The layers with a KV pool: all but the recurrent ones."""
        return tuple(i for i in range(self.n_layers) if i not in self.state_layers)

    @property
    def attention_windows(self) -> tuple[int | None, ...]:
        """The distinct windows, one attention plan each per step."""
        return tuple(dict.fromkeys(self.layer_windows)) if self.layer_windows else (None,)

    @property
    def sliding_window(self) -> int | None:
        """W when every layer slides (blocks older than the widest window can be freed),
        else None."""
        windows = self.attention_windows
        return None if None in windows else max(windows)


def layer_windows(
    layer_types: list[str] | None, sliding_window: int | None, context_length: int
) -> tuple[int | None, ...]:
    """Per-layer windows from transformers' layer_types ("sliding_attention" or
    "full_attention"). A window that covers the whole context is full attention."""
    if not layer_types:
        return ()
    unknown = set(layer_types) - {"sliding_attention", "full_attention"}
    if unknown:
        raise ValueError(f"unsupported attention layer type(s) {sorted(unknown)}")
    if sliding_window is None or sliding_window >= context_length:
        return tuple(None for _ in layer_types)
    return tuple(sliding_window if t == "sliding_attention" else None for t in layer_types)


class CausalLM(nn.Module):
    """A decoder over a paged KV cache: hidden states of flat tokens, then logits."""

    spec: ModelSpec
    # The checkpoint layouts sanitize reads, for the loader's error when none fits.
    layout = "the Hub's ('model.layers.N...'), transformers 5's or mlx-community's"

    def __call__(
        self,
        input_ids: mx.array,
        positions: mx.array,
        caches: list[KVCache],
        meta: AttentionMetadata,
    ) -> mx.array:
        """input_ids, positions [T] (every sequence's new tokens, flat) -> hidden [T, D];
        writes each layer's new K/V into its cache on the way."""
        raise NotImplementedError

    def logits(self, hidden: mx.array) -> mx.array:
        raise NotImplementedError

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Checkpoint tensor names and layouts -> this module's parameters."""
        return weights

    def shard(self, group: mx.distributed.Group) -> None:
        """Keep this rank's part of the weights for tensor parallelism (attention heads and
        MLP columns split across the group's ranks, all_sum after the output projections),
        and update `spec` to the KV heads this rank's cache holds."""
        raise ValueError(
            f"tensor parallelism is not implemented for {type(self).__module__}: "
            "run it with tensor_parallel_size 1"
        )


def check_divides(size: int, **counts: int) -> None:
    """Sharding splits each of these counts across the ranks: they must divide."""
    for name, count in counts.items():
        if count % size:
            raise ValueError(
                f"tensor_parallel_size {size} does not divide the model's {name} ({count}): "
                f"use a size that divides it"
            )
