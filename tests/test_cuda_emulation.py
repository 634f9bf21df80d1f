"""The WKV-6/7 CUDA kernels checked without a GPU.

Two independent checks of the kernels' backward, which has a non-obvious
structure (three passes, no state kept from the forward but ``sa``, dlogw from a
scaling identity; ops/wkv7/NOTES.md "CUDA kernels"):

1. A float64 PyTorch transcription of the passes (one row or column per
   "thread", vectorised over rows) against autograd through the reference
   loop: the maths, to rounding (1e-12).
2. The kernel sources themselves, compiled with the host C++ compiler against
   ``csrc/cuda_emu.h`` (each CUDA thread a host thread, ``__syncthreads`` a
   real barrier) and driven through the same Python wrappers
   (``ops/wkv{6,7}/cuda.py``, autograd Function included) on CPU tensors:
   output, final state and every gradient against the float64 reference,
   float32 and bfloat16, across tile boundaries, with and without a carried
   state, and a sequence split in two.

What this cannot check: the real nvcc build's behaviour on a GPU (memory
spaces, launch limits, speed).  tests/test_cuda_rwkv67.py does, on a GPU.
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from conftest import skip_or_fail
from rwkvkit.ops import cuda_lib
from rwkvkit.ops.wkv6 import cuda as c6
from rwkvkit.ops.wkv6.reference import wkv6_reference
from rwkvkit.ops.wkv7 import cuda as c7
from rwkvkit.ops.wkv7.reference import wkv7_reference


# ------------------------------------------------------------------ inputs
def inputs7(B, T, H, N, seed=0, state=True, extreme=False):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    r, k, v = rnd(B, T, H, N), rnd(B, T, H, N), rnd(B, T, H, N)
    if extreme:
        logw = -torch.rand(B, T, H, N, generator=g, dtype=torch.float64) * 30
    else:  # the model's range: logw in (-0.6065, 0)
        logw = -0.6065306597126334 * torch.sigmoid(rnd(B, T, H, N) * 2)
    kap = torch.nn.functional.normalize(rnd(B, T, H, N), dim=-1)
    alpha = torch.rand(B, T, H, N, generator=g, dtype=torch.float64)
    s = rnd(B, H, N, N) * 0.5 if state else None
    return [r, logw, k, v, -kap, kap * alpha], s


def inputs6(B, T, H, N, seed=0, state=True, rwkv5=False):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    r, k, v = rnd(B, T, H, N), rnd(B, T, H, N), rnd(B, T, H, N)
    if rwkv5:  # one decay per (head, channel), broadcast over B and T
        logw = (-torch.exp(rnd(1, 1, H, N) - 1)).expand(B, T, H, N)
    else:
        logw = -torch.exp(rnd(B, T, H, N) - 1)
    u = rnd(H, N) * 0.5
    s = rnd(B, H, N, N) * 0.5 if state else None
    return [r, k, v, logw, u], s


def run_with_grads(fn, xs, state, dtype, seed=1):
    """Outputs and every gradient of a random linear loss of y and the final state."""
    leaves = [(x.detach().to(dtype) if dtype is not None else x.detach().clone()).requires_grad_(True) for x in xs]
    st = None if state is None else state.detach().float().requires_grad_(True)
    y, S = fn(*leaves, st)
    g = torch.Generator().manual_seed(seed)
    wy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    ws = torch.randn(S.shape, generator=g, dtype=torch.float64).to(S.dtype)
    ((y * wy).sum() + (S * ws).sum()).backward()
    grads = [x.grad for x in leaves] + ([] if st is None else [st.grad])
    return [y, S], grads


def reference_with_grads(ref, xs, state, rounded_to=None, seed=1):
    """The float64 reference on the (optionally bf16-rounded) inputs."""
    xs = [x.to(rounded_to).double() if rounded_to is not None else x for x in xs]
    st = None if state is None else state.float().double()
    return run_with_grads(ref, xs, st, torch.float64, seed)


def close(name, got, ref, rel):
    got, ref = got.detach().double(), ref.detach().double()
    scale = max(1.0, float(ref.abs().max()))
    err = float((got - ref).abs().max()) if ref.numel() else 0.0
    assert err <= rel * scale, f"{name}: max abs err {err:.3g}, max |ref| {scale:.3g}, allowed {rel * scale:.3g}"


# ------------------------------------------- 1. float64 transcription of the passes
def wkv7_backward_passes(r, logw, k, v, a, b, s0, gy, gsT):
    """The three backward passes of wkv7_cuda.cu in float64, rows vectorised.

    Shapes: vectors [T, N] (one batch row and head), s0, gsT [N, N].
    Returns dr, dlogw, dk, dv, da, db, ds0.
    """
    T, N = r.shape
    w = logw.exp()
    # forward: S and the saved sa
    S, sa = s0.clone(), torch.zeros(T, N, dtype=r.dtype)
    for t in range(T):
        sa[t] = S @ a[t]
        S = S * w[t] + torch.outer(sa[t], b[t]) + torch.outer(v[t], k[t])
    # pass 1 (rows of G, reverse): dv, dsa, ds0
    G = gsT.clone()
    dv, dsa = torch.zeros(T, N, dtype=r.dtype), torch.zeros(T, N, dtype=r.dtype)
    for t in reversed(range(T)):
        G = G + torch.outer(gy[t], r[t])  # G^
        dv[t], dsa[t] = G @ k[t], G @ b[t]
        G = G * w[t] + torch.outer(dsa[t], a[t])
    ds0 = G
    # pass 2 (columns of G, reverse): dk, db -- the same G, read by columns
    G = gsT.clone()
    dk, db = torch.zeros(T, N, dtype=r.dtype), torch.zeros(T, N, dtype=r.dtype)
    for t in reversed(range(T)):
        G = G + torch.outer(gy[t], r[t])
        dk[t], db[t] = G.T @ v[t], G.T @ sa[t]
        G = G * w[t] + torch.outer(dsa[t], a[t])
    # pass 3 (columns of S, forward from S_0 with the saved sa): dr, da, dlogw
    S = s0.clone()
    dr, da, dlogw = (torch.zeros(T, N, dtype=r.dtype) for _ in range(3))
    c = (ds0 * s0).sum(0)  # P_0[j] = sum_i dS_0[i][j] S_0[i][j]
    for t in range(T):
        da[t] = S.T @ dsa[t]
        S = S * w[t] + torch.outer(sa[t], b[t]) + torch.outer(v[t], k[t])
        dr[t] = S.T @ gy[t]
        c = c - a[t] * da[t]
        dlogw[t] = c
        c = c + k[t] * dk[t] + b[t] * db[t] - r[t] * dr[t]
    return dr, dlogw, dk, dv, da, db, ds0


def wkv6_backward_passes(r, k, v, logw, u, s0, gy, gsT):
    """The three backward passes of wkv6_cuda.cu in float64 ([T, N] vectors, [N, N] matrices)."""
    T, N = r.shape
    w = logw.exp()
    dyv = (gy * v).sum(-1)  # [T]
    bonus = (r * u * k).sum(-1)
    # pass 1 (rows of G, reverse): dk, du, X, ds0
    G = gsT.clone()
    dk, X = torch.zeros(T, N, dtype=r.dtype), torch.zeros(T, N, dtype=r.dtype)
    du = torch.zeros(N, dtype=r.dtype)
    for t in reversed(range(T)):
        gv = G @ v[t]
        dk[t] = gv + r[t] * u * dyv[t]
        X[t] = k[t] * gv
        du = du + r[t] * k[t] * dyv[t]
        G = w[t][:, None] * G + torch.outer(r[t], gy[t])
    ds0 = G
    # pass 2 (columns of G, reverse): dv
    G = gsT.clone()
    dv = torch.zeros(T, N, dtype=r.dtype)
    for t in reversed(range(T)):
        dv[t] = G.T @ k[t] + bonus[t] * gy[t]
        G = w[t][:, None] * G + torch.outer(r[t], gy[t])
    # pass 3 (rows of S, forward): dr, dlogw
    S = s0.clone()
    dr, dlogw = torch.zeros(T, N, dtype=r.dtype), torch.zeros(T, N, dtype=r.dtype)
    c = (ds0 * s0).sum(1)  # P_0[i] = sum_j dS_0[i][j] S_0[i][j]
    for t in range(T):
        drs = S @ gy[t]
        dr[t] = drs + u * k[t] * dyv[t]
        c = c - r[t] * drs
        dlogw[t] = c
        c = c + X[t]
        S = w[t][:, None] * S + torch.outer(k[t], v[t])
    return dr, dk, dv, dlogw, du, ds0


def _autograd(ref, xs, s0, gy, gsT):
    leaves = [x.clone().requires_grad_(True) for x in xs] + [s0.clone().requires_grad_(True)]
    y, S = ref(*leaves)
    torch.autograd.backward([y, S], [gy, gsT])
    return [x.grad for x in leaves]


@pytest.mark.parametrize("T", [1, 2, 17, 40])
@pytest.mark.parametrize("extreme", [False, True])
def test_wkv7_backward_maths_float64(T, extreme):
    N = 6
    xs, s0 = inputs7(1, T, 1, N, seed=T, extreme=extreme)
    g = torch.Generator().manual_seed(99)
    gy = torch.randn(1, T, 1, N, generator=g, dtype=torch.float64)
    gsT = torch.randn(1, 1, N, N, generator=g, dtype=torch.float64)
    want = _autograd(wkv7_reference, xs, s0, gy, gsT)
    got = wkv7_backward_passes(*(x[0, :, 0] for x in xs), s0[0, 0], gy[0, :, 0], gsT[0, 0])
    names = ["r", "logw", "k", "v", "a", "b", "state"]
    for name, a, w in zip(names, got, want):
        w = w[0, 0] if name == "state" else w[0, :, 0]
        torch.testing.assert_close(a, w, rtol=1e-10, atol=1e-10, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("T", [1, 2, 17, 40])
def test_wkv6_backward_maths_float64(T):
    N = 6
    xs, s0 = inputs6(1, T, 1, N, seed=T)
    g = torch.Generator().manual_seed(98)
    gy = torch.randn(1, T, 1, N, generator=g, dtype=torch.float64)
    gsT = torch.randn(1, 1, N, N, generator=g, dtype=torch.float64)
    want = _autograd(wkv6_reference, xs, s0, gy, gsT)
    r, k, v, logw, u = xs
    got = wkv6_backward_passes(r[0, :, 0], k[0, :, 0], v[0, :, 0], logw[0, :, 0], u[0], s0[0, 0], gy[0, :, 0], gsT[0, 0])
    names = ["r", "k", "v", "logw", "u", "state"]
    for name, a, w in zip(names, got, want):
        w = w[0] if name == "u" else (w[0, 0] if name == "state" else w[0, :, 0])
        torch.testing.assert_close(a, w, rtol=1e-10, atol=1e-10, msg=lambda m: f"grad {name}: {m}")


# ------------------------------------------- 2. the kernel sources, emulated on the CPU
@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """Point ops/wkv{6,7}/cuda.py at host-C++ builds of the kernel sources."""
    folder = tmp_path_factory.mktemp("emu")
    libs = {}
    for name, mod in (("wkv7_cuda", c7), ("wkv6_cuda", c6)):
        try:
            lib = ctypes.CDLL(str(cuda_lib.build_emulation(name, folder)))
        except cuda_lib.KernelBuildError as e:
            skip_or_fail(f"cannot build the CUDA emulation of {name}: {e}")
        mod._declare(lib)
        libs[name] = (mod, lib)
    for mod, lib in libs.values():
        mod._emulation = lib
    yield
    for mod, _ in libs.values():
        mod._emulation = None


NAMES7 = ["r", "logw", "k", "v", "a", "b", "state"]
NAMES6 = ["r", "k", "v", "logw", "u", "state"]


@pytest.mark.parametrize("T", [1, 15, 16, 17, 33])
@pytest.mark.parametrize("with_state", [False, True])
def test_emulated_wkv7_fp32(emulated, T, with_state):
    xs, s0 = inputs7(2, T, 2, 16, seed=T + 100 * with_state, state=with_state)
    want_out, want_g = reference_with_grads(wkv7_reference, xs, s0)
    got_out, got_g = run_with_grads(c7.wkv7_cuda, xs, s0, torch.float32)
    assert got_out[0].dtype == torch.float32 and got_g[0].dtype == torch.float32
    for name, a, b in zip(["y", "state"], got_out, want_out):
        close(name, a, b, 2e-6)
    for name, a, b in zip(NAMES7, got_g, want_g):
        close(f"grad {name}", a, b, 5e-6)


def test_emulated_wkv7_extreme_decays_and_n32(emulated):
    """logw down to -30 (w ~ 1e-13), head size 32, a tile length not dividing T."""
    xs, s0 = inputs7(1, 37, 1, 32, seed=5, extreme=True)
    want_out, want_g = reference_with_grads(wkv7_reference, xs, s0)
    got_out, got_g = run_with_grads(c7.wkv7_cuda, xs, s0, torch.float32)
    for name, a, b in zip(["y", "state"], got_out, want_out):
        close(name, a, b, 2e-6)
    for name, a, b in zip(NAMES7, got_g, want_g):
        close(f"grad {name}", a, b, 5e-6)


@pytest.mark.parametrize("T", [1, 20])
def test_emulated_wkv7_bf16(emulated, T):
    """bf16 inputs: fp32 arithmetic, so the target is the reference on the rounded
    inputs; gradients come back in bf16 (8-bit mantissa)."""
    xs, s0 = inputs7(1, T, 2, 16, seed=7 + T)
    want_out, want_g = reference_with_grads(wkv7_reference, xs, s0, rounded_to=torch.bfloat16)
    got_out, got_g = run_with_grads(c7.wkv7_cuda, xs, s0, torch.bfloat16)
    assert got_out[0].dtype == torch.float32 and got_g[0].dtype == torch.bfloat16 and got_g[-1].dtype == torch.float32
    for name, a, b in zip(["y", "state"], got_out, want_out):
        close(name, a, b, 2e-6)
    for name, a, b in zip(NAMES7, got_g, want_g):
        close(f"grad {name}", a, b, 2e-6 if name == "state" else 8e-3)


def test_emulated_wkv7_split_and_step(emulated):
    """One call over 50 tokens == 23 + 27 with the state carried == 50 decode steps."""
    xs, s0 = inputs7(2, 50, 2, 16, seed=3)
    xs32, s32 = [x.float() for x in xs], s0.float()
    y, S = c7.wkv7_cuda(*xs32, s32)
    y1, S1 = c7.wkv7_cuda(*(x[:, :23] for x in xs32), s32)
    y2, S2 = c7.wkv7_cuda(*(x[:, 23:] for x in xs32), S1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, rtol=0, atol=0)
    torch.testing.assert_close(S2, S, rtol=0, atol=0)
    St = s32
    for t in range(50):
        yt, St = c7.wkv7_step_cuda(*(x[:, t] for x in xs32), St)
        torch.testing.assert_close(yt, y[:, t], rtol=0, atol=0)
    torch.testing.assert_close(St, S, rtol=0, atol=0)
    assert s32.equal(s0.float())  # the caller's state is never modified


def test_emulated_wkv7_long_sequence_dlogw_drift(emulated):
    """dlogw is a running sum over all T tokens (the scaling identity): its fp32
    error at T = 1500 stays at the level of the other gradients."""
    xs, s0 = inputs7(1, 1500, 1, 16, seed=11)
    want_out, want_g = reference_with_grads(wkv7_reference, xs, s0)
    got_out, got_g = run_with_grads(c7.wkv7_cuda, xs, s0, torch.float32)
    close("y", got_out[0], want_out[0], 1e-5)
    for name, a, b in zip(NAMES7, got_g, want_g):
        close(f"grad {name}", a, b, 2e-5)


@pytest.mark.parametrize("T", [1, 15, 16, 17, 33])
@pytest.mark.parametrize("with_state", [False, True])
def test_emulated_wkv6_fp32(emulated, T, with_state):
    xs, s0 = inputs6(2, T, 2, 16, seed=T + 100 * with_state, state=with_state)
    want_out, want_g = reference_with_grads(wkv6_reference, xs, s0)
    got_out, got_g = run_with_grads(c6.wkv6_cuda, xs, s0, torch.float32)
    for name, a, b in zip(["y", "state"], got_out, want_out):
        close(name, a, b, 2e-6)
    for name, a, b in zip(NAMES6, got_g, want_g):
        close(f"grad {name}", a, b, 5e-6)


def test_emulated_wkv6_rwkv5_broadcast_decay(emulated):
    """RWKV-5: one logw per (head, channel) expanded over B and T; its gradient sums."""
    xs, s0 = inputs6(2, 21, 2, 16, seed=4, rwkv5=True)
    base = xs[3][:1, :1].clone()
    def fn(r, k, v, lw, u, st):  # noqa: E306
        return c6.wkv6_cuda(r, k, v, lw.expand(r.shape), u, st)

    def ref(r, k, v, lw, u, st):
        return wkv6_reference(r, k, v, lw.expand(r.shape), u, st)

    xs = xs[:3] + [base] + xs[4:]
    want_out, want_g = reference_with_grads(ref, xs, s0)
    got_out, got_g = run_with_grads(fn, xs, s0, torch.float32)
    for name, a, b in zip(["y", "state"], got_out, want_out):
        close(name, a, b, 2e-6)
    for name, a, b in zip(NAMES6, got_g, want_g):
        close(f"grad {name}", a, b, 5e-6)


@pytest.mark.parametrize("T", [1, 20])
def test_emulated_wkv6_bf16(emulated, T):
    xs, s0 = inputs6(1, T, 2, 16, seed=9 + T)
    xs_b = [x.to(torch.bfloat16).double() for x in xs[:4]] + [xs[4].float().double()]
    want_out, want_g = reference_with_grads(wkv6_reference, xs_b, s0)
    leaves = [x.detach().to(torch.bfloat16) for x in xs[:4]] + [xs[4].float()]
    got_out, got_g = run_with_grads(c6.wkv6_cuda, leaves, s0, None)
    assert got_g[0].dtype == torch.bfloat16 and got_g[4].dtype == torch.float32
    for name, a, b in zip(["y", "state"], got_out, want_out):
        close(name, a, b, 2e-6)
    for name, a, b in zip(NAMES6, got_g, want_g):
        close(f"grad {name}", a, b, 2e-6 if name in ("u", "state") else 8e-3)


def test_emulated_wkv6_split_and_step(emulated):
    xs, s0 = inputs6(2, 50, 2, 16, seed=6)
    xs32, s32 = [x.float() for x in xs], s0.float()
    r, k, v, lw, u = xs32
    y, S = c6.wkv6_cuda(r, k, v, lw, u, s32)
    y1, S1 = c6.wkv6_cuda(r[:, :23], k[:, :23], v[:, :23], lw[:, :23], u, s32)
    y2, S2 = c6.wkv6_cuda(r[:, 23:], k[:, 23:], v[:, 23:], lw[:, 23:], u, S1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, rtol=0, atol=0)
    torch.testing.assert_close(S2, S, rtol=0, atol=0)
    St = s32
    for t in range(50):
        yt, St = c6.wkv6_step_cuda(r[:, t], k[:, t], v[:, t], lw[:, t], u, St)
        torch.testing.assert_close(yt, y[:, t], rtol=0, atol=0)
    torch.testing.assert_close(St, S, rtol=0, atol=0)


def test_unsupported_head_size_uses_chunked(emulated):
    xs, s0 = inputs7(1, 9, 1, 12, seed=1)
    y, S = c7.wkv7_cuda(*(x.float() for x in xs), s0.float())
    ry, rS = wkv7_reference(*xs, s0)
    close("y", y, ry, 1e-5)
