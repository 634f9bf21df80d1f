"""The GPU path: the CUDA WKV kernel against the reference, and the model on a GPU.

Tests marked ``cuda`` need an NVIDIA GPU (conftest skips them otherwise; run
them with ``pytest -m cuda``).  The unmarked ones run everywhere: a machine
without a GPU must never try to build the kernel, a failed build must fall
back to the PyTorch path with one warning, and where ``nvcc`` exists the
kernel source must compile.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from rwkvkit import ops
from rwkvkit.models.rwkv4 import RWKV4Config
from rwkvkit.ops import cuda as wkv_cuda_mod
from rwkvkit.ops.reference import wkv_reference
from conftest import IN_CI

from util import make_model


# ----------------------------------------------------------------- no GPU needed
@pytest.fixture
def fresh_cuda_module(monkeypatch):
    """The cuda module with its one-time build/warning memory cleared."""
    monkeypatch.setattr(wkv_cuda_mod, "_lib", None)
    monkeypatch.setattr(wkv_cuda_mod, "_failed", None)
    monkeypatch.setattr(wkv_cuda_mod, "_warned", False)
    monkeypatch.setattr(ops._BACKENDS, "cache", {})
    return wkv_cuda_mod


def test_no_gpu_never_builds(fresh_cuda_module, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("build() must not run without a GPU")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(fresh_cuda_module, "build", boom)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fresh_cuda_module.get_implementation() is None
        # Even CUDA tensors on a machine whose torch sees no GPU go to the torch backend.
        assert ops.resolve_backend("auto", torch.device("cuda")) == "torch"


def test_failed_build_falls_back_with_one_warning(fresh_cuda_module, monkeypatch):
    calls = []

    def failing_build(*a, **k):
        calls.append(1)
        raise fresh_cuda_module.KernelBuildError("nvcc failed: simulated")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(fresh_cuda_module, "build", failing_build)
    with pytest.warns(RuntimeWarning, match="falling back to the slower PyTorch 'torch' backend") as rec:
        backend = ops.resolve_backend("cuda", torch.device("cuda"))
        assert fresh_cuda_module.get_implementation() is None  # asked again: no rebuild, no warning
    assert backend == "torch"
    assert len([r for r in rec if issubclass(r.category, RuntimeWarning)]) == 1
    assert len(calls) == 1
    assert "simulated" in str(rec[0].message)


def test_cuda_backend_rejects_cpu_tensors():
    k = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        wkv_cuda_mod.wkv_cuda(torch.zeros(3), torch.zeros(3), k, k)


@pytest.mark.skipif(wkv_cuda_mod.find_nvcc() is None and not IN_CI, reason="no nvcc on this machine (in CI: a failure)")
def test_kernel_source_compiles(tmp_path):
    lib = wkv_cuda_mod.build(capability=(8, 0), directory=tmp_path)
    assert lib.exists() and lib.stat().st_size > 0
    assert not list(tmp_path.glob("*.tmp.so"))


# ------------------------------------------------------------------- GPU tests
def _inputs(B, T, C, dtype, seed=0, state=True, device="cuda"):
    g = torch.Generator().manual_seed(seed)
    w = -torch.exp(torch.randn(C, generator=g) - 1)
    u = torch.randn(C, generator=g) * 0.5
    k = (torch.randn(B, T, C, generator=g) * 2).to(dtype)
    v = torch.randn(B, T, C, generator=g).to(dtype)
    st = None
    if state:
        # A state reached by running a random prefix: realistic magnitudes.
        _, st = wkv_reference(w, u, torch.randn(B, 5, C, generator=g) * 2, torch.randn(B, 5, C, generator=g))
    mv = lambda x: None if x is None else x.to(device)  # noqa: E731
    return mv(w), mv(u), mv(k), mv(v), None if st is None else tuple(mv(s) for s in st)


def _run_with_grads(fn, w, u, k, v, st, seed=1):
    """Output, final state and every gradient of a random linear loss."""
    leaves = [x.detach().clone().requires_grad_(True) for x in (w, u, k, v)]
    st_leaves = None if st is None else [s.detach().clone().requires_grad_(True) for s in st]
    y, (aa, bb, pp) = fn(*leaves, None if st_leaves is None else tuple(st_leaves))
    g = torch.Generator().manual_seed(seed)
    rnd = lambda t: torch.randn(t.shape, generator=g).to(t.device)  # noqa: E731
    loss = (y.float() * rnd(y)).sum() + (aa * rnd(aa)).sum() + (bb * rnd(bb)).sum() + (pp * rnd(pp)).sum() * 0.1
    loss.backward()
    grads = [x.grad for x in leaves] + ([] if st_leaves is None else [s.grad for s in st_leaves])
    return [y, aa, bb, pp], grads


def _close(name, got, ref, rtol, atol):
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    err = (got - ref).abs()
    tol = atol + rtol * ref.abs()
    worst = float((err - tol).max()) if err.numel() else 0.0
    assert worst <= 0, f"{name}: max abs err {float(err.max()):.3g} (max |ref| {float(ref.abs().max()):.3g})"


def _impl():
    fn = wkv_cuda_mod.get_implementation()
    assert fn is not None, "the CUDA kernel failed to build on a GPU machine"
    return fn


@pytest.mark.cuda
@pytest.mark.parametrize("T", [1, 2, 15, 16, 17, 33, 100])
@pytest.mark.parametrize("with_state", [False, True])
def test_cuda_fp32_matches_reference(T, with_state):
    fn = _impl()
    B, C = 3, 37  # C not a multiple of the block size
    w, u, k, v, st = _inputs(B, T, C, torch.float32, seed=T, state=with_state)
    # The reference runs in float64 on the CPU: an independent, exact target.
    cpu = lambda x: x.double().cpu()  # noqa: E731
    ref_out, ref_grads = _run_with_grads(
        wkv_reference, cpu(w), cpu(u), cpu(k), cpu(v), None if st is None else tuple(cpu(s) for s in st)
    )
    out, grads = _run_with_grads(fn, w, u, k, v, st)
    for name, a, b in zip(["y", "aa", "bb", "pp"], out, ref_out):
        _close(name, a, b, rtol=1e-4, atol=1e-5)
    names = ["w", "u", "k", "v", "aa_in", "bb_in", "pp_in"]
    for name, a, b in zip(names, grads, ref_grads):
        _close(f"grad {name}", a, b, rtol=1e-3, atol=1e-4 * max(1.0, float(b.abs().max())))


@pytest.mark.cuda
@pytest.mark.parametrize("T", [1, 31, 64])
def test_cuda_bf16_inputs_match_reference(T):
    """bf16 k, v: the kernel computes in fp32, so the target is the reference on
    the same (bf16-rounded) inputs; only dk and dv are rounded to bf16."""
    fn = _impl()
    B, C = 2, 64
    w, u, k, v, st = _inputs(B, T, C, torch.bfloat16, seed=7 + T)
    cpu = lambda x: x.double().cpu()  # noqa: E731
    ref_out, ref_grads = _run_with_grads(wkv_reference, cpu(w), cpu(u), cpu(k), cpu(v), tuple(cpu(s) for s in st))
    out, grads = _run_with_grads(fn, w, u, k, v, st)
    assert out[0].dtype == torch.float32 and grads[2].dtype == torch.bfloat16
    for name, a, b in zip(["y", "aa", "bb", "pp"], out, ref_out):
        _close(name, a, b, rtol=1e-4, atol=1e-5)
    names = ["w", "u", "k", "v", "aa_in", "bb_in", "pp_in"]
    for name, a, b in zip(names, grads, ref_grads):
        rtol = 1e-2 if name in ("k", "v") else 1e-3  # bf16 has an 8-bit mantissa
        _close(f"grad {name}", a, b, rtol=rtol, atol=rtol * 0.1 * max(1.0, float(b.abs().max())))


@pytest.mark.cuda
def test_cuda_long_sequence_and_split():
    """No T limit: T = 5000 in one call equals two calls with the state carried,
    and the torch backend on the same GPU agrees."""
    fn = _impl()
    B, T, C = 2, 5000, 96
    w, u, k, v, _ = _inputs(B, T, C, torch.float32, seed=3, state=False)
    y, st = fn(w, u, k, v, None)
    y1, st1 = fn(w, u, k[:, :1234], v[:, :1234], None)
    y2, st2 = fn(w, u, k[:, 1234:], v[:, 1234:], st1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, rtol=1e-5, atol=1e-6)
    for a, b in zip(st, st2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    ref_y, ref_st = wkv_reference(w.cpu().double(), u.cpu().double(), k[:1].cpu().double(), v[:1].cpu().double())
    _close("long y", y[:1], ref_y, rtol=1e-4, atol=1e-5)
    _close("long pp", st[2][:1], ref_st[2], rtol=1e-5, atol=1e-4)


@pytest.mark.cuda
def test_cuda_gradcheck_small():
    """Finite differences on the GPU kernel's fp32 backward (loose: fp32 inputs)."""
    _impl()
    B, T, C = 1, 20, 4
    w, u, k, v, st = _inputs(B, T, C, torch.float32, seed=11)

    def f(w, u, k, v, aa, bb, pp):
        y, (a2, b2, p2) = wkv_cuda_mod.wkv_cuda(w, u, k, v, (aa, bb, pp))
        return y.sum() + (a2 * 0.3).sum() + (b2 * 0.2).sum() + (p2 * 0.1).sum()

    args = [x.detach().clone().requires_grad_(True) for x in (w, u, k, v, *st)]
    out = f(*args)
    grads = torch.autograd.grad(out, args)
    eps = 1e-2
    for i, (a, g) in enumerate(zip(args, grads)):
        flat = a.detach().reshape(-1)
        for j in (0, flat.numel() // 2, flat.numel() - 1):
            plus = [x.detach().clone() for x in args]
            minus = [x.detach().clone() for x in args]
            plus[i].view(-1)[j] += eps
            minus[i].view(-1)[j] -= eps
            fd = (f(*plus) - f(*minus)).item() / (2 * eps)
            assert abs(fd - g.reshape(-1)[j].item()) <= 2e-2 * max(1.0, abs(fd)), (i, j, fd, g.reshape(-1)[j].item())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_step_matches_reference(dtype):
    """The one-launch RNN step (what ops.wkv_step runs on a GPU) == one reference step."""
    _impl()
    B, C = 3, 200
    w, u, k, v, st = _inputs(B, 1, C, dtype, seed=12)
    y, new = ops.wkv_step(w, u, k[:, 0], v[:, 0], st)
    cpu = lambda x: x.double().cpu()  # noqa: E731
    ref_y, ref_new = wkv_reference(cpu(w), cpu(u), cpu(k), cpu(v), tuple(cpu(s) for s in st))
    _close("step y", y, ref_y[:, 0], rtol=1e-5, atol=1e-6)
    for name, a, b in zip(["aa", "bb", "pp"], new, ref_new):
        _close(f"step {name}", a, b, rtol=1e-5, atol=1e-6)
    # With a gradient wanted, the differentiable element-wise form runs instead.
    kg = k[:, 0].float().requires_grad_(True)
    y2, _ = ops.wkv_step(w, u, kg, v[:, 0].float(), st)
    assert y2.grad_fn is not None


@pytest.mark.cuda
def test_dispatcher_picks_cuda_for_gpu_tensors():
    _impl()
    assert ops.resolve_backend("auto", torch.device("cuda")) == "cuda"


def _tiny_cfg():
    return RWKV4Config(n_layer=3, n_embd=64, vocab_size=97)


def _cpu_model(seed):
    # The CPU side runs the reference operator: independent of every fast kernel.
    model = make_model(_tiny_cfg(), seed=seed)[0]
    model.wkv_backend = "reference"
    return model


@pytest.mark.cuda
def test_model_logits_gpu_match_cpu():
    """Parallel forward, RNN steps and a carried state: GPU fp32 logits == CPU."""
    model = _cpu_model(5)
    gpu = make_model(_tiny_cfg(), seed=5)[0].cuda()
    tokens = torch.randint(0, 97, (2, 41), generator=torch.Generator().manual_seed(0))
    ref, ref_state = model(tokens)
    out, state = gpu(tokens.cuda())
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-4)
    assert state.to("cpu").allclose(ref_state, rtol=1e-4, atol=1e-4)
    # Continue token by token (the RNN step) on both.
    nxt = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(1))
    for t in range(5):
        ref, ref_state = model(nxt[:, t : t + 1], ref_state)
        out, state = gpu(nxt[:, t : t + 1].cuda(), state)
        torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
def test_model_bf16_gpu_close_to_cpu_fp32():
    model = _cpu_model(6)
    gpu = make_model(_tiny_cfg(), seed=6, dtype=torch.bfloat16)[0].cuda()
    tokens = torch.randint(0, 97, (1, 64), generator=torch.Generator().manual_seed(2))
    ref, _ = model(tokens)
    out, _ = gpu(tokens.cuda())
    err = (out.cpu() - ref).abs().max().item()
    assert err < 0.05 * max(1.0, ref.abs().max().item()), err
    assert (out.cpu().argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def _step_grads(model, tokens, device, autocast_dtype=None):
    """Gradients of one cross-entropy training step (float32 on the CPU)."""
    model.train()
    model.zero_grad(set_to_none=True)
    x, y = tokens[:, :-1].to(device), tokens[:, 1:].to(device)
    with torch.autocast(device, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        logits, _ = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
    loss.backward()
    return {n: p.grad.detach().float().cpu() for n, p in model.named_parameters()}


def assert_grads_within_bf16_rounding(got, fp32, cpu_bf16, factor=4.0):
    """Elementwise: |got - fp32| <= factor * (what bf16 autocast does to this
    very step on the CPU, the largest |cpu_bf16 - fp32| of the tensor) plus
    two bf16 roundings of the element itself (2 * 2**-8 relative).  A GPU
    kernel that differs from the spec by more than bf16's own rounding of the
    same computation fails, element by element (a cosine only sees the mean)."""
    u = 2.0**-8  # bf16's unit roundoff (8-bit significand)
    for name, ref in fp32.items():
        noise = (cpu_bf16[name] - ref).abs().max().item()
        tol = factor * noise + 2 * u * ref.abs() + 1e-7
        err = (got[name] - ref).abs()
        worst = (err - tol).argmax()
        assert (err <= tol).all(), (
            f"{name}: |gpu - cpu fp32| = {err.flatten()[worst].item():.3g} at {worst.item()} > {tol.flatten()[worst].item():.3g} "
            f"(bf16 on the CPU moves this tensor by up to {noise:.3g})"
        )


@pytest.mark.cuda
def test_training_step_bf16_autocast_matches_fp32_elementwise():
    """Gradients of a bf16-autocast training step on the GPU equal the CPU fp32
    ones within what bf16 rounding of the same step explains (measured on the
    CPU under bf16 autocast), element by element."""
    tokens = torch.randint(0, 97, (2, 33), generator=torch.Generator().manual_seed(3))
    fp32 = _step_grads(_cpu_model(8), tokens, "cpu")
    cpu_bf16 = _step_grads(_cpu_model(8), tokens, "cpu", torch.bfloat16)
    assert any((cpu_bf16[n] != fp32[n]).any() for n in fp32)  # CPU autocast really rounded
    gpu = _step_grads(make_model(_tiny_cfg(), seed=8)[0].cuda(), tokens, "cuda", torch.bfloat16)
    assert gpu.keys() == fp32.keys()
    assert_grads_within_bf16_rounding(gpu, fp32, cpu_bf16)


@pytest.mark.cuda
def test_cuda_graph_decoder_matches_model():
    from rwkvkit.runtime.cuda_graph import CudaGraphDecoder

    gpu = make_model(_tiny_cfg(), seed=9)[0].cuda()
    prompt = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(4)).cuda()
    _, state = gpu(prompt)
    dec = CudaGraphDecoder(gpu, batch_size=2)
    s_model, s_graph = state.clone(), state.clone()
    tok = prompt[:, -1:]
    for _ in range(6):
        ref, s_model = gpu(tok, s_model, logits="last")
        out, s_graph = dec(tok, s_graph)
        torch.testing.assert_close(out, ref[:, -1], rtol=1e-5, atol=1e-5)
        tok = ref[:, -1].argmax(-1, keepdim=True)
    assert s_graph.allclose(s_model, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_load_to_gpu_bf16(tmp_path):
    """rwkvkit.load(path, device="cuda", dtype=bfloat16) runs and agrees with the CPU model."""
    import rwkvkit
    from rwkvkit.init import random_state_dict

    sd = random_state_dict(_tiny_cfg(), seed=10)
    path = tmp_path / "m.pth"
    torch.save(sd, path)
    gpu = rwkvkit.load(path, device="cuda", dtype=torch.bfloat16)
    assert gpu.device.type == "cuda" and gpu.dtype == torch.bfloat16
    cpu = _cpu_model(10)
    tokens = torch.randint(0, 97, (1, 50), generator=torch.Generator().manual_seed(5))
    ref, _ = cpu(tokens)
    out, _ = gpu(tokens.cuda())
    assert (out.cpu() - ref).abs().max().item() < 0.05 * max(1.0, ref.abs().max().item())


def test_graph_decoder_refuses_cpu_model():
    from rwkvkit.runtime.cuda_graph import CudaGraphDecoder
    from rwkvkit.errors import RwkvkitError

    model = make_model(_tiny_cfg(), seed=0)[0]
    with pytest.raises(RwkvkitError, match="CUDA device"):
        CudaGraphDecoder(model)
