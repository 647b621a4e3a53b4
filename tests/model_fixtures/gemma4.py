"""Gemma 4 text builder (google/gemma-4 conventions at toy size), saved as transformers 5
writes it: sliding and global layers with different head sizes and KV head counts, keys
reused as values on global layers, the last layers sharing earlier layers' KV, per-layer
embeddings, a mixture of experts beside each dense MLP, final logit soft-capping, a tied
head; GPT-2's tokenizer, so its ids stay comparable with the other fixtures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .common import scratch_owner
from .tokenizer import EOT_ID, GPT2_VOCAB, write_gpt2_tokenizer
from .weights import (
    _generator,
    assert_loads_identically,
    check_greedy_robust,
    probe_ids,
    randomize_,
    torch_rng_isolated,
)

NON_CONFIG = ("seed", "transformers")
POST_NORM_GAIN = 4.0


def build_gemma4(out: Path, p: dict[str, Any]) -> None:
    import torch
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    config = Gemma4TextConfig(
        **{k: v for k, v in p.items() if k not in NON_CONFIG},
        bos_token_id=EOT_ID,
        eos_token_id=EOT_ID,
        pad_token_id=0,
    )
    with torch_rng_isolated():
        model = Gemma4ForCausalLM(config)
    randomize_(model, p["seed"])
    with torch.no_grad():
        # Every sub-block's output is RMS-normed before it joins the residual stream, where
        # the scaled embedding (rms ~4 here) would drown it with norm weights ~1: greedy
        # decoding then repeats the prompt's last token whatever the layers do. Post-norm
        # weights ~POST_NORM_GAIN let the layers decide the token.
        for name, param in model.named_parameters():
            if ".post_" in name and name.endswith("norm.weight"):
                param.mul_(POST_NORM_GAIN)
        for name, b in model.named_buffers():  # a buffer, which randomize_ leaves at 1
            if name.endswith("layer_scalar"):
                b.copy_(1 + 0.3 * torch.randn(b.shape, generator=_generator(p["seed"], name)))
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    write_gpt2_tokenizer(out, p["max_position_embeddings"])
    ids = probe_ids(GPT2_VOCAB, length=80)  # past the sliding window
    name = scratch_owner(out.name)
    check_greedy_robust(name, model, ids)
    assert_loads_identically(name, Gemma4ForCausalLM, out, model, ids)
