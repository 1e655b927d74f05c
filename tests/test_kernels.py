"""SMT block kernels: Triton (interpreted on CPU) == torch batched path == float64 per-block loop,
block AdamW == torch.optim.AdamW, and the backend dispatch.

Shapes are small on purpose: the Triton interpreter runs every program in numpy.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from smt_bench.kernels import Backend, get_backend, torch_ops

REPO = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"

# fp32 accumulation of <= 100 products of O(1) values: a few fp32 ulps of results of size ~10.
WGRAD_TOL = dict(rtol=1e-5, atol=1e-5)
# AdamW state after a few steps: the Triton path may round lerp/fma differently by an ulp.
STATE_TOL = dict(rtol=1e-6, atol=1e-6)


def _backend(name: str) -> Backend:
    return get_backend(name, DEV)


BACKENDS = ["torch", "triton"]


def _inputs(T, d_out, d_in, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(T, d_out, generator=g).to(dtype)
    x = torch.randn(T, d_in, generator=g).to(dtype)
    return dy.to(DEV), x.to(DEV)


def _all_blocks(n_r, n_c):
    r, c = torch.meshgrid(torch.arange(n_r), torch.arange(n_c), indexing="ij")
    return r.flatten(), c.flatten()


# (name, d_out, d_in, rows, cols); cols index column-blocks of the full X
SELECTIONS = {
    "one_block": (64, 48, [2], [1]),
    "k5_shared_rows_cols": (64, 48, [0, 3, 1, 3, 1], [2, 0, 2, 2, 1]),
    "all_blocks": (64, 48, *[t.tolist() for t in _all_blocks(4, 3)]),
}


def _check_wgrad(backend, dy, x, rows, slots, B, **kw):
    rows_t, slots_t = torch.tensor(rows, dtype=torch.long), torch.tensor(slots, dtype=torch.long)
    got = backend.block_weight_grad(dy, x, rows_t.to(DEV), slots_t.to(DEV), B, **kw)
    assert got.dtype == torch.float32 and got.shape == (len(rows), B, B)
    ref = torch_ops.block_weight_grad(dy, x, rows_t.to(DEV), slots_t.to(DEV), B)
    naive = torch_ops.naive_block_weight_grad(dy, x, rows, slots, B)
    torch.testing.assert_close(ref.cpu().double(), naive, **WGRAD_TOL)
    torch.testing.assert_close(got.cpu(), ref.cpu(), **WGRAD_TOL)
    return got


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("B", [16, 32])
@pytest.mark.parametrize("sel", list(SELECTIONS))
def test_wgrad_full_x(backend, dtype, B, sel):
    d_out, d_in, rows, cols = SELECTIONS[sel]
    scale = B // 16  # same block grid for both block sizes
    dy, x = _inputs(37, d_out * scale, d_in * scale, dtype)
    _check_wgrad(_backend(backend), dy, x, rows, cols, B)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_wgrad_compact_xs_equals_full_x(backend, dtype):
    """Saving only the needed column-blocks (and each once) must give the same gradient."""
    B, T = 16, 53
    dy, x = _inputs(T, 64, 96, dtype, seed=1)
    rows, cols = [0, 3, 2, 3, 1], [5, 1, 5, 4, 1]
    needed = sorted(set(cols))  # column-blocks 1, 4, 5
    xs = torch.cat([x[:, c * B:(c + 1) * B] for c in needed], dim=1)
    slots = [needed.index(c) for c in cols]
    be = _backend(backend)
    compact = _check_wgrad(be, dy, xs, rows, slots, B)
    full = be.block_weight_grad(dy, x, torch.tensor(rows, device=DEV), torch.tensor(cols, device=DEV), B)
    torch.testing.assert_close(compact, full, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_wgrad_strided_inputs(backend):
    """Token-strided dy and feature-major x are read in place, not copied to contiguous first."""
    B, T = 16, 29
    dy_big, x_t = _inputs(2 * T, 64, 48, torch.float32, seed=2)
    dy = dy_big[::2]  # stride (2*64, 1)
    x = x_t[:T].T.contiguous().T  # stride (1, T)
    assert not dy.is_contiguous() and not x.is_contiguous()
    _check_wgrad(_backend(backend), dy, x, [1, 3, 0], [2, 0, 0], B)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "two_pass"])
def test_triton_wgrad_split_k(dtype, deterministic):
    """Split-K over tokens: atomics or per-split partials, with a ragged last split."""
    B, T = 16, 75  # 5 token tiles of 16 -> splits of 32, 32, 11 tokens
    dy, x = _inputs(T, 64, 48, dtype, seed=3)
    be = _backend("triton")
    got = _check_wgrad(be, dy, x, [0, 3, 1], [2, 2, 0], B, split_k=3, deterministic=deterministic)
    if deterministic:
        again = be.block_weight_grad(dy, x, torch.tensor([0, 3, 1], device=DEV),
                                     torch.tensor([2, 2, 0], device=DEV), B, split_k=3, deterministic=True)
        assert torch.equal(got, again)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [0, 37])
def test_wgrad_empty(backend, T):
    dy, x = _inputs(T, 64, 48, torch.float32)
    empty = torch.empty(0, dtype=torch.long, device=DEV)
    out = _backend(backend).block_weight_grad(dy, x, empty, empty, 16)
    assert out.shape == (0, 16, 16) and out.dtype == torch.float32
    if T == 0:
        one = torch.tensor([1], device=DEV)
        out = _backend(backend).block_weight_grad(dy, x, one, one, 16)
        assert out.shape == (1, 16, 16) and not out.any()


def test_torch_wgrad_bf16():
    """bf16 on the torch path works on CPU too (upcast); accumulation stays fp32."""
    dy, x = _inputs(37, 64, 48, torch.bfloat16)
    _check_wgrad(get_backend("torch", DEV), dy, x, [0, 3, 1], [2, 0, 2], 16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_wgrad_validation(backend):
    f = _backend(backend).block_weight_grad
    dy, x = _inputs(8, 64, 48, torch.float32)
    r = torch.tensor([0, 1], device=DEV)
    with pytest.raises(ValueError, match="same length"):
        f(dy, x, r, r[:1], 16)
    with pytest.raises(ValueError, match="divisible"):
        f(dy[:, :40], x, r, r, 16)
    with pytest.raises(ValueError, match="rows out of range"):
        f(dy, x, torch.tensor([0, 4], device=DEV), r, 16)
    with pytest.raises(ValueError, match="slots out of range"):
        f(dy, x, r, torch.tensor([-1, 0], device=DEV), 16)
    with pytest.raises(ValueError, match="block_size"):
        f(dy, x, r, r, 24)
    with pytest.raises(ValueError, match="dtype"):
        f(dy, x.half(), r, r, 16)
    with pytest.raises(ValueError, match="token count"):
        f(dy, x[:4], r, r, 16)


# ----------------------------------------------------------------------------------------------
# AdamW
# ----------------------------------------------------------------------------------------------
def _adamw_case(backend, wdtype, lr, betas, eps, wd, steps=4, transposed_weight=False, B=16):
    g = torch.Generator().manual_seed(7)
    n_r, n_c = 4, 3
    rows = torch.tensor([0, 3, 1, 3, 2])
    cols = torch.tensor([2, 0, 1, 2, 2])
    k = rows.numel()
    if transposed_weight:  # a non-contiguous (d_out, d_in) view into (d_in, d_out) storage
        storage = torch.randn(n_c * B, n_r * B, generator=g).to(wdtype).to(DEV)
        weight = storage.T
    else:
        weight = torch.randn(n_r * B, n_c * B, generator=g).to(wdtype).to(DEV)
    weight0 = weight.clone()
    blocks = torch.randn(k, B, B, generator=g).to(DEV)
    ref_p = blocks.clone().requires_grad_(True)
    opt = torch.optim.AdamW([ref_p], lr=lr, betas=betas, eps=eps, weight_decay=wd)
    exp_avg, exp_avg_sq = torch.zeros_like(blocks), torch.zeros_like(blocks)
    be = _backend(backend)
    for step in range(1, steps + 1):
        grads = torch.randn(k, B, B, generator=g).to(DEV) * (0.1 * step)
        be.block_adamw_step_(blocks, grads, exp_avg, exp_avg_sq, weight, rows.to(DEV), cols.to(DEV),
                             lr=lr, beta1=betas[0], beta2=betas[1], eps=eps, weight_decay=wd, step=step)
        ref_p.grad = grads.clone()
        opt.step()
    st = opt.state[ref_p]
    exact = backend == "torch" and DEV == "cpu"  # same ops on the same device: bit for bit
    tol = dict(rtol=0, atol=0) if exact else STATE_TOL
    torch.testing.assert_close(blocks, ref_p.detach(), **tol)
    torch.testing.assert_close(exp_avg, st["exp_avg"], **tol)
    torch.testing.assert_close(exp_avg_sq, st["exp_avg_sq"], **tol)

    # dense weight: exactly the cast master blocks where selected, untouched bits elsewhere
    sel = torch.zeros(n_r, n_c, dtype=torch.bool)
    sel[rows, cols] = True
    mask = sel.repeat_interleave(B, 0).repeat_interleave(B, 1).to(DEV)
    bits = torch.int32 if wdtype == torch.float32 else torch.int16
    assert torch.equal(weight[~mask].view(bits), weight0[~mask].view(bits))
    for i, (r, c) in enumerate(zip(rows.tolist(), cols.tolist())):
        assert torch.equal(weight[r * B:(r + 1) * B, c * B:(c + 1) * B], blocks[i].to(wdtype))
    if transposed_weight:
        assert torch.equal(storage.T, weight)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("wdtype", [torch.float32, torch.float16], ids=["w_fp32", "w_fp16"])
@pytest.mark.parametrize("wd", [0.0, 0.1], ids=["wd0", "wd0.1"])
def test_adamw_matches_torch_optim(backend, wdtype, wd):
    _adamw_case(backend, wdtype, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, wd=wd)


@pytest.mark.parametrize("backend", BACKENDS)
def test_adamw_small_beta1_and_strided_weight(backend):
    """beta1 < 0.5 takes torch lerp's other formula; a transposed weight view must be written through."""
    _adamw_case(backend, torch.float16, lr=3e-3, betas=(0.3, 0.95), eps=1e-6, wd=0.01,
                steps=3, transposed_weight=True, B=32)


def test_torch_adamw_bf16_weight():
    _adamw_case("torch", torch.bfloat16, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, wd=0.0, steps=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_adamw_empty_and_validation(backend):
    f = _backend(backend).block_adamw_step_
    hp = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1)
    w = torch.randn(64, 48, device=DEV)
    w0 = w.clone()
    z = torch.zeros(0, 16, 16, device=DEV)
    e = torch.empty(0, dtype=torch.long, device=DEV)
    f(z, z, z.clone(), z.clone(), w, e, e, **hp)
    assert torch.equal(w, w0)

    s = lambda: torch.zeros(2, 16, 16, device=DEV)  # noqa: E731
    r = torch.tensor([0, 1], device=DEV)
    with pytest.raises(ValueError, match="k=2"):
        f(s(), s(), s(), s(), w, r[:1], r, **hp)
    with pytest.raises(ValueError, match="divisible"):
        f(s(), s(), s(), s(), w[:, :40], r, r, **hp)
    with pytest.raises(ValueError, match="cols out of range"):
        f(s(), s(), s(), s(), w, r, torch.tensor([0, 3], device=DEV), **hp)
    with pytest.raises(ValueError, match="same block twice"):
        f(s(), s(), s(), s(), w, torch.tensor([1, 1], device=DEV), torch.tensor([2, 2], device=DEV), **hp)
    with pytest.raises(ValueError, match="exp_avg must have shape"):
        f(s(), s(), torch.zeros(2, 16, 15, device=DEV), s(), w, r, r, **hp)
    with pytest.raises(ValueError, match="float32"):
        f(s(), s().half(), s(), s(), w, r, r, **hp)
    with pytest.raises(ValueError, match="step"):
        f(s(), s(), s(), s(), w, r, r, **{**hp, "step": 0})


# ----------------------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------------------
def test_dispatch_auto_and_names():
    assert get_backend("auto", "cpu").name == "torch"
    assert get_backend("auto", torch.device("cpu")).name == "torch"
    assert get_backend("torch", "cpu").name == "torch"
    from smt_bench.kernels import triton_ops

    if triton_ops.INTERPRETED:  # conftest sets TRITON_INTERPRET=1 unless the caller chose otherwise
        assert get_backend("triton", "cpu").name == "triton"
        assert get_backend("auto", "cuda").name == "torch"  # never auto-pick interpreted kernels
    else:
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            get_backend("triton", "cpu")
        assert get_backend("auto", "cuda").name == "triton"
    for be in (get_backend("torch", DEV), get_backend("triton", DEV)):
        assert callable(be.block_weight_grad) and callable(be.block_adamw_step_)
    with pytest.raises(ValueError, match="auto, triton, torch"):
        get_backend("cuda", "cpu")
    with pytest.raises(ValueError, match="auto, triton, torch"):
        get_backend("Triton", "cpu")


def _run_py(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=full_env, cwd=REPO, timeout=120)


@pytest.mark.slow
def test_dispatch_triton_on_cpu_needs_interpreter():
    code = (
        "from smt_bench.kernels import get_backend\n"
        "try:\n    get_backend('triton', 'cpu')\nexcept ValueError as e:\n    print('ERR', e)\n"
        "print(get_backend('auto', 'cpu').name, get_backend('auto', 'cuda').name)\n"
    )
    res = _run_py(code, TRITON_INTERPRET="0")
    assert res.returncode == 0, res.stderr
    err = res.stdout.splitlines()[0]
    assert err.startswith("ERR") and "TRITON_INTERPRET=1" in err and "kernels=torch" in err
    assert res.stdout.splitlines()[1] == "torch triton"  # compiled triton is auto's pick on cuda


@pytest.mark.slow
def test_import_without_triton():
    code = (
        "import sys, torch\n"
        "sys.modules['triton'] = None  # makes `import triton` raise ImportError\n"
        "import smt_bench.kernels as K\n"
        "assert not K.triton_available()\n"
        "assert K.get_backend('auto', 'cuda').name == 'torch'\n"
        "try:\n    K.get_backend('triton', 'cuda')\nexcept ValueError as e:\n    print('ERR', e)\n"
    )
    res = _run_py(code)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("ERR") and "not installed" in res.stdout


# ----------------------------------------------------------------------------------------------
# compiled kernels on a GPU (bf16 included; the interpreter cannot do bf16)
# ----------------------------------------------------------------------------------------------
_COMPILED_CHECK = r"""
import torch
from smt_bench.kernels import get_backend, torch_ops, triton_ops
assert not triton_ops.INTERPRETED
tri = get_backend("triton", "cuda")
g = torch.Generator(device="cuda").manual_seed(0)
for dtype in (torch.bfloat16, torch.float16, torch.float32):
    for B, T, d_out, d_in in ((256, 1000, 1024, 768), (64, 333, 256, 192)):
        dy = torch.randn(T, d_out, device="cuda", generator=g).to(dtype)
        x = torch.randn(T, d_in, device="cuda", generator=g).to(dtype)
        rows = torch.tensor([0, 3, 1, 3], device="cuda") % (d_out // B)
        cols = torch.tensor([2, 0, 2, 1], device="cuda") % (d_in // B)
        naive = torch_ops.naive_block_weight_grad(dy, x, rows.cpu(), cols.cpu(), B).float()
        ref = torch_ops.block_weight_grad(dy, x, rows, cols, B).cpu()
        torch.testing.assert_close(ref, naive, rtol=1e-4, atol=1e-3)
        for kw in ({}, {"split_k": 1}, {"split_k": 5}, {"split_k": 5, "deterministic": True}):
            got = tri.block_weight_grad(dy, x, rows, cols, B, **kw).cpu()
            torch.testing.assert_close(got, naive, rtol=1e-4, atol=1e-3, msg=f"{dtype} B={B} {kw}")
for wdtype in (torch.bfloat16, torch.float16, torch.float32):
    B, k = 256, 3
    w = torch.randn(1024, 768, device="cuda", generator=g).to(wdtype)
    w0 = w.clone()
    rows, cols = torch.tensor([0, 3, 1], device="cuda"), torch.tensor([2, 0, 2], device="cuda")
    p = torch.randn(k, B, B, device="cuda", generator=g)
    ref = p.clone().requires_grad_(True)
    opt = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.1, foreach=False)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    for step in (1, 2, 3):
        gr = torch.randn(k, B, B, device="cuda", generator=g)
        tri.block_adamw_step_(p, gr, m, v, w, rows, cols, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                              weight_decay=0.1, step=step)
        ref.grad = gr.clone()
        opt.step()
    torch.testing.assert_close(p, ref.detach(), rtol=1e-6, atol=1e-6)
    mask = torch.zeros_like(w, dtype=torch.bool)
    for i, (r, c) in enumerate(zip(rows.tolist(), cols.tolist())):
        assert torch.equal(w[r*B:(r+1)*B, c*B:(c+1)*B], p[i].to(wdtype))
        mask[r*B:(r+1)*B, c*B:(c+1)*B] = True
    assert torch.equal(w[~mask], w0[~mask])
print("COMPILED_OK")
"""


@pytest.mark.skipif(not HAS_CUDA, reason="compiled Triton kernels (and bf16) need a GPU")
def test_triton_compiled_on_gpu_incl_bf16():
    """Runs in a child with TRITON_INTERPRET=0: conftest interprets kernels, which cannot do bf16."""
    res = _run_py(_COMPILED_CHECK, TRITON_INTERPRET="0")
    assert res.returncode == 0 and "COMPILED_OK" in res.stdout, res.stderr[-4000:]


# ----------------------------------------------------------------------------------------------
# benchmark script smoke run
# ----------------------------------------------------------------------------------------------
def test_bench_script_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_kernels", REPO / "scripts" / "bench_kernels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--smoke", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "kernels.json").read_text())
    assert data["rows"] and {"torch", "triton", "dense_same_flops"} <= {r["backend"] for r in data["rows"]}
    assert {r["tokens"] for r in data["rows"]} == {37} and {r["k"] for r in data["rows"]} == {1, 3}
    assert all("pct_of_same_flops_dense" in r for r in data["rows"] if r["op"] == "wgrad" and r["backend"] in ("torch", "triton"))
    assert {"triton_ge_80pct_of_dense_in_all_cases", "triton_ge_2x_torch_in_all_cases"} <= set(data["goals"])
    assert (tmp_path / "kernels.md").read_text().count("|") > 10
