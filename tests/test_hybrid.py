"""Qwen3.5 (hybrid linear attention) through the engine: transformers parity for the dense
and MoE fixtures, and the recurrent-state pool under everything the scheduler does to a
sequence: chunked prefill, continuous batching, preemption, forks, prefix-cache hits that
restore a snapshot, and a failing request bisected out of a batch."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers import SMALL_KV, check_batched_parity, random_ids

from nanovllm_mlx import LLM, SamplingParams
from nanovllm_mlx.engine.runner import model_runner
from nanovllm_mlx.loading.loader import build_model
from nanovllm_mlx.models.gated_delta import chunked, l2_normalize, recurrent_step

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
# Long enough to span several 16-token blocks and the 40-token step budget below.
PROMPTS = [random_ids(n, seed=100 + n) for n in (70, 5, 1, 37, 50)]


def _tokens(llm: LLM, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list:
    return [o["token_ids"] for o in llm.generate(prompts, params)]


@pytest.fixture(scope="module")
def expected(qwen35_tiny: Path) -> list[list[int]]:
    """One prompt at a time, whole prompts, no prefix cache: the reference run."""
    llm = LLM(str(qwen35_tiny), enable_prefix_caching=False, **SMALL_KV)
    return [_tokens(llm, [p])[0] for p in PROMPTS]


@pytest.mark.parametrize(
    ("fixture", "atol"),
    [
        ("qwen35_tiny", 1e-4),
        # The MoE fixture's own float32-vs-float64 noise in transformers is 8e-4 (printed
        # when it is built): routing amplifies rounding.
        ("qwen35_moe_tiny", 1e-3),
        # Fused in_proj_qkvz / in_proj_ba split by sanitize; dense layer 1; noise 4.7e-4.
        ("qwen3_next_tiny", 1e-3),
    ],
)
def test_batched_run_matches_transformers(fixture: str, atol: float, request):
    path = request.getfixturevalue(fixture)
    # A 40-token budget: prompts prefilled in chunks, sharing steps with decodes.
    check_batched_parity(path, PROMPTS[:4], 8, atol=atol, max_num_batched_tokens=40)


def test_spec_declares_the_recurrent_layers(qwen35_tiny: Path):
    llm = LLM(str(qwen35_tiny), **SMALL_KV)
    engine = llm.engine
    assert engine.model_runner.model.spec.state_layers == (0, 2)
    runner = engine.model_runner
    assert len(runner.caches) == 2 and len(runner.states) == 2  # KV pools only where needed
    stats = llm.stats()
    assert stats["state_slots_total"] == engine.config.max_num_seqs
    assert stats["state_snapshots_total"] == engine.config.max_num_seqs
    assert stats["steps_ahead_used"] == 0 and not engine.scheduler.look_ahead


def test_chunked_prefill_and_batching_give_the_same_tokens(qwen35_tiny: Path, expected):
    for budget in (7, 16, 40):
        llm = LLM(str(qwen35_tiny), max_num_batched_tokens=budget, **SMALL_KV)
        assert _tokens(llm, PROMPTS) == expected, f"budget {budget}"
        assert llm.stats()["state_slots_used"] == 0  # every slot back


def test_preemption_recomputes_the_state(qwen35_tiny: Path, expected):
    # 2 KV layers x 2 heads x 16 dims x 16 tokens x K and V x float32 = 8 KiB a block: 10
    # blocks hold about two of these sequences at once.
    per_block = 2 * 2 * 16 * 16 * 2 * 4
    for caching in (False, True):
        tight = LLM(
            str(qwen35_tiny),
            kv_cache_gb=10 * per_block / 2**30,
            max_model_len=160,
            enable_prefix_caching=caching,
            max_num_batched_tokens=24,
        )
        assert tight.engine.block_manager.num_blocks == 10
        assert _tokens(tight, PROMPTS) == expected
        assert tight.stats()["preemptions"] > 0
        assert tight.stats()["state_slots_used"] == 0


def test_a_shared_prefix_is_snapshotted_on_second_sight_then_restored(qwen35_tiny: Path):
    """A system prompt shared by several requests: the first snapshots only the end of its
    own prompt's last block; the second finds 32 tokens of blocks shared but no state
    there, computes them and snapshots that point; the third starts from it."""
    prefix = random_ids(45, seed=7)
    prompts = [prefix + random_ids(3 + 10 * i, seed=8 + i) for i in range(3)]
    cold = LLM(str(qwen35_tiny), enable_prefix_caching=False, **SMALL_KV)
    want = [_tokens(cold, [p])[0] for p in prompts]

    warm = LLM(str(qwen35_tiny), max_num_batched_tokens=64, **SMALL_KV)
    outs = [warm.generate([p], GREEDY)[0] for p in prompts]
    assert [o["num_cached_tokens"] for o in outs] == [0, 0, 32]
    assert warm.stats()["state_snapshots_restored"] == 1
    assert [o["token_ids"] for o in outs] == want


def test_a_chat_turn_resumes_from_the_answer_snapshot(qwen35_tiny: Path):
    """The next turn re-sends the prompt and the answer: the answer's last block boundary,
    snapshotted while it decoded, is where the new prompt starts."""
    prompt = random_ids(20, seed=11)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    warm = LLM(str(qwen35_tiny), **SMALL_KV)
    answer = _tokens(warm, [prompt], params)[0]
    turn = prompt + answer + random_ids(5, seed=12)  # 55 tokens: blocks end at 16, 32, 48
    out = warm.generate([turn], GREEDY)[0]
    assert out["num_cached_tokens"] == 48
    cold = LLM(str(qwen35_tiny), enable_prefix_caching=False, **SMALL_KV)
    assert out["token_ids"] == _tokens(cold, [turn])[0]
    # Decoding kept one snapshot for the answer (its newest), besides the prompt's at 16.
    assert warm.stats()["state_snapshots_cached"] <= 4


def test_no_snapshots_means_no_prefix_hits_for_hybrids(qwen35_tiny: Path):
    llm = LLM(str(qwen35_tiny), state_snapshots=0, **SMALL_KV)
    prompt = random_ids(50, seed=3)
    first = _tokens(llm, [prompt])[0]
    out = llm.generate([prompt], GREEDY)[0]
    assert out["num_cached_tokens"] == 0 and out["token_ids"] == first
    assert llm.stats()["state_snapshots_total"] == 0 and llm.stats()["prefix_hit_tokens"] == 0


def test_few_snapshot_slots_evict_and_stay_correct(qwen35_tiny: Path, expected):
    llm = LLM(str(qwen35_tiny), state_snapshots=2, max_num_batched_tokens=16, **SMALL_KV)
    for _ in range(2):  # the second round hits whatever snapshots survived
        assert _tokens(llm, PROMPTS) == expected
    assert llm.stats()["state_snapshots_cached"] <= 2


def test_forked_choices_copy_the_prompt_state(qwen35_tiny: Path, expected):
    llm = LLM(str(qwen35_tiny), **SMALL_KV)
    n3 = SamplingParams(n=3, temperature=0.0, max_tokens=12, ignore_eos=True)
    for prompt, want in zip(PROMPTS, expected):
        choices = llm.generate([prompt], n3)[0]["outputs"]
        assert [c["token_ids"] for c in choices] == [want] * 3, len(prompt)
    assert llm.stats()["state_slots_used"] == 0


def test_sampled_forks_match_their_single_runs(qwen35_tiny: Path):
    """Choice i of a request seeded s draws as a request seeded s + i: each fork decodes
    from its own copy of the prompt's state, not its parent's live one."""
    prompt = random_ids(33, seed=21)
    llm = LLM(str(qwen35_tiny), **SMALL_KV)
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=10, ignore_eos=True)
    forked = [c["token_ids"] for c in llm.generate([prompt], params)[0]["outputs"]]
    alone = LLM(str(qwen35_tiny), enable_prefix_caching=False, **SMALL_KV)
    singles = [
        SamplingParams(temperature=1.0, seed=5 + i, max_tokens=10, ignore_eos=True)
        for i in range(3)
    ]
    assert forked == [_tokens(alone, [prompt], p)[0] for p in singles]
    assert len({tuple(t) for t in forked}) > 1  # the choices really differ


def test_a_failing_request_leaves_the_others_states_intact(
    qwen35_tiny: Path, expected, monkeypatch: pytest.MonkeyPatch
):
    real = model_runner.sample

    def sample(logits, seqs, *args):  # raises while the graph is built, states rebound
        if any(s.params.seed == 666 and s.num_output_tokens >= 2 for s in seqs):
            raise RuntimeError("injected")
        return real(logits, seqs, *args)

    monkeypatch.setattr(model_runner, "sample", sample)
    llm = LLM(str(qwen35_tiny), **SMALL_KV)
    poison = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, seed=666)
    outs = llm.generate(PROMPTS + [random_ids(9, seed=1)], [GREEDY] * len(PROMPTS) + [poison])
    assert outs[-1]["finish_reason"] == "error"
    assert [o["token_ids"] for o in outs[:-1]] == expected


def test_multimodal_checkpoint_loads_its_text_model(qwen35_tiny: Path, tmp_path: Path):
    """Qwen3.5's Hub repos are multimodal: text_config, model.language_model.* weights, a
    vision tower and an MTP head to leave out."""
    from safetensors.numpy import load_file, save_file

    config = json.loads((qwen35_tiny / "config.json").read_text())
    wrapped = {
        "model_type": "qwen3_5",
        "architectures": ["Qwen3_5ForConditionalGeneration"],
        "text_config": config,
        "vision_config": {"depth": 1},
        "tie_word_embeddings": False,
    }
    (tmp_path / "config.json").write_text(json.dumps(wrapped))
    tensors = load_file(str(qwen35_tiny / "model.safetensors"))
    renamed = {k.replace("model.", "model.language_model.", 1): v for k, v in tensors.items()}
    renamed["model.visual.patch_embed.proj.weight"] = np.zeros((2, 2), dtype=np.float32)
    renamed["mtp.fc.weight"] = np.zeros((2, 2), dtype=np.float32)
    save_file(renamed, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (qwen35_tiny / name).exists():
            (tmp_path / name).write_bytes((qwen35_tiny / name).read_bytes())
    a = _tokens(LLM(str(tmp_path), **SMALL_KV), PROMPTS[:2])
    b = _tokens(LLM(str(qwen35_tiny), **SMALL_KV), PROMPTS[:2])
    assert a == b


def test_bad_configs_are_one_clear_error(qwen35_tiny: Path):
    config = json.loads((qwen35_tiny / "config.json").read_text())
    with pytest.raises(ValueError, match="layer_types"):
        build_model({**config, "layer_types": ["linear_attention", "mamba", "x", "y"]})
    with pytest.raises(ValueError, match="linear_num_value_heads 3"):
        build_model({**config, "linear_num_value_heads": 3})
    with pytest.raises(ValueError, match="rope_type"):
        build_model({**config, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="state_snapshots"):
        LLM(str(qwen35_tiny), state_snapshots=-1)


def test_tensor_parallelism_is_refused_with_one_clear_error(qwen35_tiny: Path):
    import subprocess

    from helpers import REPO_ROOT, SMALL_KV_ARGS, cli_argv

    argv = cli_argv("ask", "-m", str(qwen35_tiny), "-tp", "2", "--no-chat", *SMALL_KV_ARGS)
    proc = subprocess.run([*argv, "hi"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == (
        "error: tensor parallelism is not implemented for qwen3_5_text (hybrid linear "
        "attention): run it with --tensor-parallel-size 1"
    ), proc.stderr
    assert "Traceback" not in proc.stderr


def test_chunked_recurrence_equals_the_token_by_token_one():
    mx.random.seed(0)
    h, n, dk, dv = 3, 150, 8, 6  # 150: two full chunks and a partial one
    q = l2_normalize(mx.random.normal((h, n, dk))) * dk**-0.5
    k = l2_normalize(mx.random.normal((h, n, dk)))
    v = mx.random.normal((h, n, dv))
    g = -mx.exp(mx.random.normal((h, n))) * 0.5
    beta = mx.sigmoid(mx.random.normal((h, n)))
    state = mx.random.normal((h, dk, dv))
    out, final = chunked(q, k, v, g, beta, state)
    s, rows = state[None], []
    for t in range(n):
        o, s = recurrent_step(q[None, :, t], k[None, :, t], v[None, :, t], g[None, :, t],
                              beta[None, :, t], s)  # fmt: skip
        rows.append(o[0])
    np.testing.assert_allclose(np.array(out), np.array(mx.stack(rows, axis=1)), atol=1e-5)
    np.testing.assert_allclose(np.array(final), np.array(s[0]), atol=1e-5)


def test_a_run_of_one_token_stays_finite():
    """Equal keys make the chunk's triangular system as ill-conditioned as it gets (a power
    series of it turned NaN); the blockwise inverse matches the recurrence."""
    h, n, d = 2, 64, 8
    k = l2_normalize(mx.ones((h, n, d)))
    v = mx.random.normal((h, n, d))
    g, beta = -0.01 * mx.ones((h, n)), 0.5 * mx.ones((h, n))
    out, _ = chunked(k * d**-0.5, k, v, g, beta, mx.zeros((h, d, d)))
    s, rows = mx.zeros((1, h, d, d)), []
    for t in range(n):
        o, s = recurrent_step(k[None, :, t] * d**-0.5, k[None, :, t], v[None, :, t],
                              g[None, :, t], beta[None, :, t], s)  # fmt: skip
        rows.append(o[0])
    np.testing.assert_allclose(np.array(out), np.array(mx.stack(rows, axis=1)), atol=1e-5)


def test_repeated_tokens_through_the_engine(qwen35_tiny: Path):
    llm = LLM(str(qwen35_tiny), max_num_batched_tokens=64, **SMALL_KV)
    out = llm.generate([[11] * 200], GREEDY)[0]
    cold = LLM(str(qwen35_tiny), enable_prefix_caching=False, **SMALL_KV)
    assert out["token_ids"] == _tokens(cold, [[11] * 200])[0]


def test_prompt_logprobs_carry_the_state_into_the_step(qwen35_tiny: Path):
    """The prompt-logprobs pass computes a prompt (but its last token) apart from the step:
    the state it leaves is where the step's last token and the decodes go on from."""
    import torch
    from transformers import AutoModelForCausalLM

    prompt = random_ids(41, seed=31)
    llm = LLM(str(qwen35_tiny), max_num_batched_tokens=16, **SMALL_KV)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, prompt_logprobs=0)
    out = llm.generate([prompt], params)[0]
    hf = AutoModelForCausalLM.from_pretrained(str(qwen35_tiny), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0], -1).numpy()
    got = [entry[token] for entry, token in zip(out["prompt_logprobs"][1:], prompt[1:])]
    want = [ref[i, token] for i, token in enumerate(prompt[1:])]
    np.testing.assert_allclose(got, want, atol=1e-4)
    cold = LLM(str(qwen35_tiny), enable_prefix_caching=False, **SMALL_KV)
    assert out["token_ids"] == _tokens(cold, [prompt], SamplingParams(
        temperature=0.0, max_tokens=6, ignore_eos=True))[0]  # fmt: skip


@pytest.mark.parametrize("fixture", ["qwen35_tiny", "qwen3_next_tiny"])
def test_greedy_tokens_match_mlx_lm(fixture: str, request, tmp_path: Path):
    """mlx-lm (the peer) on the same Hub checkpoint decodes the same greedy tokens. Its
    config reader predates transformers 5 (rope_theta and partial_rotary_factor at the
    top level, full_attention_interval instead of layer_types; Qwen3.5 only as the
    multimodal wrapper), so it gets the same model described that way."""
    import shutil

    from mlx_lm import load
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler

    path = request.getfixturevalue(fixture)
    shutil.copytree(path, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    rope = config["rope_parameters"]
    config |= {
        "rope_theta": rope["rope_theta"],
        "partial_rotary_factor": rope["partial_rotary_factor"],
        "full_attention_interval": 2,  # the fixtures' linear/full alternation
    }
    if config["model_type"] == "qwen3_5_text":
        config = {"model_type": "qwen3_5", "text_config": config}
    (tmp_path / "config.json").write_text(json.dumps(config))
    model, _ = load(str(tmp_path))
    prompt = random_ids(37, seed=5)
    steps = generate_step(mx.array(prompt), model, max_tokens=12, sampler=make_sampler(0.0))
    theirs = [int(token) for token, _ in steps]
    assert _tokens(LLM(str(path), **SMALL_KV), [prompt])[0] == theirs


@pytest.fixture(scope="module")
def mlx_community_q4(qwen35_tiny: Path, tmp_path_factory) -> tuple[Path, list[int]]:
    """The dense fixture as mlx-community publishes Qwen3.5: loaded by mlx-lm (as the
    multimodal qwen3_5 it knows), 4-bit quantized and saved by mlx-lm's own functions
    (`language_model.model.*` names, folded norms, [C, K, 1] conv, per-layer scales);
    and mlx-lm's greedy tokens from that quantized model."""
    import shutil

    import mlx_lm.utils as mlx_utils
    from mlx_lm import load
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler

    root = tmp_path_factory.mktemp("mlx-community")
    hf, out = root / "hf", root / "q4"
    shutil.copytree(qwen35_tiny, hf)
    text = json.loads((hf / "config.json").read_text())
    rope = text["rope_parameters"]
    text |= {
        "rope_theta": rope["rope_theta"],
        "partial_rotary_factor": rope["partial_rotary_factor"],
        "full_attention_interval": 2,
    }
    config = {"model_type": "qwen3_5", "text_config": text}
    (hf / "config.json").write_text(json.dumps(config))
    model, _ = load(str(hf))
    model, config = mlx_utils.quantize_model(model, config, group_size=32, bits=4)
    out.mkdir()
    mlx_utils.save_model(out, model)
    mlx_utils.save_config(config, out / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(hf / name, out / name)
    prompt = random_ids(37, seed=5)
    steps = generate_step(mx.array(prompt), model, max_tokens=12, sampler=make_sampler(0.0))
    return out, [int(token) for token, _ in steps]


def test_mlx_community_4bit_weights_decode_as_mlx_lm(mlx_community_q4, tmp_path: Path):
    """Model.sanitize maps mlx-lm's 4-bit Qwen3.5 names and layouts onto ours: the same
    tensors, handed to the loader as a non-MLX file (so that sanitize runs), decode
    mlx-lm's tokens, on the quantized kernels (keep_quantized)."""
    import shutil

    out, theirs = mlx_community_q4
    shutil.copytree(out, tmp_path, dirs_exist_ok=True)
    weights = mx.load(str(out / "model.safetensors"))
    (tmp_path / "model.safetensors.index.json").unlink(missing_ok=True)
    mx.save_safetensors(str(tmp_path / "model.safetensors"), weights, metadata={"format": "pt"})
    llm = LLM(str(tmp_path), keep_quantized=True, **SMALL_KV)
    assert _tokens(llm, [random_ids(37, seed=5)])[0] == theirs


def test_mlx_community_4bit_checkpoint_loads_as_saved(mlx_community_q4):
    out, theirs = mlx_community_q4
    llm = LLM(str(out), keep_quantized=True, **SMALL_KV)
    assert _tokens(llm, [random_ids(37, seed=5)])[0] == theirs
