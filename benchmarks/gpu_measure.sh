#!/usr/bin/env bash
# Measurements on the GPU machine (the `device` tool), batched into few calls; each phase
# logs to $OUT/<phase>.log. MLX's CUDA build comes staged: tools/stage_mlx_cuda.sh (one
# file: carry .device/one and .whl), or ../shared/device/mlx-cuda-stage.sh (two parts:
# part a copied to /tmp/mlxstage by an earlier call, then carry .device/b and .whl).
#   bash benchmarks/gpu_measure.sh setup tests profile compare-gpt2
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=/tmp/mlxsite:/tmp/site:$PWD PYTHONUNBUFFERED=1
# Fixtures are built under /tmp (the 8B one is 4.5 GB): paths the device tool carries
# replace what is in the working tree there, /tmp stays while the machine is warm.
export NANOVLLM_MLX_FIXTURES=${NANOVLLM_MLX_FIXTURES:-/tmp/fx}
GPT2=$NANOVLLM_MLX_FIXTURES/gpt2-small-shape
SMOL=$NANOVLLM_MLX_FIXTURES/smollm2-135m-shape
L8B=$NANOVLLM_MLX_FIXTURES/llama3-8b-q4
L8B_SHAPE="--heads 32 --kv-heads 8 --dim 128 --layers 32 --dtype float16"
run() {  # name, seconds, command...
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*" | tee -a "$OUT/$name.log"
  local t0=$SECONDS
  timeout "$limit" "$@" >>"$OUT/$name.log" 2>&1
  echo "== $name: exit $? after $((SECONDS - t0)) s" | tee -a "$OUT/$name.log"
  tail -n 25 "$OUT/$name.log"
}
one_stream() {  # name, seconds, tree, contexts, decode_probe's other args...: one 8B
  # stream on a 20 GB pool, compiled, our kernel and look-ahead on. tree: "." or an older
  # commit unpacked there by the caller (`git archive REV nanovllm_mlx benchmarks/
  # decode_probe.py`). STREAM_ENV, set on the call: NAME=VALUE switches for the process.
  local name=$1 limit=$2 tree=$3 contexts=$4
  shift 4
  # shellcheck disable=SC2086  # STREAM_ENV: words for env
  run "$name" "$limit" env PYTHONPATH=/tmp/mlxsite:/tmp/site:$PWD/$tree ${STREAM_ENV:-} \
    python3 "$tree/benchmarks/decode_probe.py" --model "$L8B" --dtype float16 --repeats 2 \
    --decode-tokens 64 --pools "" --configs 20:on:on:on --contexts "$contexts" "$@"
}
probe_off_on() {  # name, switch: one 8B stream after 32 and 8k tokens, switch=0 then 1
  for v in 0 1; do
    STREAM_ENV="$2=$v" one_stream "$1" 120 . 32,8192
  done
}
stage_mlx() {  # MLX's CUDA build into /tmp/mlxsite, the wheels into /tmp/site; the GPU
  if [ ! -d /tmp/mlxsite/mlx ]; then
    mkdir -p /tmp/mlxsite
    if [ -f .device/one/mlx.tar.xz ]; then  # tools/stage_mlx_cuda.sh: one call
      xz -d < .device/one/mlx.tar.xz | tar -C /tmp/mlxsite -x
    else  # ../shared/device/mlx-cuda-stage.sh: part a copied by an earlier call
      cat /tmp/mlxstage/part.aa .device/b/part.ab | xz -d | tar -C /tmp/mlxsite -x
    fi
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING
  # A precompiled kernel (the sum), a JIT-compiled one (the add) and a matmul: a pruned
  # build (tools/prune_fatbin.py) that lost the device's code fails here, not later.
  python3 -c 'import mlx.core as mx; a = mx.ones((64, 64)); print(mx.default_device(),
    mx.__version__, (a @ a + 1).sum().item(), "(want 266240.0)")'
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
}
for phase in "$@"; do
  case $phase in
    setup)
      stage_mlx
      run fixtures 300 python3 tests/make_fixtures.py gpt2-small-shape smollm2-135m-shape ;;
    setup-mlx)
      # MLX and the wheels alone, for phases that build no model (layouts-8b, tests-*).
      stage_mlx ;;
    setup-8b)
      stage_mlx
      run fixtures 120 python3 tests/make_fixtures.py llama3-8b-q4 ;;
    tests-cuda)
      run tests-cuda 120 python3 -m pytest -q -x -p no:cacheprovider tests/test_attention.py \
        tests/test_sliced_reads.py -k "not bfloat16 and not float32" ;;
    cudnn-views)
      # MLX's own SDPA over a view of a cache starting at slot 256 against the same keys
      # copied, for a cache of 1,024 and 1,040 slots (GatherAttention.cudnn_views).
      run cudnn-views 60 python3 - <<'PY'
import mlx.core as mx
for slots in (1024, 1040):
    k = mx.random.normal((1, 2, slots, 128)).astype(mx.float16)
    q = mx.random.normal((1, 8, 1, 128)).astype(mx.float16)
    view = k[:, :, 256:768]
    a = mx.fast.scaled_dot_product_attention(q, view, view, scale=0.1)
    b = mx.fast.scaled_dot_product_attention(q, mx.array(view * 1), mx.array(view * 1), scale=0.1)
    print(slots, "max |view - copy| =", mx.abs(a - b).max().item())
PY
      ;;
    tests-inplace)
      # In-place writes, the quantized-pool kernel (issue 26) and the float kernel's cases
      # at unroll 2, full attention (its template changed with the quantized pools).
      run tests-inplace 300 python3 -m pytest -q -p no:cacheprovider \
        tests/test_in_place_writes.py tests/test_cuda_kv_quant.py tests/test_compiled_decode.py \
        tests/test_attention.py -k "not cuda_decode_kernel_matches or [2-None" ;;
    probe-inplace-8b)
      # In-place K/V writes (attention/cuda_write.py) against the scatter and the wait, one
      # process each; compiled decode with look-ahead, the kernel on, a 20 GB pool.
      for w in 0 1; do
        run probe-inplace-8b 200 env NANOVLLM_IN_PLACE_WRITES=$w python3 \
          benchmarks/decode_probe.py --model $L8B --dtype float16 --repeats 2 \
          --decode-tokens 64 --pools "" --configs 20:on:on:on
      done ;;
    final-8b)
      # One call's worth: the GPU tests of in-place writes, our single stream with them
      # against mlx-lm's after 32 and 8,192 tokens, then ours with the scatter and the wait
      # (in-place writes off) and with the kernel off (the gather path a Mac runs, compiled
      # and eager), on the same warm machine.
      run tests-inplace 150 python3 -m pytest -q -x -p no:cacheprovider \
        tests/test_in_place_writes.py
      run final-8b 150 env NANOVLLM_IN_PLACE_WRITES=1 python3 benchmarks/compare_mlx_lm.py \
        --model $L8B --dtype float16 --repeats 2 --contexts 32,8192 --ttft "" \
        --decode-tokens 64 --batches "" --json
      run final-8b 150 env NANOVLLM_IN_PLACE_WRITES=0 python3 benchmarks/decode_probe.py \
        --model $L8B --dtype float16 --repeats 2 --decode-tokens 64 --pools "" \
        --configs 20:on:on:on,20:on:off:on,20:off:off:on
      ;;
    kvq-8b)
      # Issue 26's kernel over quantized pools: its GPU tests (a fresh machine's NVRTC
      # builds every variant they meet), then the int8 pool's single stream.
      run tests-kvq 240 python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda_kv_quant.py
      run kvq-8b 100 env NANOVLLM_KV_QUANT_KERNEL=1 python3 benchmarks/decode_probe.py \
        --model $L8B --dtype float16 --repeats 2 --decode-tokens 64 --pools "" \
        --configs 20:on:on:on --kv-cache-dtype int8 ;;
    verify-8b)
      # One stream of each path: int8 pools on the kernel, written by MLX's scatter and in
      # place (cuda_quantize.py), and float16 with the kernel off (a lone sliced stream
      # run eager on the gather path). tests-verify runs their GPU tests.
      for case in int8:0 int8:1; do
        run verify-8b 60 env NANOVLLM_QUANTIZED_IN_PLACE=${case#*:} python3 \
          benchmarks/decode_probe.py --model $L8B --dtype float16 --repeats 2 \
          --decode-tokens 64 --pools "" --configs 20:on:on:on --kv-cache-dtype ${case%:*}
      done
      run verify-8b 60 python3 benchmarks/decode_probe.py --model $L8B --dtype float16 \
        --repeats 2 --decode-tokens 64 --pools "" --configs 20:on:off:on ;;
    int8-8b)
      # Issue 26's fixed cost a step: an int8 pool with q and the output turned by two
      # [D, D] products (TURNS=0) and in the kernel (1), then also read with vector loads;
      # a float16 pool last, same machine. One stream after 32 and 8,192 tokens. The GPU
      # cases of both first (a fresh machine's NVRTC builds every variant they meet).
      run int8-8b 200 python3 -m pytest -q -x -p no:cacheprovider --tb=short \
        tests/test_cuda_kv_quant.py -k "reads_quantized_pools and turned-inside"
      for case in NANOVLLM_KERNEL_TURNS=0:int8 NANOVLLM_KERNEL_TURNS=1:int8 \
          NANOVLLM_KERNEL_TURNS=1,NANOVLLM_KERNEL_VECTOR_LOADS=1:int8 \
          NANOVLLM_KERNEL_TURNS=0:auto; do
        vars=${case%:*}
        run int8-8b 90 env ${vars//,/ } python3 benchmarks/decode_probe.py --model $L8B \
          --dtype float16 --repeats 2 --decode-tokens 64 --pools "" --configs 20:on:on:on \
          --kv-cache-dtype ${case#*:}
      done ;;
    hybrid-diag)
      # v16: the hybrid fixture's engine fails at start-up on CUDA (cudaGraphAddKernelNode:
      # invalid argument) in the step budget's long prefill. Which part: the chunked
      # recurrence alone at growing lengths, then the engine with MLX's CUDA graphs off.
      run hybrid-diag 120 python3 - <<'PY'
import mlx.core as mx
from nanovllm_mlx.models.gated_delta import chunked
for n in (64, 512, 1024, 2048, 4096):
    q, k, v = (mx.random.normal((4, n, 8)) for _ in range(3))
    g, beta = -mx.random.uniform(shape=(4, n)), mx.random.uniform(shape=(4, n))
    try:
        mx.eval(chunked(q, k, v, g, beta, mx.zeros((4, 8, 8))))
        print(n, "tokens: ok", flush=True)
    except RuntimeError as e:
        print(n, "tokens:", e, flush=True)
PY
      for graphs in 1 0; do
        run hybrid-diag 120 env MLX_USE_CUDA_GRAPHS=$graphs python3 -m pytest -q -x \
          -p no:cacheprovider --tb=line tests/test_hybrid.py -k chunked_prefill
      done ;;
    tests-qip)
      run tests-qip 150 python3 -m pytest -q -p no:cacheprovider tests/test_quantized_in_place.py ;;
    tests-verify)
      # One pytest a file, each with its own limit and --tb=short: v16's single call ran
      # out at 300 s inside test_compiled_decode.py and so printed none of its failures.
      for f in test_quantized_in_place test_sliced_reads test_in_place_writes \
          test_cuda_kv_quant test_compiled_decode; do
        run tests-verify 150 python3 -m pytest -q -p no:cacheprovider --tb=short \
          --durations=5 tests/$f.py
      done
      # Prefill chunks (each its own causal read, in place where its blocks are
      # consecutive) through the kernel's backend, against dense attention.
      run tests-verify 120 python3 -m pytest -q -p no:cacheprovider --tb=short \
        tests/test_attention.py -k "paged_matches_dense and cuda-kernel"
      # The kernel launched as a compiled step (partitions sized from the contexts).
      run tests-verify 120 python3 -m pytest -q -p no:cacheprovider tests/test_attention.py \
        -k compiled_step
      # The hybrid (Gated DeltaNet) model on CUDA's default path, engine against itself.
      run tests-verify 120 python3 -m pytest -q -p no:cacheprovider tests/test_hybrid.py \
        -k "chunked_prefill or preemption or forked_choices or run_of_one" 
      ;;
    tests-qmv)
      # v14's run passed 7 GPU cases in ~200 s and ran out: each test's time is printed.
      run tests-qmv 400 python3 -m pytest -q -p no:cacheprovider --durations=0 \
        tests/test_cuda_qmv.py ;;
    qmv-8b)
      # Our few-row 4-bit product (models/cuda_qmv.py) off (MLX's kernels) and on.
      probe_off_on qmv-8b NANOVLLM_CUDA_QMV ;;
    qmv-tiling-8b)
      # v14's lead: four weight rows a warp and one step in flight were the fastest on every
      # product alone; the engine, one stream, with its own choice and with 4,1.
      for tiling in "" 4,1; do
        run qmv-tiling-8b 120 python3 benchmarks/decode_probe.py --model $L8B \
          --dtype float16 --repeats 2 --decode-tokens 64 --pools "" --configs 20:on:on:on \
          --contexts 32,8192 --qmv-tiling "$tiling"
      done ;;
    qmv-logprobs)
      # Our product's decode logprobs against MLX's prefill and against float32 compute.
      run qmv-logprobs 200 python3 benchmarks/qmv_logprobs.py --model $L8B --float32 ;;
    fuse-8b)
      # q/k/v and gate/up joined at load (models/fusion.py), off and on.
      probe_off_on fuse-8b NANOVLLM_FUSE_PROJECTIONS ;;
    pad8-8b)
      # v14's lead: MLX's tiled matmul took 8 rows in less time than a one-row kernel took
      # one. One stream padded to 8 rows on MLX's matmuls, against our product (default).
      run pad8-8b 120 env NANOVLLM_CUDA_QMV=0 python3 benchmarks/decode_probe.py \
        --model $L8B --dtype float16 --repeats 2 --decode-tokens 64 --pools "" \
        --configs 20:on:on:on --contexts 32,8192 --min-decode-rows 8 ;;
    blocks-8b)
      # The paged decode kernel's partitions: v15 read a warp's serial chain of loads as
      # what bounds it at long context; more thread blocks make each chain shorter.
      for blocks in 512 1024 2048; do
        run blocks-8b 120 python3 benchmarks/decode_probe.py --model $L8B --dtype float16 \
          --repeats 2 --decode-tokens 64 --pools "" --configs 20:on:on:on \
          --contexts 32,8192,32768 --target-blocks $blocks
      done ;;
    tests-prefill)
      # Prompt chunks read each on its own (causal SDPA, in place where consecutive) on
      # the GPU's fused paths, against dense attention.
      run tests-prefill 150 python3 -m pytest -q -p no:cacheprovider --tb=short \
        tests/test_attention.py tests/test_chunk_shapes.py \
        -k "paged_matches_dense and (cuda-kernel or gather-sdpa) or chunk" ;;
    prefill-8b)
      # Each prefill step's time and tokens for 4k and 16k prompts, with the key cost the
      # start-up measured and with none (v15: a launch-bound key probe cut 16k's chunks).
      run prefill-8b 200 python3 benchmarks/prefill_probe.py --model $L8B \
        --lengths 4096,16384 --repeats 2 --key-costs measured,0 ;;
    batch-8b)
      # Every prefill step of compare-8b's 8-request workload (v16: 0.90x mlx-lm, 6.45 s
      # of its ~10 s in steps that computed prompt tokens), rounds of seeds 0, 0, 1.
      run batch-8b 200 python3 benchmarks/prefill_probe.py --model $L8B --batch 8
      # The 64-request row (v16: 3.52x mlx-lm, target 4x): its steps alike.
      run batch-8b 240 python3 benchmarks/prefill_probe.py --model $L8B --batch 64 ;;
    buckets-8b)
      # Prompt chunks' attention padded to a few shapes (attention/chunk_shapes.py, opt-in),
      # off then on: compare-8b's 8-request workload's prefill steps, rounds of new lengths.
      for b in 0 1; do
        run buckets-8b 200 env NANOVLLM_CHUNK_BUCKETS=$b python3 benchmarks/prefill_probe.py \
          --model $L8B --batch 8
      done ;;
    shape-builds)
      # What a new length costs each op the first time (SDPA's cuDNN graphs, ...).
      run shape-builds 120 python3 benchmarks/shape_builds.py ;;
    batch8-8b)
      # The 8-request workload's steps alone (batch-8b's first half).
      run batch8-8b 200 python3 benchmarks/prefill_probe.py --model $L8B --batch 8 ;;
    rows-8b)
      # v17: decode-only steps of 5-8 rows took 14.8-15.8 ms, of 3-4 rows 6.4-6.6. Each
      # step's kernels (CUPTI) at 4 and 8 rows, 8 rows on MLX's matmul (the default) and on
      # ours; mlx-lm's 8-row batch beside them.
      run rows-8b 150 python3 benchmarks/step_anatomy.py --model $L8B --dtype float16 \
        --contexts 512 --kv-cache-gb 20 --compiled-only --rows 8
      for r in 4 8; do
        run rows-8b 100 env NANOVLLM_QMV_ROWS=$r python3 benchmarks/step_anatomy.py \
          --model $L8B --dtype float16 --contexts 512 --kv-cache-gb 20 --compiled-only \
          --skip-mlx-lm --rows $r
      done
      # The products alone, joined as the engine runs them (v14 timed them unjoined).
      run rows-8b 120 python3 benchmarks/qmm_rows.py --rows 1,4,8 --joined ;;
    rows-ours)
      # The 8-row step on our product (the default since v18) and the products alone.
      run rows-ours 100 python3 benchmarks/step_anatomy.py --model $L8B --dtype float16 \
        --contexts 512 --kv-cache-gb 20 --compiled-only --skip-mlx-lm --rows 8
      run rows-ours 120 python3 benchmarks/qmm_rows.py --rows 1,4,8 --joined ;;
    tests-keys)
      # v19's kernels on the GPU: the decode kernel with two keys side by side a warp (the
      # default), one, and lane-strided, over float and quantized pools, against the gather
      # path; the 4-bit product with its codes dequantized once for all rows of x.
      run tests-keys 200 python3 -m pytest -q -p no:cacheprovider --tb=short \
        tests/test_attention.py -k "cuda_decode_kernel and float16 and vector"
      run tests-keys 200 python3 -m pytest -q -p no:cacheprovider --tb=short \
        tests/test_cuda_kv_quant.py -k "reads_quantized_pools and not strided and not onekey"
      run tests-keys 200 python3 -m pytest -q -p no:cacheprovider --tb=short \
        tests/test_cuda_qmv.py ;;
    layouts-keys)
      # The decode kernel alone, one key a warp against two side by side (float16, int8).
      run layouts-keys 200 python3 benchmarks/attention_layouts.py 1x8192 1x32768 8x2048 \
        $L8B_SHAPE --kv-formats int8 ;;
    keys-8b)
      # One stream, two keys side by side (2, the default) against one, alternated: a
      # float16 pool after 32 / 8k / 32k tokens, then an int8 one (issue 26) after 32 / 8k.
      for k in 1 2 1 2; do
        STREAM_ENV=NANOVLLM_KERNEL_KEYS=$k one_stream keys-8b 100 . 32,8192,32768
      done
      for k in 1 2; do
        STREAM_ENV=NANOVLLM_KERNEL_KEYS=$k one_stream keys-8b 100 . 32,8192 \
          --kv-cache-dtype int8
      done ;;
    v17-single)
      # v18's single-stream drop: v17's commit (its tree unpacked in v17tree/ by the
      # caller, `git archive ebb5b5e`) and this one, one stream after 32 / 8k each.
      for tree in v17tree .; do
        one_stream v17-single 100 $tree 32,8192
      done ;;
    tests-merge)
      # The merge kernel reading its partitions through shared memory: float pools, and
      # quantized ones turned back in the merge (RO).
      run tests-merge 150 python3 -m pytest -q -p no:cacheprovider --tb=short \
        tests/test_attention.py -k "cuda_decode_kernel and float16 and unroll2 and vector \
        and not onekey"
      run tests-merge 150 python3 -m pytest -q -p no:cacheprovider --tb=short \
        tests/test_cuda_kv_quant.py -k "reads_quantized_pools and turned-inside and not strided \
        and not onekey" ;;
    merge-8b)
      # The merge before (the commit before it, unpacked in prevtree/ by the caller) and
      # after, one stream after 32 / 8k / 32k, alternated.
      for tree in prevtree . prevtree .; do
        one_stream merge-8b 60 $tree 32,8192,32768
      done ;;
    warmup-8b)
      # v19's regression since v17 (3-6% after 32 tokens), its first suspect: the start-up
      # warm-up of batch buckets. A one-row warm-up (max_num_seqs 1, v17's) and the default.
      for seqs in 1 0 1 0; do
        one_stream warmup-8b 50 . 32,8192 --max-num-seqs $seqs
      done ;;
    dense-8b)
      # Prompt chunks' products: MLX's 4-bit matmul against the dequantized weights' dense
      # matmul (NANOVLLM_DENSE_ROWS), alone, then the engine's TTFT at 4k / 16k, off and on.
      run dense-8b 100 python3 benchmarks/qmm_rows.py --rows 256,512,2048 --joined --repeats 5
      for rows in 0 256; do
        run dense-8b 120 env NANOVLLM_DENSE_ROWS=$rows python3 benchmarks/prefill_probe.py \
          --model $L8B --lengths 4096,16384 --repeats 2 --key-costs measured
      done ;;
    dense-compare)
      # With the dense products on: TTFT at 4k / 16k and the 8-request row beside mlx-lm.
      run dense-compare 240 env NANOVLLM_DENSE_ROWS=256 python3 benchmarks/compare_mlx_lm.py \
        --model $L8B --dtype float16 --repeats 2 --contexts 32 --ttft 4096,16384 \
        --decode-tokens 64 --batches 8 --batch-repeats 1 --min-input 256 --max-input 2048 \
        --min-output 128 --max-output 256 --mlx-lm-prefill-batch 8 --json ;;
    compare-8b-few)
      # The 8-request row over two rounds, one stream after 32 tokens, TTFT 4k and 16k.
      run compare-8b-few 280 python3 benchmarks/compare_mlx_lm.py --model $L8B --repeats 2 \
        --dtype float16 --contexts 32 --ttft 4096,16384 --decode-tokens 64 --batches 8 \
        --batch-repeats 2 --min-input 256 --max-input 2048 --min-output 128 \
        --max-output 256 --mlx-lm-prefill-batch 8 --json ;;
    qmm-rows)
      run qmm-rows 200 python3 benchmarks/qmm_rows.py --rows 1,2,3,4,8,16,32,64 ;;
    vector-8b)
      # The kernel's loads, lane-strided (0) and vector (1), in the engine: one stream
      # after 32, 8k and 32k tokens on a float16 pool.
      for v in 0 1; do
        run vector-8b 120 env NANOVLLM_KERNEL_VECTOR_LOADS=$v python3 \
          benchmarks/decode_probe.py --model $L8B --dtype float16 --repeats 2 \
          --decode-tokens 64 --pools "" --configs 20:on:on:on --contexts 32,8192,32768
      done ;;
    compare-moe)
      # Issue 22's MoE row: Qwen3-30B-A3B's shape in mlx-community's 4-bit layout (~17 GB,
      # built on the GPU), one stream and 32 requests against mlx-lm. Not yet run.
      run fixtures 300 python3 tests/make_fixtures.py qwen3-30b-a3b-q4
      run compare-moe 420 python3 benchmarks/compare_mlx_lm.py \
        --model $NANOVLLM_MLX_FIXTURES/qwen3-30b-a3b-q4 --dtype float16 --repeats 2 \
        --contexts 32,2048 --ttft "" --decode-tokens 64 --batches 32 --batch-repeats 1 \
        --min-input 256 --max-input 2048 --min-output 128 --max-output 256 \
        --mlx-lm-prefill-batch 8 --json ;;
    layouts-8b)
      run layouts-8b 150 python3 benchmarks/attention_layouts.py 1x8192 1x32768 8x2048 \
        $L8B_SHAPE --kv-formats int8 ;;
    tests-vector)
      # The kernel with a lane's values consecutive (vector loads) over float pools
      # against the gather path (tests-verify runs the quantized pools' cases, both ways).
      run tests-vector 240 python3 -m pytest -q -p no:cacheprovider tests/test_attention.py \
        -k "vector and not bfloat16" ;;
    probe-8b)
      run probe-8b 330 python3 benchmarks/decode_probe.py --model $L8B --dtype float16 \
        --repeats 1 --decode-tokens 64 \
        --configs 2.5:on:on:on,20:on:on:on,20:off:on:on,20:on:on:off,20:off:off:on,20:on:off:on ;;
    probe-ahead-8b)
      # Issue 22's A/B ran at commit 3211fa0, where NANOVLLM_AHEAD_SYNC=0 still launched the
      # look-ahead step while the one before it ran (each pool write then copied the pool)
      # and the engine raised MLX_MAX_MB_PER_BUFFER (MLX's own on an H100/H200: 1000, a CUDA
      # graph per 1000 MB of op inputs). The sync is now unconditional and the limit MLX's:
      # this phase measures the landed engine with MLX's limit and with it raised.
      for case in "MLX_MAX_MB_PER_BUFFER=1000:20:on:on:on,20:off:on:on,20:on:off:on" \
          "MLX_MAX_MB_PER_BUFFER=1000000:20:on:on:on"; do
        run probe-ahead-8b 240 env ${case%%:*} python3 benchmarks/decode_probe.py \
          --model $L8B --dtype float16 --repeats 1 --decode-tokens 64 --pools "" \
          --configs ${case#*:}
      done ;;
    followup-8b)
      # The 8-request row over two rounds (the first pays each compiled bucket's trace).
      run followup-8b 200 python3 benchmarks/compare_mlx_lm.py --model $L8B --dtype float16 \
        --repeats 1 --contexts 32 --ttft "" --decode-tokens 64 --batches 8 --batch-repeats 2 \
        --min-input 256 --max-input 2048 --min-output 128 --max-output 256 \
        --mlx-lm-prefill-batch 8 ;;
    anatomy-8b)
      run anatomy-8b 160 python3 benchmarks/step_anatomy.py --model $L8B --dtype float16 \
        --contexts 32,8192 --kv-cache-gb 20 ;;
    anatomy-int8)
      # Issue 26's ~1.9 ms a step: our compiled step on a float16 and an int8 pool, each
      # step's kernels through CUPTI (the turns as products, then in the kernel).
      for t in 0 1; do
        run anatomy-int8 200 env NANOVLLM_KERNEL_TURNS=$t python3 benchmarks/step_anatomy.py \
          --model $L8B --dtype float16 --contexts 32,8192 --kv-cache-gb 20 --skip-mlx-lm \
          --compiled-only --kv-cache-dtypes $([ $t = 0 ] && echo auto,int8 || echo int8)
      done ;;
    compare-8b-single)
      run compare-8b-single 580 python3 benchmarks/compare_mlx_lm.py --model $L8B \
        --dtype float16 --contexts 32,2048,8192,32768 --ttft 4096,16384 --batches "" \
        --decode-tokens 64 --json ;;
    compare-8b)
      run compare-8b 400 python3 benchmarks/compare_mlx_lm.py --model $L8B --repeats 2 \
        --dtype float16 --contexts 32,2048,8192,32768 --ttft 4096,16384 --decode-tokens 64 \
        --batches 8,64 --batch-repeats 2 --min-input 256 --max-input 2048 --min-output 128 \
        --max-output 256 --mlx-lm-prefill-batch 8 --json ;;
    compare-8b-int8)
      # Issue 26: our int8 pool against mlx-lm's float16 cache, after 32 and 8k tokens; the
      # float16 pool's figures are compare-8b's (same contexts) on the same machine.
      run compare-8b-int8 200 python3 benchmarks/compare_mlx_lm.py --model $L8B --repeats 2 \
        --dtype float16 --contexts 32,8192 --ttft "" --decode-tokens 64 --batches "" \
        --kv-cache-dtype int8 --json ;;
    compare-8b-min)
      run compare-8b-min 200 python3 benchmarks/compare_mlx_lm.py --model $L8B --repeats 2 \
        --dtype float16 --contexts 32,8192 --ttft 4096 --decode-tokens 64 --batches 8 \
        --batch-repeats 1 --min-input 256 --max-input 2048 --min-output 128 \
        --max-output 256 --mlx-lm-prefill-batch 8 --json ;;
    compare-8b-batch)
      run compare-8b-batch 580 python3 benchmarks/compare_mlx_lm.py --model $L8B \
        --dtype float16 --contexts 32 --ttft 512 --repeats 1 --batches 8,64 \
        --batch-repeats 1 --min-input 256 --max-input 2048 --min-output 128 \
        --max-output 256 --mlx-lm-prefill-batch 8 --json ;;
    tests)
      run tests 300 python3 -m pytest -q -p no:cacheprovider tests/test_attention.py \
        tests/test_compiled_decode.py ;;
    profile)
      for c in off on; do
        run "profile-$c" 150 python3 benchmarks/profile_step.py --model $GPT2 --dtype float16 \
          --batch 32 --compile-decode $c
      done ;;
    metal-like-8b)
      # Issue 22's kernel-off row (target >= 0.9x after 8k): what a Mac runs, our CUDA
      # kernels off (the paged decode kernel and our 4-bit product), the joins on.
      run metal-like-8b 300 env NANOVLLM_PAGED_KERNEL=0 NANOVLLM_CUDA_QMV=0 python3 \
        benchmarks/compare_mlx_lm.py --model $L8B --dtype float16 --repeats 2 \
        --contexts 32,8192 --ttft "" --decode-tokens 64 --batches "" --json ;;
    metal-like-nocudnn)
      # The kernel-off row with MLX's cuDNN attention off for both engines
      # (MLX_CUDA_USE_CUDNN_SDPA=0): on a Mac neither engine's one-query SDPA goes to cuDNN,
      # while on CUDA mlx-lm's cache slice does and our pool's slice cannot (v20's
      # anatomy-off: 0.75 against 1.87 ms a step after 8k). Eager and compiled decode.
      for mode in auto off; do
        run metal-like-nocudnn 200 env NANOVLLM_PAGED_KERNEL=0 NANOVLLM_CUDA_QMV=0 \
          MLX_CUDA_USE_CUDNN_SDPA=0 python3 benchmarks/compare_mlx_lm.py --model $L8B \
          --dtype float16 --repeats 2 --contexts 32,8192 --ttft "" --decode-tokens 64 \
          --batches "" --compile-decode $mode --json
      done ;;
    tests-splice)
      # Quantized pools' codes spliced into floats (no int-to-float conversions) and their
      # scales loaded once a row: the kernel over int8 and int4 pools against the gather path.
      run tests-splice 200 python3 -m pytest -q -p no:cacheprovider --tb=short \
        tests/test_cuda_kv_quant.py -k "reads_quantized_pools and not strided" ;;
    splice-8b)
      # The same change before (prevtree: the commit before it, unpacked by the caller)
      # and after: the kernel alone over int8 and int4 pools, then one 8B stream on an int8
      # pool (and a float16 one, the target's reference) after 8k and 32k tokens.
      for tree in prevtree .; do
        run splice-8b 100 env PYTHONPATH=/tmp/mlxsite:/tmp/site:$PWD/$tree python3 \
          $tree/benchmarks/attention_layouts.py 1x8192 1x32768 8x2048 $L8B_SHAPE \
          --kv-formats int8,int4
      done
      for case in prevtree:int8 .:int8 .:auto prevtree:int8 .:int8 .:auto; do
        one_stream splice-8b 90 ${case%:*} 8192,32768 --kv-cache-dtype ${case#*:}
      done ;;
    anatomy-off)
      # The kernel-off row's profile (never taken before v20): our step eager and compiled
      # on the Metal-like path against mlx-lm's, each step's kernels through CUPTI.
      run anatomy-off 200 env NANOVLLM_PAGED_KERNEL=0 NANOVLLM_CUDA_QMV=0 python3 \
        benchmarks/step_anatomy.py --model $L8B --dtype float16 --contexts 32,8192 \
        --kv-cache-gb 20 ;;
    single-off)
      for m in $GPT2 $SMOL; do
        run single-off 200 python3 benchmarks/compare_mlx_lm.py --model $m --dtype float16 \
          --repeats 3 --batches "" --compile-decode off
      done ;;
    compare-gpt2)
      run compare-gpt2 420 python3 benchmarks/compare_mlx_lm.py --model $GPT2 --dtype float16 \
        --repeats 3 --batch-repeats 1 --batches 8,32,128,256 --json ;;
    compare-smol)
      run compare-smol 420 python3 benchmarks/compare_mlx_lm.py --model $SMOL --dtype float16 \
        --repeats 3 --batch-repeats 1 --batches 8,32,128,256 --json ;;
    gpt2-rerun)
      # compare-gpt2's 8 and 32 requests again on the same machine, MLX's kernel cache now
      # warm: v8 found the 8-request row on a fresh machine pays NVRTC's first builds.
      run gpt2-rerun 200 python3 benchmarks/compare_mlx_lm.py --model $GPT2 --dtype float16 \
        --repeats 1 --batch-repeats 2 --batches 8,32 --json ;;
    buckets-gpt2)
      # v21's lead for GPT-2's batched rows (0.85-1.08x against the issue's 1.19-1.60x): each
      # prompt chunk is its own fused SDPA call (since ae29757), and MLX's CUDA build makes
      # a cuDNN graph for every new (query, key) shape; 32 prompts of 100-1,024 tokens met
      # 35 shapes (6 at v8's b497c55), 17 with the chunks padded to buckets (a CPU count,
      # /tmp/gpt2probe in v21's note). Buckets off and on, 32 / 128 / 256 requests.
      for b in 0 1; do
        run buckets-gpt2 280 env NANOVLLM_CHUNK_BUCKETS=$b python3 \
          benchmarks/compare_mlx_lm.py --model $GPT2 --dtype float16 --repeats 1 \
          --batch-repeats 1 --batches 32,128,256 --json
      done ;;
    nanovllm)
      run nanovllm 200 python3 benchmarks/throughput.py --model $GPT2 --dtype float16 ;;
    *) echo "unknown phase $phase" ;;
  esac
done
