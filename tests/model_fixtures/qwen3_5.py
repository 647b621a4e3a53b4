"""Qwen3.5 builders (dense and MoE text models, transformers 5's config and layout):
Gated DeltaNet layers interleaved with gated full attention, partial rotary, (1 + w)
norms; the MoE one with fused experts and a gated shared expert. Qwen3-Next: the same
layers with fused q/k/v/z and b/a projections, dense and sparse layers. ChatML tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .causal_lm import NON_CONFIG_PARAMS, build_causal_lm
from .qwen2 import write_qwen_tokenizer
from .tokenizer import EOT_ID, GPT2_VOCAB


def _slow_decay(model: Any) -> None:
    """Decay rates of a few percent a token (A in [0.005, 0.05]): the generic 1-D init
    (A ~ e) forgets within a couple of tokens, and a state that carries nothing across a
    block boundary would let a broken state pool pass the tests."""
    import torch

    g = torch.Generator().manual_seed(35)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("A_log"):
                param.copy_(torch.empty(param.shape).uniform_(0.005, 0.05, generator=g).log())


def _build(out: Path, p: dict[str, Any], config_name: str, cls_name: str) -> None:
    import transformers

    kwargs = {k: v for k, v in p.items() if k not in NON_CONFIG_PARAMS}
    config = getattr(transformers, config_name)(
        **kwargs, bos_token_id=EOT_ID, eos_token_id=EOT_ID + 2
    ).to_dict()
    config["architectures"] = [cls_name]
    build_causal_lm(
        out,
        p,
        cls_name=cls_name,
        classic_config=config,
        generation_config={"bos_token_id": EOT_ID, "eos_token_id": [EOT_ID + 2, EOT_ID]},
        real_vocab=GPT2_VOCAB + 2,
        tweak=_slow_decay,
    )
    write_qwen_tokenizer(out, p)


def build_qwen3_5(out: Path, p: dict[str, Any]) -> None:
    _build(out, p, "Qwen3_5TextConfig", "Qwen3_5ForCausalLM")


def build_qwen3_5_moe(out: Path, p: dict[str, Any]) -> None:
    _build(out, p, "Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM")


def build_qwen3_next(out: Path, p: dict[str, Any]) -> None:
    _build(out, p, "Qwen3NextConfig", "Qwen3NextForCausalLM")
