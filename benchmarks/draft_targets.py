"""Targets for benchmarking draft-model speculation on a CPU with only the default SmolLM2
GGUF at hand: larger models in SmolLM2's tokenizer, so that the real SmolLM2 can draft
for them (benchmarks/speculative.py --draft-model).

  deep:   SmolLM2-135M with `--extra` more layers whose output projections (o_proj,
          down_proj) are zero: each adds a layer's compute and nothing to the residual
          stream, so the target computes SmolLM2's function at (30 + extra) / 30 of its
          layer cost. A draft of SmolLM2 is accepted (nearly) always: an upper bound on
          acceptance at a realistic draft-to-target cost ratio, not a real model pair.
  random: SmolLM2-360M's shape (960 wide, 32 layers) with random weights: a draft's
          tokens are almost never accepted (what the adaptive k must not lose on).

    python benchmarks/draft_targets.py deep /tmp/smollm2-deep --extra 60
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nanovllm_mlx  # noqa: F401  (before mlx: the fast BLAS)
from nanovllm_mlx.loading import loader

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "models/SmolLM2-135M-Instruct-Q4_1"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["deep", "random"])
    ap.add_argument("out", type=Path)
    ap.add_argument("--extra", type=int, default=60, help="deep: layers added")
    ap.add_argument("--source", type=Path, default=SOURCE)
    args = ap.parse_args()
    import mlx.core as mx  # after nanovllm_mlx: its fast BLAS
    import mlx.nn as nn

    smol = loader.load(str(args.source))
    weights = {f"model.{k}": v for k, v in nn.utils.tree_flatten(smol.model.parameters())}
    config = {k: v for k, v in smol.config.items() if not isinstance(v, (dict, list))}
    config["architectures"] = ["LlamaForCausalLM"]
    layers = config["num_hidden_layers"]
    if args.kind == "deep":
        for i in range(layers, layers + args.extra):
            for name in [n for n in weights if n.startswith("model.layers.0.")]:
                w = weights[name]
                zero = name.endswith(("o_proj.weight", "down_proj.weight"))
                weights[name.replace("layers.0.", f"layers.{i}.")] = mx.zeros_like(w) if zero else w
        config["num_hidden_layers"] = layers + args.extra
    else:
        config.update(
            hidden_size=960,
            num_hidden_layers=32,
            num_attention_heads=15,
            num_key_value_heads=5,
            head_dim=64,
            intermediate_size=2560,
        )
        mx.random.seed(0)
        weights = {"model.embed_tokens.weight": 0.02 * mx.random.normal((49152, 960))}
        shapes = {
            "input_layernorm": (960,),
            "post_attention_layernorm": (960,),
            "self_attn.q_proj": (960, 960),
            "self_attn.k_proj": (320, 960),
            "self_attn.v_proj": (320, 960),
            "self_attn.o_proj": (960, 960),
            "mlp.gate_proj": (2560, 960),
            "mlp.up_proj": (2560, 960),
            "mlp.down_proj": (960, 2560),
        }
        for i in range(32):
            for name, shape in shapes.items():
                key = f"model.layers.{i}.{name}.weight"
                norm = len(shape) == 1
                weights[key] = mx.ones(shape) if norm else 0.02 * mx.random.normal(shape)
        weights["model.norm.weight"] = mx.ones((960,))
    args.out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(args.out / "model.safetensors"), weights, metadata={"format": "pt"})
    (args.out / "config.json").write_text(json.dumps(config, indent=1))
    smol.tokenizer.tokenizer.save(str(args.out / "tokenizer.json"))
    tok_config = {"chat_template": smol.tokenizer.chat_template, "add_bos_token": False}
    (args.out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=1))
    print(f"{args.kind} target in {args.out}: {config['num_hidden_layers']} layers")


if __name__ == "__main__":
    main()
