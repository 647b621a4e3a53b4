"""The fast BLAS on Linux: from `pip install` alone (the `mkl` dependency on x86-64), found
without environment variables, preferred over a system library, and, when none is in use,
said once on stderr by every command that computes."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import warnings

import pytest
from helpers import REPO_ROOT, SLOW_BLAS_NOTICE, SMALL_KV_ARGS, cli_argv, run_cli

from nanovllm_mlx import backend

linux_x86 = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and platform.machine() == "x86_64"),
    reason="the mkl wheel is a dependency on Linux x86-64 only",
)
NOTICE = SLOW_BLAS_NOTICE


def python(code: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k != "NANOVLLM_BLAS"}
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**clean, **env},
    )


MATMUL = """
import time
import nanovllm_mlx
from nanovllm_mlx import backend
import mlx.core as mx
a = mx.random.normal((1024, 1024)); b = mx.random.normal((1024, 1024)); mx.eval(a @ b)
best = min(
    (lambda t: (mx.eval(a @ b), time.perf_counter() - t)[1])(time.perf_counter())
    for _ in range(10)
)
print(backend.blas_library, 2 * 1024**3 / best / 1e9)
"""


@linux_x86
def test_pip_install_alone_gives_a_fast_blas_that_mlx_uses():
    pip_mkl = backend._pip_mkl_paths()
    if not pip_mkl:  # pip would have failed the install: this environment predates the dep
        pytest.skip("the mkl wheel is not installed here (`pip install -e .` installs it)")
    assert all(os.path.exists(p) for p in pip_mkl)
    fast = python(MATMUL)
    library, gflops = fast.stdout.split()
    # Found from the wheel's own record, ahead of any system OpenBLAS, with no env vars.
    assert library == pip_mkl[0], fast.stderr
    slow = python(MATMUL, NANOVLLM_BLAS="none")
    slow_library, slow_gflops = slow.stdout.split()
    assert slow_library == "None"
    # MKL's cblas_sgemm took the reference one's place inside MLX: 340 against 5.4 GFLOP/s
    # on the 2-core CI machine; a wide margin for a loaded one.
    assert float(gflops) > 5 * float(slow_gflops), (gflops, slow_gflops)


@linux_x86
def test_mlx_calls_mkl_sgemm_with_its_default_threading_unless_told_otherwise():
    if not backend._pip_mkl_paths():
        pytest.skip("the mkl wheel is not installed here (`pip install -e .` installs it)")
    code = "import nanovllm_mlx, mlx.core as mx; a = mx.ones((64, 64)); mx.eval(a @ a)"
    clean = {k: v for k, v in os.environ.items() if k != "MKL_THREADING_LAYER"}
    for layer, expected in (("", "intel_thread"), ("SEQUENTIAL", "sequential")):
        env = {**clean, "MKL_VERBOSE": "1", **({"MKL_THREADING_LAYER": layer} if layer else {})}
        proc = subprocess.run(
            [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
            timeout=120, env=env,
        )  # fmt: skip
        # MKL's verbose mode logs each call: MLX's matmul reached MKL's SGEMM.
        assert "SGEMM(N,N,64,64,64" in proc.stdout, proc.stdout + proc.stderr
        banner = proc.stdout.splitlines()[0]
        assert banner.endswith(expected), banner


@linux_x86
def test_mkl_keeps_its_own_threading_when_torch_is_imported_later():
    """Importing torch (transformers and mlx-lm do) after nanovllm_mlx loads GNU OpenMP;
    MKL must have settled on its own by then: it picked GNU's when left to its first
    matmul, and a matrix-vector product ran 35x slower (backend.load_fast_blas)."""
    if not backend._pip_mkl_paths():
        pytest.skip("the mkl wheel is not installed here (`pip install -e .` installs it)")
    pytest.importorskip("torch")
    code = (
        "import nanovllm_mlx, torch, mlx.core as mx; a = mx.ones((64, 64)); mx.eval(a @ a)\n"
        "maps = open('/proc/self/maps').read()\n"
        "print('gomp' in maps, 'libmkl_intel_thread' in maps, 'libmkl_gnu_thread' in maps)"
    )
    clean = {k: v for k, v in os.environ.items() if k != "MKL_THREADING_LAYER"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=120, env=clean,
    )  # fmt: skip
    assert proc.stdout.split() == ["True", "True", "False"], proc.stdout + proc.stderr


def test_the_import_order_warning_only_when_a_fast_blas_was_there(monkeypatch):
    for name in ("blas_in_use", "blas_library", "_why_slow", "_fast_blas_found"):
        monkeypatch.setattr(backend, name, getattr(backend, name))
    monkeypatch.delenv("NANOVLLM_BLAS", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    assert "mlx.core" in sys.modules  # as in `import mlx.core; import nanovllm_mlx`
    for finder in ("_pip_mkl_paths", "_system_openblas_paths", "_conda_mkl_paths"):
        monkeypatch.setattr(backend, finder, lambda: [])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: no fast BLAS exists
        backend.load_fast_blas()
    monkeypatch.setattr(backend, "_system_openblas_paths", lambda: [sys.executable])
    with pytest.warns(UserWarning, match="Import nanovllm_mlx first"):
        backend.load_fast_blas()
    assert "mlx was imported before nanovllm_mlx" in backend.blas_in_use


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux CPU only")
def test_the_slow_blas_is_said_once_on_every_command(gpt2_tiny):
    model = ["-m", str(gpt2_tiny), *SMALL_KV_ARGS]
    no_blas = {"NANOVLLM_BLAS": "none"}
    asked = run_cli("ask", *model, "--max-tokens", "3", "hi", "there", env=no_blas)
    benched = run_cli(
        "bench", *model, "--num-seqs", "2", "--max-input", "8", "--max-output", "4",
        "--min-input", "4", "--min-output", "2", env=no_blas,
    )  # fmt: skip
    chatted = subprocess.run(
        cli_argv("chat", *model, "--max-tokens", "3"),
        cwd=REPO_ROOT, input="hi\n", capture_output=True, text=True, timeout=180,
        env={**os.environ, "NANOVLLM_BLAS": "none"},
    )  # fmt: skip
    for proc in (asked, benched, chatted):
        assert proc.returncode == 0, proc.stderr
        first = proc.stderr.splitlines()[0]
        assert first.startswith(NOTICE) and "NANOVLLM_BLAS=none" in first, proc.stderr
        assert proc.stderr.count(NOTICE) == 1
    if backend.blas_library is not None:  # and a fast one is not announced at all
        fine = run_cli("ask", *model, "--max-tokens", "3", "hi")
        assert fine.returncode == 0 and NOTICE not in fine.stderr, fine.stderr
