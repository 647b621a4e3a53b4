"""GGUF files: weights, an HF-style config and the tokenizer, all from one file."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from nanovllm_mlx.loading.gguf.config import config_from_metadata
from nanovllm_mlx.loading.gguf.reader import read_gguf
from nanovllm_mlx.loading.gguf.tokenizer import tokenizer_from_metadata
from nanovllm_mlx.loading.gguf.weights import map_weights
from nanovllm_mlx.loading.tokenizer import Tokenizer


def read_model(path: Path) -> tuple[dict[str, mx.array], dict, Tokenizer]:
    """(weights in the model's names, HF-style config, tokenizer) of a GGUF file."""
    weights, metadata = read_gguf(path)
    config = config_from_metadata(metadata, set(weights), path)
    tokenizer = tokenizer_from_metadata(metadata, path)
    weights, extra = map_weights(weights, config)
    return weights, {**config, **extra}, tokenizer
