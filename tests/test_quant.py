"""Int8 weights (rwkvkit.quant): the rounding itself, that an int8 model
computes exactly the float model of its dequantised weights (checked against
the `rwkv` package), and that its logits stay close to the fp32 ones."""

from __future__ import annotations

import pytest
import torch

import rwkvkit
from rwkvkit.runtime import infer_cpu
from rwkvkit.models.rwkv4 import RWKV4Config
from rwkvkit.errors import RwkvkitError
from rwkvkit.runtime.quant import Int8Linear, is_quantized, quantize_int8, quantize_weight
from conftest import shared_file
from util import assert_matmul_close, make_model, pip_model

CFG = RWKV4Config(n_layer=3, n_embd=40, vocab_size=61, dim_ffn=72)


def _tokens(vocab, B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, T), generator=g)


def _rnn(model, tokens, state=None):
    outs = []
    with torch.no_grad():
        for t in range(tokens.shape[1]):
            o, state = model(tokens[:, t : t + 1], state)
            outs.append(o)
    return torch.cat(outs, 1), state


def test_quantize_weight_rounding():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 50, generator=g) * torch.tensor([1e-3, 0.1, 1.0, 30.0, 0.0, 1.0])[:, None]
    w[5, 7] = 80.0  # one outlier sets the row's scale
    q, s = quantize_weight(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (6,)
    assert int(q.abs().max()) <= 127
    amax = w.abs().amax(1)
    nz = amax > 0
    torch.testing.assert_close(s[nz], amax[nz] / 127)
    assert torch.all(q[~nz] == 0)
    # Round to nearest: the error of each weight is at most half a step.
    err = (w - q.float() * s[:, None]).abs()
    assert torch.all(err <= s[:, None] / 2 * (1 + 1e-5) + 1e-12)
    # Each row's largest weight is represented exactly (q = +-127).
    assert torch.all(q[nz].abs().amax(1) == 127)


def test_int8_linear_paths_agree():
    """Direct int8 kernel (few rows), torch's int8 matmul and the dequantised
    matrix (many rows) are one function."""
    g = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(72, 37, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(37, 72, generator=g))
    m = Int8Linear.from_linear(lin)
    wq = m.dequantize().double()
    with torch.no_grad():
        for rows in (1, 3, 16, 17, 40):
            x = torch.randn(2, rows, 72, generator=g)
            y = m(x)
            assert y.shape == (2, rows, 37)
            assert_matmul_close(y, x, wq)  # float32 dot products against exact ones
        x = torch.randn(5, 72, generator=g)
        fallback = torch._weight_int8pack_mm(x, m.qweight, m.scale)
        # Two summation orders of the same products: both within the float32 bound.
        assert_matmul_close(m(x), x, wq)
        assert_matmul_close(fallback, x, wq)


def test_int8_model_is_the_float_model_of_its_dequantised_weights(tmp_path):
    """Against the `rwkv` package running the dequantised weights in fp32:
    the only difference int8 makes is the rounding of the weights."""
    model, sd = make_model(CFG, seed=8)
    quantize_int8(model)
    assert is_quantized(model)
    deq = dict(sd)
    for i, block in enumerate(model.blocks):
        for sub, names in (("att", ("key", "value", "receptance", "output")), ("ffn", ("key", "receptance", "value"))):
            for n in names:
                deq[f"blocks.{i}.{sub}.{n}.weight"] = getattr(getattr(block, sub), n).dequantize()
    deq["head.weight"] = model.head.dequantize()
    pm = pip_model(deq, tmp_path)
    tokens = _tokens(CFG.vocab_size, 1, 14, seed=3)
    with torch.no_grad():
        par, st = model(tokens)
        a, s1 = model(tokens[:, :5])
        b, _ = model(tokens[:, 5:], s1)
        ref, ref_state = pm.forward(tokens[0].tolist(), None, full_output=True)
    rnn, st_rnn = _rnn(model, tokens)
    if infer_cpu.load_extension() is not None:
        assert model._decode_plan is not None and model._decode_plan.ok, "the fused int8 step did not run"
    for name, got in (("parallel", par), ("rnn", rnn), ("split", torch.cat([a, b], 1))):
        diff = (got[0] - ref).abs().max().item()
        assert diff < 1e-5, f"int8 {name} logits differ from the rwkv package on the dequantised weights by {diff}"
    for i, (x, y) in enumerate(zip(st.to_rwkv_pip(), ref_state)):
        torch.testing.assert_close(x, y.float(), rtol=1e-5, atol=1e-5, msg=f"state tensor {i}")


def _error(ref, got):
    d = (ref - got).abs()
    top1 = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    return d.max().item(), d.mean().item() / ref.std().item(), top1


def test_int8_logit_error_is_small_on_a_trained_model():
    """rwkv.cpp's tiny trained RWKV-4 on real text: the quantised model keeps
    its predictions (budget, with margin over what per-row int8 gives here:
    ~0.2% mean error relative to the logits' spread, >99% same top-1)."""
    path = shared_file("rwkvcpp/tiny-rwkv-4v0-660K-FP32.bin")
    text = shared_file("tinyshakespeare.txt").read_bytes()[:256]
    tokens = torch.tensor([list(text)])
    fp32 = rwkvkit.load(path)
    int8 = rwkvkit.load(path)
    quantize_int8(int8)
    with torch.no_grad():
        ref, _ = fp32(tokens)
        got, _ = int8(tokens)
    rnn, _ = _rnn(int8, tokens[:, :32])
    assert (rnn - got[:, :32]).abs().max().item() < 1e-4
    worst, rel_mean, top1 = _error(ref, got)
    assert rel_mean < 0.01 and worst < 0.3 and top1 >= 0.97, (worst, rel_mean, top1)
    # Keeping the head in float is an option, and it does not add error.
    mixed = rwkvkit.load(path)
    quantize_int8(mixed, head=False)
    assert isinstance(mixed.head, torch.nn.Linear) and isinstance(mixed.blocks[0].att.key, Int8Linear)
    with torch.no_grad():
        got2, _ = mixed(tokens)
    assert _error(ref, got2)[1] <= rel_mean * 1.5


def test_int8_logit_error_is_small_on_random_weights():
    cfg = RWKV4Config(n_layer=4, n_embd=256, vocab_size=500)
    fp32, _ = make_model(cfg, seed=2)
    int8, _ = make_model(cfg, seed=2)
    quantize_int8(int8)
    tokens = _tokens(cfg.vocab_size, 2, 48)
    with torch.no_grad():
        ref, _ = fp32(tokens)
        got, _ = int8(tokens)
    worst, rel_mean, top1 = _error(ref, got)
    assert rel_mean < 0.03 and top1 >= 0.9, (worst, rel_mean, top1)


def test_quantize_rejects_other_objects_and_is_idempotent():
    with pytest.raises(RwkvkitError, match="expects an rwkvkit RWKV model"):
        quantize_int8(torch.nn.Linear(3, 3))
    model, _ = make_model(CFG)
    assert quantize_int8(model) is model
    q = model.blocks[0].att.key.qweight
    quantize_int8(model)
    assert model.blocks[0].att.key.qweight is q


def test_load_quantize_keyword_and_save_refuses_quantized(tmp_path):
    import rwkvkit
    from rwkvkit.models.rwkv4 import RWKV4Config
    from rwkvkit.errors import CheckpointError
    from rwkvkit.runtime.quant import is_quantized
    from util import make_model

    cfg = RWKV4Config(n_layer=2, n_embd=32, vocab_size=50)
    model, sd = make_model(cfg, seed=1)
    torch.save(sd, tmp_path / "m.pth")
    q = rwkvkit.load(tmp_path / "m.pth", quantize="int8")
    assert is_quantized(q)
    tokens = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        ref, _ = model(tokens)
        got, _ = q(tokens)
    assert 0 < (got - ref).abs().max().item() < 0.2
    with pytest.raises(CheckpointError, match="int8"):
        rwkvkit.save(q, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(rwkvkit.RwkvkitError, match="quantize"):
        rwkvkit.load(tmp_path / "m.pth", quantize="int4")
