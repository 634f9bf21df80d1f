"""The GPU path of RWKV-5/6/7: the WKV-6 and WKV-7 CUDA kernels and the models on a GPU.

Tests marked ``cuda`` need an NVIDIA GPU (conftest skips them otherwise; run
them with ``pytest -m cuda``; benchmarks/gpu_check.sh does).  The unmarked
ones run everywhere: without a GPU nothing is ever built, a failed build
falls back to the chunked PyTorch backend with one warning, and where nvcc
exists both kernel sources compile through the build helper.  The kernels'
code itself is also run on the CPU, under an emulation, by
tests/test_cuda_emulation.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from conftest import IN_CI
from rwkvkit.ops import cuda as rwkv4_cuda
from rwkvkit.ops.cuda_lib import KernelBuildError
from rwkvkit.ops import wkv6 as ops6
from rwkvkit.ops import wkv7 as ops7
from rwkvkit.ops.wkv6 import cuda as c6
from rwkvkit.ops.wkv6.reference import wkv6_reference
from rwkvkit.ops.wkv7 import cuda as c7
from rwkvkit.ops.wkv7.reference import wkv7_reference
from test_cuda_emulation import NAMES6, NAMES7, close, inputs6, inputs7, reference_with_grads, run_with_grads

MODULES = [pytest.param(c7, ops7, id="wkv7"), pytest.param(c6, ops6, id="wkv6")]


# ----------------------------------------------------------------- no GPU needed
@pytest.fixture
def fresh(monkeypatch):
    """Both libraries and dispatchers with their one-time build/warning memory cleared."""
    for mod, ops in ((c7, ops7), (c6, ops6)):
        monkeypatch.setattr(mod.LIBRARY, "lib", None)
        monkeypatch.setattr(mod.LIBRARY, "failed", None)
        monkeypatch.setattr(mod.LIBRARY, "warned", False)
        monkeypatch.setattr(ops._BACKENDS, "cache", {})


@pytest.mark.parametrize("mod,ops", MODULES)
def test_no_gpu_never_builds(fresh, monkeypatch, mod, ops):
    def boom(*a, **k):
        raise AssertionError("build() must not run without a GPU")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(mod.LIBRARY, "build", boom)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mod.get_implementation() is None
        assert ops.resolve_backend("auto", torch.device("cuda")) == "torch"
        assert ops.resolve_backend("cuda", torch.device("cuda")) == "torch"
        # On CPU tensors "auto" is the compiled CPU kernel (or "torch"), never CUDA.
        assert ops.resolve_backend("auto", torch.device("cpu")) in ("cpu", "torch")


@pytest.mark.parametrize("mod,ops", MODULES)
def test_failed_build_falls_back_with_one_warning(fresh, monkeypatch, mod, ops):
    calls = []

    def failing_build(*a, **k):
        calls.append(1)
        raise KernelBuildError("nvcc failed: simulated")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(mod.LIBRARY, "build", failing_build)
    with pytest.warns(RuntimeWarning, match="falling back to the slower PyTorch 'torch' backend") as rec:
        backend = ops.resolve_backend("auto", torch.device("cuda"))
        assert mod.get_implementation() is None  # asked again: no rebuild, no second warning
        assert ops.resolve_backend("cuda", torch.device("cuda")) == "torch"
    assert backend == "torch"
    assert len([r for r in rec if issubclass(r.category, RuntimeWarning)]) == 1
    assert len(calls) == 1
    assert "simulated" in str(rec[0].message)


def test_cuda_backends_are_registered():
    assert "cuda" in ops7.BACKENDS and "cuda" in ops6.BACKENDS


def test_cuda_backend_rejects_cpu_tensors():
    xs, s = inputs7(1, 2, 1, 16)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        c7.wkv7_cuda(*(x.float() for x in xs), None)
    xs, s = inputs6(1, 2, 1, 16)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        c6.wkv6_cuda(*(x.float() for x in xs), None)


def test_cpu_steps_never_touch_the_kernel(monkeypatch):
    """The decode steps on CPU tensors stay the PyTorch ops (the kernel path is for CUDA tensors)."""
    monkeypatch.setattr(c7, "wkv7_step_cuda", lambda *a: pytest.fail("kernel step on CPU tensors"))
    monkeypatch.setattr(c6, "wkv6_step_cuda", lambda *a: pytest.fail("kernel step on CPU tensors"))
    xs, s = inputs7(1, 1, 1, 16)
    ops7.wkv7_step(*(x[:, 0].float() for x in xs), s.float())
    xs, s = inputs6(1, 1, 1, 16)
    r, k, v, lw, u = (x.float() for x in xs)
    ops6.wkv6_step(r[:, 0], k[:, 0], v[:, 0], lw[:, 0], u, s.float())


@pytest.mark.skipif(rwkv4_cuda.find_nvcc() is None and not IN_CI, reason="no nvcc on this machine (in CI: a failure)")
@pytest.mark.parametrize("mod", [c7, c6], ids=["wkv7", "wkv6"])
def test_kernel_sources_compile_for_h100_h200(tmp_path, mod):
    """The build helper's own nvcc command for compute capability 9.0 (H100/H200)."""
    lib = mod.LIBRARY.build(capability=(9, 0), directory=tmp_path)
    assert lib.exists() and lib.stat().st_size > 0
    assert not list(tmp_path.glob("*.tmp.so"))
    assert mod.LIBRARY.build(capability=(9, 0), directory=tmp_path) == lib  # cached


# ------------------------------------------------------------------- GPU tests
def _gpu(mod):
    assert mod.get_implementation() is not None, "the CUDA kernel failed to build on a GPU machine"


def _on_gpu(fn):
    """fn applied to CUDA copies of CPU inputs (the helpers build inputs on the CPU)."""

    def run(*args):
        return fn(*(None if a is None else a.cuda() for a in args))

    return run


@pytest.mark.cuda
@pytest.mark.parametrize("T", [1, 2, 15, 16, 17, 64, 100, 300])
@pytest.mark.parametrize("with_state", [False, True])
def test_wkv7_fp32_matches_reference(T, with_state):
    _gpu(c7)
    xs, s0 = inputs7(2, T, 3, 64, seed=T + 1000 * with_state, state=with_state)
    want_out, want_g = reference_with_grads(wkv7_reference, xs, s0)
    got_out, got_g = run_with_grads(_on_gpu(c7.wkv7_cuda), xs, s0, torch.float32)
    for name, a, b in zip(["y", "state"], got_out, want_out):
        close(name, a.cpu(), b, 2e-5)
    for name, a, b in zip(NAMES7, got_g, want_g):
        close(f"grad {name}", a.cpu(), b, 1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("N", [16, 32, 128])
def test_wkv7_other_head_sizes(N):
    _gpu(c7)
    xs, s0 = inputs7(1, 37, 2, N, seed=N)
    want_out, want_g = reference_with_grads(wkv7_reference, xs, s0)
    got_out, got_g = run_with_grads(_on_gpu(c7.wkv7_cuda), xs, s0, torch.float32)
    for name, a, b in zip(["y", "state"], got_out, want_out):
        close(name, a.cpu(), b, 2e-5)
    for name, a, b in zip(NAMES7, got_g, want_g):
        close(f"grad {name}", a.cpu(), b, 1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("T", [1, 17, 200])
def test_wkv7_bf16_matches_reference(T):
    _gpu(c7)
    xs, s0 = inputs7(2, T, 2, 64, seed=50 + T)
    want_out, want_g = reference_with_grads(wkv7_reference, xs, s0, rounded_to=torch.bfloat16)
    got_out, got_g = run_with_grads(_on_gpu(c7.wkv7_cuda), xs, s0, torch.bfloat16)
    assert got_out[0].dtype == torch.float32 and got_g[0].dtype == torch.bfloat16
    for name, a, b in zip(["y", "state"], got_out, want_out):
        close(name, a.cpu(), b, 2e-5)
    for name, a, b in zip(NAMES7, got_g, want_g):
        close(f"grad {name}", a.cpu(), b, 1e-4 if name == "state" else 1e-2)


@pytest.mark.cuda
def test_wkv7_long_sequence_split_and_torch_backend():
    """T = 3000 in one call == 1234 + 1766 with the state carried; the chunked
    backend on the same GPU and the float64 reference agree."""
    _gpu(c7)
    xs, s0 = inputs7(2, 3000, 2, 64, seed=3)
    g = [x.float().cuda() for x in xs]
    s = s0.float().cuda()
    y, S = c7.wkv7_cuda(*g, s)
    y1, S1 = c7.wkv7_cuda(*(x[:, :1234] for x in g), s)
    y2, S2 = c7.wkv7_cuda(*(x[:, 1234:] for x in g), S1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, rtol=0, atol=0)
    torch.testing.assert_close(S2, S, rtol=0, atol=0)
    yt, St = ops7.wkv7(*g, s, backend="torch")
    close("torch backend y", y.cpu(), yt.cpu().double(), 1e-4)
    ry, rS = wkv7_reference(*(x[:1] for x in xs), s0[:1])
    close("y vs float64", y[:1].cpu(), ry, 2e-5)
    close("state vs float64", S[:1].cpu(), rS, 2e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wkv7_step_kernel(dtype):
    """wkv7_step on CUDA tensors without grad runs the kernel; == one reference token."""
    _gpu(c7)
    xs, s0 = inputs7(3, 1, 4, 64, seed=12)
    args = [x[:, 0].to(dtype).cuda() for x in xs]
    y, S = ops7.wkv7_step(*args, s0.float().cuda())
    ry, rS = wkv7_reference(*(x.to(dtype).double() for x in xs), s0.float().double())
    close("step y", y.cpu(), ry[:, 0], 1e-5)
    close("step state", S.cpu(), rS, 1e-5)
    with torch.no_grad():
        calls = []
        orig = c7.wkv7_step_cuda
        try:
            c7.wkv7_step_cuda = lambda *a: calls.append(1) or orig(*a)
            ops7.wkv7_step(*args, s0.float().cuda())
        finally:
            c7.wkv7_step_cuda = orig
        assert calls, "the kernel step was not used"
    ag = [a.float().requires_grad_(True) for a in args]
    y2, _ = ops7.wkv7_step(*ag, s0.float().cuda())
    assert y2.grad_fn is not None  # with a gradient wanted, the differentiable ops run


@pytest.mark.cuda
@pytest.mark.parametrize("T", [1, 2, 15, 16, 17, 64, 100, 300])
@pytest.mark.parametrize("with_state", [False, True])
def test_wkv6_fp32_matches_reference(T, with_state):
    _gpu(c6)
    xs, s0 = inputs6(2, T, 3, 64, seed=T + 1000 * with_state, state=with_state)
    want_out, want_g = reference_with_grads(wkv6_reference, xs, s0)
    got_out, got_g = run_with_grads(_on_gpu(c6.wkv6_cuda), xs, s0, torch.float32)
    for name, a, b in zip(["y", "state"], got_out, want_out):
        close(name, a.cpu(), b, 2e-5)
    for name, a, b in zip(NAMES6, got_g, want_g):
        close(f"grad {name}", a.cpu(), b, 1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("T", [1, 17, 200])
def test_wkv6_bf16_matches_reference(T):
    _gpu(c6)
    xs, s0 = inputs6(2, T, 2, 64, seed=60 + T)
    xs_b = [x.to(torch.bfloat16).double() for x in xs[:4]] + [xs[4].float().double()]
    want_out, want_g = reference_with_grads(wkv6_reference, xs_b, s0)
    leaves = [x.to(torch.bfloat16) for x in xs[:4]] + [xs[4].float()]
    got_out, got_g = run_with_grads(_on_gpu(c6.wkv6_cuda), leaves, s0, None)
    for name, a, b in zip(["y", "state"], got_out, want_out):
        close(name, a.cpu(), b, 2e-5)
    for name, a, b in zip(NAMES6, got_g, want_g):
        close(f"grad {name}", a.cpu(), b, 1e-4 if name in ("u", "state") else 1e-2)


@pytest.mark.cuda
def test_wkv6_long_sequence_split_and_rwkv5_decay():
    _gpu(c6)
    xs, s0 = inputs6(2, 3000, 2, 64, seed=4)
    r, k, v, lw, u = (x.float().cuda() for x in xs)
    s = s0.float().cuda()
    y, S = c6.wkv6_cuda(r, k, v, lw, u, s)
    y1, S1 = c6.wkv6_cuda(r[:, :1234], k[:, :1234], v[:, :1234], lw[:, :1234], u, s)
    y2, S2 = c6.wkv6_cuda(r[:, 1234:], k[:, 1234:], v[:, 1234:], lw[:, 1234:], u, S1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, rtol=0, atol=0)
    torch.testing.assert_close(S2, S, rtol=0, atol=0)
    ry, rS = wkv6_reference(*(x[:1] for x in xs[:4]), xs[4], s0[:1])
    close("y vs float64", y[:1].cpu(), ry, 2e-5)
    # RWKV-5: a constant decay broadcast over T; its gradient sums over tokens.
    xs, s0 = inputs6(2, 40, 2, 64, seed=5, rwkv5=True)
    base = xs[3][:1, :1].clone()

    def fn(r, k, v, lw, u, st):
        return c6.wkv6_cuda(r, k, v, lw.expand(r.shape), u, st)

    def ref(r, k, v, lw, u, st):
        return wkv6_reference(r, k, v, lw.expand(r.shape), u, st)

    xs = xs[:3] + [base] + xs[4:]
    want_out, want_g = reference_with_grads(ref, xs, s0)
    got_out, got_g = run_with_grads(_on_gpu(fn), xs, s0, torch.float32)
    for name, a, b in zip(NAMES6, got_g, want_g):
        close(f"rwkv5 grad {name}", a.cpu(), b, 1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wkv6_step_kernel(dtype):
    _gpu(c6)
    xs, s0 = inputs6(3, 1, 4, 64, seed=13)
    r, k, v, lw, u = xs
    args = [x[:, 0].to(dtype).cuda() for x in (r, k, v, lw)]
    y, S = ops6.wkv6_step(*args, u.float().cuda(), s0.float().cuda())
    ry, rS = wkv6_reference(*(x.to(dtype).double() for x in (r, k, v, lw)), u.float().double(), s0.float().double())
    close("step y", y.cpu(), ry[:, 0], 1e-5)
    close("step state", S.cpu(), rS, 1e-5)


@pytest.mark.cuda
def test_dispatchers_pick_cuda_for_gpu_tensors():
    _gpu(c7)
    _gpu(c6)
    assert ops7.resolve_backend("auto", torch.device("cuda")) == "cuda"
    assert ops6.resolve_backend("auto", torch.device("cuda")) == "cuda"
    assert ops7.resolve_backend("auto", torch.device("cpu")) == "torch"


# ------------------------------------------------------------- models on a GPU
def _tiny(gen: str):
    from rwkvkit.models.rwkv5 import RWKV5Config
    from rwkvkit.models.rwkv6 import RWKV6Config
    from rwkvkit.models.rwkv7 import RWKV7Config

    if gen == "7":
        return RWKV7Config(n_layer=3, n_embd=128, vocab_size=97, head_size=64, d_decay=16, d_aaa=16, d_mv=8, d_gate=32)
    if gen == "6":
        return RWKV6Config(n_layer=3, n_embd=128, vocab_size=97, head_size=64, dim_ffn=256, d_mix=8, d_decay=16)
    return RWKV5Config(n_layer=3, n_embd=128, vocab_size=97, head_size=64, dim_ffn=256)


def _model(gen: str, seed: int, device="cpu", dtype=torch.float32):
    from rwkvkit import models
    from rwkvkit.init import random_state_dict

    cfg = _tiny(gen)
    m = models.build(cfg)
    m.load_state_dict(random_state_dict(cfg, seed=seed))
    return m.to(device=device, dtype=dtype).eval()


GENS = ["5", "6", "7"]


@pytest.mark.cuda
@pytest.mark.parametrize("gen", GENS)
def test_model_logits_gpu_match_cpu(gen):
    """Parallel form, then RNN steps with the carried state: GPU fp32 (kernels) == CPU reference."""
    cpu = _model(gen, 5)
    cpu.wkv_backend = "reference"
    gpu = _model(gen, 5, "cuda")
    tokens = torch.randint(0, 97, (2, 41), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, ref_state = cpu(tokens)
        out, state = gpu(tokens.cuda())
        torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-4)
        assert state.to("cpu").allclose(ref_state, rtol=1e-4, atol=1e-4)
        nxt = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(1))
        for t in range(5):
            ref, ref_state = cpu(nxt[:, t : t + 1], ref_state)
            out, state = gpu(nxt[:, t : t + 1].cuda(), state)
            torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("gen", ["6", "7"])
def test_training_step_bf16_autocast_matches_fp32_cpu(gen):
    """Gradients of a bf16-autocast training step on the GPU (kernels) vs CPU fp32 (reference)."""
    cpu = _model(gen, 8)
    cpu.wkv_backend = "reference"
    gpu = _model(gen, 8, "cuda")
    cpu.train()
    gpu.train()
    assert gpu.wkv_backend == "auto"
    tokens = torch.randint(0, 97, (2, 65), generator=torch.Generator().manual_seed(3))
    logits, _ = cpu(tokens[:, :-1])
    torch.nn.functional.cross_entropy(logits.reshape(-1, 97), tokens[:, 1:].reshape(-1)).backward()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits, _ = gpu(tokens[:, :-1].cuda())
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, 97), tokens[:, 1:].cuda().reshape(-1))
    loss.backward()
    for (name, p_cpu), p_gpu in zip(cpu.named_parameters(), gpu.parameters()):
        if p_cpu.grad is None:
            assert p_gpu.grad is None, name
            continue
        a, b = p_cpu.grad.flatten(), p_gpu.grad.float().cpu().flatten()
        if a.norm() < 1e-6:
            assert b.norm() < 1e-3, name
            continue
        cos = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
        assert cos > 0.95, (name, cos)


@pytest.mark.cuda
@pytest.mark.parametrize("gen", GENS)
def test_cuda_graph_decoder_every_generation(gen):
    from rwkvkit.runtime.cuda_graph import CudaGraphDecoder

    gpu = _model(gen, 9, "cuda")
    prompt = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(4)).cuda()
    with torch.no_grad():
        _, state = gpu(prompt)
    dec = CudaGraphDecoder(gpu, batch_size=2)
    s_model, s_graph = state.clone(), state.clone()
    tok = prompt[:, -1:]
    for _ in range(6):
        with torch.no_grad():
            ref, s_model = gpu(tok, s_model, logits="last")
        out, s_graph = dec(tok, s_graph)
        torch.testing.assert_close(out, ref[:, -1], rtol=1e-5, atol=1e-5)
        tok = ref[:, -1].argmax(-1, keepdim=True)
    assert s_graph.allclose(s_model, rtol=1e-5, atol=1e-5)
    out, _ = dec(tok, None)  # None: an empty context
    with torch.no_grad():
        ref, _ = gpu(tok, logits="last")
    torch.testing.assert_close(out, ref[:, -1], rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_model_bf16_gpu_close_to_cpu_fp32():
    cpu = _model("7", 6)
    cpu.wkv_backend = "reference"
    gpu = _model("7", 6, "cuda", torch.bfloat16)
    tokens = torch.randint(0, 97, (1, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref, _ = cpu(tokens)
        out, _ = gpu(tokens.cuda())
    err = (out.cpu() - ref).abs().max().item()
    assert err < 0.05 * max(1.0, ref.abs().max().item()), err
