"""The CUDA paged decode kernel over quantized KV pools (attention/cuda.py, cuda_source.py):
on a GPU, against the gather path reading the same pools (int8, int4, K and V formats
mixed, GQA groups, sliding windows, block sizes, partial blocks, half and full precision)
and engine against engine; everywhere, the launcher's Python side (the template constants
each pool gets, the q and output turning, what decode passes the kernel) through
recording stand-ins for mx.fast.cuda_kernel, and, where nvcc is installed, the wrapped
sources compiled for an H100 (tools/check_cuda_source.py). The kernel's row reader on the
host: tests/test_cuda_row_reader.py."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from helpers import KV_FORMATS, filled_cache, kernel_and_gather, random_ids, random_tables

from nanovllm_mlx import LLM, SamplingParams
from nanovllm_mlx.attention import cuda as cuda_attention
from nanovllm_mlx.attention import cuda_decode, cuda_formats, kv_quant, select_backend
from nanovllm_mlx.attention.attend import _attend
from nanovllm_mlx.attention.gather import GatherAttention
from nanovllm_mlx.attention.kv_cache import KVCache
from nanovllm_mlx.attention.kv_quant import INT4, INT8, KVFormat, hadamard, resolve

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "check_cuda_source.py"
GPU = pytest.mark.skipif(not cuda_attention.available(), reason="needs MLX's CUDA backend")


def _format(name: str, dtype: mx.Dtype) -> KVFormat:
    return KV_FORMATS[name] if name in KV_FORMATS else resolve(name, dtype)


@cache
def _tool() -> Any:
    """tools/check_cuda_source.py, whose recording() stands in for mx.fast.cuda_kernel."""
    spec = importlib.util.spec_from_file_location("check_cuda_source", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass resolves its annotations there
    spec.loader.exec_module(module)
    return module


# (K format, V format, compute dtype, (heads, kv heads, head_dim), block size, window,
# unroll). "auto" is a float pool in the compute dtype.
KERNEL_CASES = [
    ("int8", "int8", "float16", (32, 8, 128), 16, None, 2),  # Llama 3's shape
    ("int8", "int8", "bfloat16", (32, 8, 128), 16, None, 2),
    ("int8", "int8", "float32", (32, 8, 128), 16, None, 2),
    ("int4", "int4", "float16", (32, 8, 128), 16, None, 2),
    ("int4", "int4", "bfloat16", (32, 8, 128), 16, None, 2),
    ("int8", "auto", "float16", (32, 8, 128), 16, None, 2),  # one pool float
    ("auto", "int4", "bfloat16", (32, 8, 128), 16, None, 2),
    ("int4", "int8", "float16", (32, 8, 128), 16, None, 2),
    ("int8", "int4", "bfloat16", (32, 8, 128), 16, None, 2),
    ("float16", "int8", "bfloat16", (32, 8, 128), 16, None, 2),  # float pool != compute
    ("int8", "int4", "float16", (12, 12, 64), 16, None, 2),  # no grouping
    ("int4", "int8", "bfloat16", (16, 1, 128), 16, None, 2),  # 2 blocks a KV head
    ("int8", "int4", "bfloat16", (4, 1, 256), 16, None, 2),  # Gemma 3's heads
    ("int4", "int4", "float16", (9, 3, 64), 16, None, 2),  # a group of 3
    ("int4", "int8", "float16", (7, 7, 80), 16, None, 2),  # lanes past the row
    ("int4", "int4", "bfloat16", (8, 2, 96), 16, None, 2),  # int4's group = the row
    ("int8", "int8", "float16", (32, 8, 128), 16, 100, 2),  # sliding window
    ("int4", "auto", "bfloat16", (9, 3, 64), 16, 100, 2),
    ("int8", "int4", "float16", (32, 8, 128), 32, None, 2),  # block sizes
    ("int4", "int8", "bfloat16", (32, 8, 128), 8, 100, 2),
    ("int8", "int8", "float16", (32, 8, 128), 16, None, 1),  # unrolls
    ("int4", "int8", "float16", (32, 8, 128), 16, None, 3),
    ("a8", "s4", "float16", (32, 8, 128), 16, None, 2),  # the other KVFormat layouts
    ("s8", "a8", "bfloat16", (7, 7, 80), 16, 100, 2),
]


@GPU
@pytest.mark.parametrize("turns", [False, True], ids=["turned-around", "turned-inside"])
@pytest.mark.parametrize(
    "vector,keys", [(False, 1), (True, 1), (True, None)], ids=["strided", "vector-onekey", "vector"]
)
@pytest.mark.parametrize("k,v,dtype,shape,bs,window,unroll", KERNEL_CASES)
def test_cuda_kernel_reads_quantized_pools_as_the_gather_path_does(
    monkeypatch: pytest.MonkeyPatch,
    turns: bool,
    k: str,
    v: str,
    dtype: str,
    shape: tuple[int, int, int],
    bs: int,
    window: int | None,
    unroll: int,
    vector: bool,
    keys: int | None,
):
    """The same pools read by both: only float rounding differs (the gather path
    dequantizes in float32 here, the kernel in registers), not the quantization error.
    turns: q and the output turned by the kernel (cuda_formats.turns_in_kernel) or by
    two products around it."""
    monkeypatch.setattr(cuda_formats, "TURNS_IN_KERNEL", turns)
    compute = getattr(mx, dtype)
    n_heads, n_kv, head_dim = shape
    formats = (_format(k, compute), _format(v, compute))
    contexts = [1, 15, 16, 17, 300, 1024, 5, 700, 2 * bs + 3]  # partial and whole blocks
    num_blocks = sum(-(-c // bs) for c in contexts) + 8
    cache, _ = filled_cache(formats, n_kv, num_blocks, bs, head_dim)
    rng = np.random.default_rng(1)
    tables = random_tables(rng, contexts, bs, num_blocks)
    q = mx.array(rng.standard_normal((len(contexts), n_heads, head_dim))).astype(compute)
    got, want = kernel_and_gather(
        q, cache, tables, contexts, window, unroll=unroll, vector_loads=vector, keys=keys
    )
    # Half precision: q and the output are turned (and rounded) in it, on top of the
    # rounding the float kernel's own test allows (tests/test_attention.py).
    tol = {"float32": 2e-3, "float16": 2e-2, "bfloat16": 3e-2}[dtype]
    np.testing.assert_allclose(got, want, atol=tol, rtol=tol)


@GPU
@pytest.mark.parametrize("k,v", [("int8", "int8"), ("int4", "int8"), ("auto", "int4")])
def test_an_engine_on_the_kernel_decodes_what_one_on_the_gather_path_does(
    gpt2_tiny: Path, monkeypatch, k: str, v: str
):
    """Same quantized pools, same greedy tokens and logprobs: decode through the kernel
    against decode through the gather path (fused SDPA), on one model."""
    prompts = [random_ids(n, seed=n) for n in (5, 40, 77)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=True)

    def run() -> tuple[list[dict[str, Any]], type]:
        llm = LLM(str(gpt2_tiny), kv_cache_dtype_k=k, kv_cache_dtype_v=v, kv_cache_gb=0.01)
        return llm.generate(prompts, params), type(llm.engine.model_runner.backend)

    # gpt2-tiny: MLX 0.32's CUDA rope kernel fails on head_dim 16, which llama-tiny has.
    monkeypatch.setenv("NANOVLLM_KV_QUANT_KERNEL", "1")
    kernel, kernel_backend = run()
    monkeypatch.setattr(cuda_attention, "available", lambda: False)
    gather, gather_backend = run()
    assert kernel_backend is cuda_attention.CudaPagedAttention
    assert gather_backend is GatherAttention
    # The kernel dequantizes into float32 registers, the gather path into float16 arrays
    # (the engine's dtype on a GPU): one logprob of 72 differed by 2.3e-3 on an H100.
    for a, b in zip(kernel, gather):
        assert a["token_ids"] == b["token_ids"]
        np.testing.assert_allclose(a["logprobs"], b["logprobs"], atol=5e-3)


@pytest.mark.parametrize("name", ["auto", "float16", "int8", "int4", "a8", "s4", "s8"])
@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_each_pool_gets_the_template_constants_of_its_layout(name: str, head_dim: int):
    fmt = _format(name, mx.bfloat16)
    cache = KVCache.allocate((fmt, fmt), 2, 8, head_dim, 4)
    got = dict(cuda_formats.pool_template("K", cache.k, cache.k_scales, fmt, head_dim))
    codes = {"int8": mx.int8, "s8": mx.int8, "int4": mx.uint8, "a8": mx.uint8, "s4": mx.uint8}
    floats = {"auto": mx.bfloat16, "float16": mx.float16}
    assert got["KT"] == (codes | floats)[name]
    assert got["KB"] == {"int8": 8, "a8": 8, "s8": 8, "int4": 4, "s4": 4}.get(name, 0)
    assert got["KA"] is (name in ("int4", "a8"))
    # The values one scale covers: the format's group where it divides head_dim, else the
    # whole row (int4's 64 at head_dim 80); float pools: the row (never read).
    group = {"int4": 64, "a8": 64, "s8": 32}.get(name, head_dim)
    assert got["KG"] == (group if head_dim % group == 0 else head_dim)
    assert set(got) == {"KT", "KB", "KA", "KG"}
    # A float pool needs no scales; the template never depends on which head it is.
    assert dict(cuda_formats.pool_template("V", cache.v, cache.v_scales, fmt, head_dim)) == {
        "V" + key[1:]: value for key, value in got.items()
    }


def test_a_pool_the_kernel_cannot_read_is_one_clear_error():
    cache = KVCache.allocate((INT8, INT4), 2, 8, 64, 4)
    template = cuda_formats.pool_template
    with pytest.raises(ValueError, match="cannot read this int8 pool.*scales missing"):
        template("K", cache.k, None, INT8, 64)
    with pytest.raises(ValueError, match="cannot read this int4 pool"):
        template("K", cache.k, cache.k_scales, INT4, 64)  # int8 codes as int4's
    with pytest.raises(ValueError, match="cannot read this int4 pool"):
        template("V", cache.v, cache.v_scales, INT4, 128)  # another head_dim
    with pytest.raises(ValueError, match="cannot read this int8 pool"):
        template("K", cache.k, cache.k_scales.astype(mx.float16), INT8, 64)
    with pytest.raises(ValueError, match="cannot read this int8 pool"):
        template("K", cache.k, cache.k_scales[:, :4], INT8, 64)  # scales of fewer slots
    with pytest.raises(ValueError, match="reads float pools of width 64"):
        template("K", cache.k, None, None, 64)  # codes without their format
    with pytest.raises(ValueError, match="reads float pools of width 32"):
        template("K", mx.zeros((2, 8, 64)), None, None, 32)
    with pytest.raises(ValueError, match="cannot read this x3 pool"):
        template("K", cache.k, cache.k_scales, KVFormat("x3", bits=3), 64)


@pytest.mark.parametrize(
    "kv", [(INT8, INT8), (INT4, INT4), (INT8, None), (None, INT4), (INT4, INT8)]
)
def test_turning_q_and_the_output_equals_attending_the_unturned_rows(kv):
    """What paged_decode does around the kernel for rotated formats: attention over the
    rows as stored (turned), with q turned first (keys) and the output after (values),
    equals attention over the rows turned back. None: a float pool."""
    d = 64
    formats = tuple(f or resolve("auto", mx.float32) for f in kv)
    cache, layout = filled_cache(formats, 2, 6, 4, d)  # type: ignore[arg-type]
    rows = layout.block_rows(np.array([[4, 1, 0], [2, 5, 3]]))
    q = mx.array(np.random.default_rng(2).standard_normal((2, 1, 8, d)).astype(np.float32))
    stored = [cache.read_blocks(w, rows, 2, mx.float32, rotated=True) for w in (0, 1)]
    plain = [cache.read_blocks(w, rows, 2, mx.float32) for w in (0, 1)]
    turn_k, turn_v = (f is not None and f.rotate for f in kv)
    assert cache.rotated == (turn_k, turn_v)
    args = (None, 0.125, None, False, False, None)
    got = kv_quant.turn(_attend(kv_quant.turn(q, turn_k), *stored, *args), turn_v)
    want = _attend(q, *plain, *args)
    # float32 matmuls on a GPU run in TF32 (~1e-3 relative): 1.2e-3 apart on an H100.
    tol = 2e-5 if mx.default_device() == mx.cpu else 4e-3
    np.testing.assert_allclose(np.array(got), np.array(want), atol=tol)
    if turn_k or turn_v:  # not vacuous: the rows as stored differ from the plain ones
        assert not np.allclose(np.array(_attend(q, *stored, *args)), np.array(want), atol=1e-3)
    # The turn is the formats' own transform, built in the compute dtype with its data.
    h = kv_quant._hadamard_in(d, mx.bfloat16)
    assert h.dtype == mx.bfloat16
    np.testing.assert_allclose(np.array(h.astype(mx.float32)), np.array(hadamard(d)), atol=4e-3)


@pytest.mark.parametrize("in_kernel", [True, False])
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_decode_hands_the_kernel_the_pools_scales_and_turns(dtype, in_kernel, monkeypatch):
    """CudaPagedAttention.decode on a quantized cache, the kernel recorded instead of
    run: what the GPU would get, checked on any machine. The turns of q and the output
    are the kernel's (RQ, RO), or with NANOVLLM_KERNEL_TURNS=0 two products around it."""
    monkeypatch.setattr(cuda_formats, "TURNS_IN_KERNEL", in_kernel)
    tool = _tool()
    cache, _ = filled_cache((INT8, INT4), 2, 8, 16, 128)
    q = mx.array(np.random.default_rng(3).standard_normal((3, 8, 128))).astype(dtype)
    plan = cuda_attention.DecodePlan(
        mx.array([[0, 1], [2, 3], [4, 5]], dtype=mx.int32), mx.array([17, 3, 32]), 32
    )
    with mx.stream(mx.cpu), tool.recording() as launches:
        out = cuda_attention.CudaPagedAttention().decode(q, cache, plan, 0.1)
        mx.eval(out)
    partial, merge = launches
    assert out.shape == (3, 8, 128) and out.dtype == dtype
    template = dict(partial.template)
    assert (template["KT"], template["KB"], template["KA"], template["KG"]) == (
        mx.int8, 8, False, 128
    )  # fmt: skip
    assert (template["VT"], template["VB"], template["VA"], template["VG"]) == (
        mx.uint8, 4, True, 64
    )  # fmt: skip
    assert (template["T"], template["G"], template["GB"]) == (dtype, 4, 4)
    assert template["RQ"] == int(in_kernel)
    assert merge.template == (("T", dtype), ("D", 128), ("RO", int(in_kernel)))
    inputs = dict(zip(partial.input_names, partial.inputs))
    assert inputs["k_pool"] is cache.k and inputs["v_pool"] is cache.v
    assert inputs["k_scales"] is cache.k_scales and inputs["v_scales"] is cache.v_scales
    assert "const int8_t* k_pool" in partial.source and "const uint8_t* v_pool" in partial.source
    if in_kernel:
        assert inputs["q"] is q
        return
    turned = q @ mx.array(np.asarray(hadamard(128)), dtype=dtype)
    assert inputs["q"].dtype == dtype
    # The same product, though not bit for bit on a GPU (another matmul kernel's order).
    np.testing.assert_allclose(
        np.array(inputs["q"].astype(mx.float32)),
        np.array(turned.astype(mx.float32)),
        atol=0 if mx.default_device() == mx.cpu else 1e-2,
    )


@pytest.mark.parametrize("vector_loads", [True, False])
def test_the_kernel_turns_rows_it_can_lay_out(vector_loads, monkeypatch):
    monkeypatch.setattr(cuda_formats, "TURNS_IN_KERNEL", True)
    # paged_turn's butterfly needs a lane's consecutive dims to be a power of two of them.
    assert cuda_formats.turns_in_kernel(128, vector_loads)
    assert cuda_formats.turns_in_kernel(96, vector_loads) is not vector_loads


def test_two_keys_side_by_side_only_where_a_row_splits_over_16_lanes_evenly(monkeypatch):
    monkeypatch.setattr(cuda_formats, "KEYS", "2")
    assert [cuda_formats.keys_side_by_side(d, True) for d in (64, 80, 96, 128, 256)] == [
        2,
        1,
        1,
        2,
        1,
    ]
    assert cuda_formats.keys_side_by_side(128, False) == 1
    monkeypatch.setattr(cuda_formats, "KEYS", "1")  # NANOVLLM_KERNEL_KEYS=1
    assert cuda_formats.keys_side_by_side(128, True) == 1
    # Asked for outright where the layout cannot take it: an error, not a misread.
    q = mx.zeros((1, 4, 128))
    pool = mx.zeros((1, 16, 128))
    with pytest.raises(ValueError, match="keys side by side"):
        cuda_decode.paged_decode(
            q,
            pool,
            pool,
            mx.zeros((1, 1), mx.int32),
            mx.ones((1,), mx.int32),
            16,
            0.1,
            1,
            vector_loads=False,
            keys=2,
        )


def test_a_launch_layout_kept_for_a_shape_follows_the_switches(monkeypatch):
    """paged_decode keeps each shape's template (every layer of every step asks): a
    second launch gets the same one, and a switch changed in between (the environment's,
    or a test's) gets its own, never the kept one."""
    tool = _tool()
    cache = KVCache(mx.zeros((2, 64, 128), dtype=mx.float16), mx.zeros((2, 64, 128)), 16)
    q = mx.ones((1, 8, 128), dtype=mx.float16)
    plan = cuda_attention.DecodePlan(mx.array([[0, 1]], dtype=mx.int32), mx.array([20]), 20)

    def launch_template() -> dict[str, object]:
        with mx.stream(mx.cpu), tool.recording() as launches:
            cuda_attention.CudaPagedAttention().decode(q, cache, plan, 0.1)
        return dict(launches[0].template)

    monkeypatch.setattr(cuda_formats, "KEYS", "2")
    first = launch_template()
    assert launch_template() == first and first["KS"] == 2
    monkeypatch.setattr(cuda_formats, "KEYS", "1")
    assert launch_template() == {**first, "KS": 1}


def test_a_float_cache_launches_as_before_with_placeholder_scales():
    tool = _tool()
    cache = KVCache(mx.zeros((2, 64, 64), dtype=mx.float16), mx.zeros((2, 64, 64)), 16)
    q = mx.ones((1, 4, 64), dtype=mx.float16)
    plan = cuda_attention.DecodePlan(mx.array([[0, 1]], dtype=mx.int32), mx.array([20]), 20)
    with mx.stream(mx.cpu), tool.recording() as launches:
        cuda_attention.CudaPagedAttention().decode(q, cache, plan, 0.1)
    inputs = dict(zip(launches[0].input_names, launches[0].inputs))
    assert inputs["q"] is q  # not turned
    assert inputs["k_scales"].size == 1 and inputs["k_scales"] is inputs["v_scales"]
    template = dict(launches[0].template)
    # A float32 V pool under float16 compute: each pool's own element type.
    assert (template["KT"], template["VT"], template["KB"], template["VB"]) == (
        mx.float16, mx.float32, 0, 0
    )  # fmt: skip


def test_quantized_caches_take_the_kernel_on_cuda(monkeypatch):
    monkeypatch.setattr(cuda_attention, "available", lambda: True)
    monkeypatch.delenv("NANOVLLM_KV_QUANT_KERNEL", raising=False)
    assert isinstance(select_backend(), cuda_attention.CudaPagedAttention)
    assert isinstance(select_backend(quantized_kv=True), cuda_attention.CudaPagedAttention)
    monkeypatch.setenv("NANOVLLM_KV_QUANT_KERNEL", "0")
    assert type(select_backend(quantized_kv=True)) is GatherAttention
    monkeypatch.setenv("NANOVLLM_KV_QUANT_KERNEL", "1")
    assert type(select_backend(quantized_kv=True, sinks=True)) is GatherAttention
    assert type(select_backend(quantized_kv=True, latent=True)) is GatherAttention
    monkeypatch.setattr(cuda_attention, "available", lambda: False)
    assert type(select_backend(quantized_kv=True)) is GatherAttention


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (the CUDA toolkit)")
def test_the_kernel_sources_compile_for_an_h100():
    """Every K/V format pair, both half dtypes, a head_dim past the lanes and the engine
    test's: the wrapped sources as MLX would build them, compiled by nvcc (no GPU)."""
    done = subprocess.run(
        [sys.executable, str(TOOL), "--quick"], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, done.stdout + done.stderr
    compiled = re.search(r"(\d+)/(\d+) kernels compiled", done.stdout)
    assert compiled is not None and compiled[1] == compiled[2] and int(compiled[1]) >= 20
    assert "SPILLED" not in done.stdout
