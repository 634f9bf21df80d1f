"""The model against the `rwkv` pip package and HF transformers, and its own
invariants: parallel == RNN == split, state operations."""

from __future__ import annotations

import pytest
import torch

from rwkvkit.models.rwkv4 import RWKV4Config
from rwkvkit.errors import RwkvkitError
from rwkvkit.models.rwkv4 import RWKV
from rwkvkit.state import State
from util import hf_model, make_model, pip_model

# Odd sizes on purpose: C_att != C, F != 4C, L = 7 crosses one rescale boundary.
CONFIGS = [
    RWKV4Config(n_layer=7, n_embd=64, vocab_size=97),
    RWKV4Config(n_layer=3, n_embd=40, vocab_size=61, dim_att=24, dim_ffn=72),
    RWKV4Config(n_layer=1, n_embd=16, vocab_size=256),
]
# The rwkv package assumes dim_att == n_embd in its sequence mode.
PIP_CONFIGS = [CONFIGS[0], RWKV4Config(n_layer=3, n_embd=40, vocab_size=61, dim_ffn=72), CONFIGS[2]]
TOL = 1e-5


def _tokens(cfg, B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (B, T), generator=g)


def _rnn(model, tokens, state=None):
    outs = []
    for t in range(tokens.shape[1]):
        o, state = model(tokens[:, t : t + 1], state)
        outs.append(o)
    return torch.cat(outs, 1), state


@pytest.mark.parametrize("cfg", PIP_CONFIGS, ids=lambda c: f"L{c.n_layer}C{c.n_embd}A{c.dim_att}F{c.dim_ffn}V{c.vocab_size}")
def test_logits_match_rwkv_pip_package(cfg, tmp_path):
    model, sd = make_model(cfg, seed=3)
    pm = pip_model(sd, tmp_path)
    tokens = _tokens(cfg, 1, 29)
    with torch.no_grad():
        par, st = model(tokens)
        rnn, st_rnn = _rnn(model, tokens)
        a, s1 = model(tokens[:, :11])
        b, s2 = model(tokens[:, 11:], s1)
        split = torch.cat([a, b], 1)
        ref, ref_state = pm.forward(tokens[0].tolist(), None, full_output=True)
        # The package's RNN mode, token by token.
        pstate = None
        for tok in tokens[0].tolist():
            ref_last, pstate = pm.forward([tok], pstate)
    for name, got in (("parallel", par), ("rnn", rnn), ("split", split)):
        diff = (got[0] - ref).abs().max().item()
        assert diff < TOL, f"{name} logits differ from the rwkv package by {diff}"
    assert (rnn[0, -1] - ref_last).abs().max().item() < TOL
    # The final state, in the package's own layout.
    ours = st.to_rwkv_pip()
    for i, (x, y) in enumerate(zip(ours, ref_state)):
        torch.testing.assert_close(x, y.float(), rtol=1e-5, atol=1e-5, msg=f"state tensor {i}")
    assert st.allclose(st_rnn, rtol=1e-5, atol=1e-5) and st.allclose(s2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg", PIP_CONFIGS[:2], ids=["L7", "L3-odd"])
@pytest.mark.parametrize("rescale", [0, 6])
def test_logits_match_hf_transformers(cfg, rescale):
    model, sd = make_model(cfg, seed=5)
    model.config.rescale_every = rescale
    hf = hf_model(sd, cfg, rescale_every=rescale)
    tokens = _tokens(cfg, 2, 23, seed=1)
    with torch.no_grad():
        par, st = model(tokens)
        rnn, _ = _rnn(model, tokens)
        a, s1 = model(tokens[:, :9])
        b, _ = model(tokens[:, 9:], s1)
        out = hf(tokens, use_cache=True)
        ref = out.logits
        # HF continuing from its own state, one chunk.
        h1 = hf(tokens[:, :9], use_cache=True)
        h2 = hf(tokens[:, 9:], state=h1.state, use_cache=True)
    for name, got in (("parallel", par), ("rnn", rnn), ("split", torch.cat([a, b], 1))):
        diff = (got - ref).abs().max().item()
        assert diff < TOL, f"{name} logits differ from HF (rescale_every={rescale}) by {diff}"
    assert (b - h2.logits).abs().max().item() < TOL
    # State in HF's layout.
    for i, (x, y) in enumerate(zip(st.to_hf(), out.state)):
        torch.testing.assert_close(x, y.float(), rtol=1e-5, atol=1e-4, msg=f"HF state tensor {i}")


def test_dim_att_differs_from_n_embd_matches_hf_parallel():
    """HF's stateful path (and the rwkv package) assume dim_att == n_embd; its
    stateless parallel path does not, so compare that, and our own three modes."""
    cfg = CONFIGS[1]
    model, sd = make_model(cfg, seed=4)
    hf = hf_model(sd, cfg)
    tokens = _tokens(cfg, 2, 19, seed=3)
    with torch.no_grad():
        par, _ = model(tokens)
        rnn, _ = _rnn(model, tokens)
        ref = hf(tokens, use_cache=False).logits
    assert (par - ref).abs().max().item() < TOL
    assert (rnn - ref).abs().max().item() < TOL


def test_ln0_fold_in_bf16_matches_pip_on_bf16_checkpoint(tmp_path):
    """Spec 3.5: on a bf16 file the package folds ln0 into the bf16 table; with
    the same fold we match it, and without it we differ visibly."""
    cfg = CONFIGS[0]
    _, sd = make_model(cfg, seed=7)
    sd16 = {k: v.bfloat16() for k, v in sd.items()}
    pm = pip_model(sd16, tmp_path, name="bf16.pth")
    model = RWKV(cfg)
    model.load_state_dict({k: v.float() for k, v in sd16.items()})
    model.eval()
    tokens = _tokens(cfg, 1, 17, seed=2)
    with torch.no_grad():
        ref, _ = pm.forward(tokens[0].tolist(), None, full_output=True)
        runtime, _ = model(tokens)
        model.fold_ln0("bfloat16")
        folded, _ = model(tokens)
        rnn, _ = _rnn(model, tokens)
    assert (folded[0] - ref).abs().max().item() < TOL
    assert (rnn[0] - ref).abs().max().item() < TOL
    assert (runtime[0] - ref).abs().max().item() > 1e-4  # the switch matters
    # Undoing the fold restores the runtime LN0.
    model.fold_ln0(None)
    with torch.no_grad():
        again, _ = model(tokens)
    assert torch.equal(again, runtime)


def test_last_and_none_logits_modes():
    cfg = CONFIGS[1]
    model, _ = make_model(cfg)
    tokens = _tokens(cfg, 3, 10)
    with torch.no_grad():
        full, st = model(tokens)
        last, st2 = model(tokens, logits="last")
        none, st3 = model(tokens, logits="none")
    assert last.shape == (3, 1, cfg.vocab_size)
    torch.testing.assert_close(last[:, 0], full[:, -1], rtol=0, atol=1e-6)
    assert none is None and st.allclose(st2) and st.allclose(st3)


def test_batch_rows_are_independent():
    cfg = CONFIGS[0]
    model, _ = make_model(cfg)
    tokens = _tokens(cfg, 4, 15)
    with torch.no_grad():
        full, st = model(tokens)
        for b in range(4):
            one, st1 = model(tokens[b : b + 1])
            torch.testing.assert_close(one, full[b : b + 1], rtol=1e-5, atol=1e-5)
            assert st.select(b).allclose(st1)


def test_input_state_is_not_modified_and_state_ops(tmp_path):
    cfg = CONFIGS[1]
    model, _ = make_model(cfg)
    tokens = _tokens(cfg, 3, 8)
    with torch.no_grad():
        _, st = model(tokens)
        keep = st.clone()
        nxt = _tokens(cfg, 3, 4, seed=9)
        out_a, _ = model(nxt, st)
        assert all(torch.equal(a, b) for a, b in zip(st.tensors(), keep.tensors()))
        # select / concat round trip.
        rebuilt = State.concat([st.select(2), st.select(0), st.select(1)]).select([1, 2, 0])
        assert all(torch.equal(a, b) for a, b in zip(rebuilt.tensors(), st.tensors()))
        out_b, _ = model(nxt, rebuilt)
        assert torch.equal(out_a, out_b)
        # save / load.
        st.save(tmp_path / "s.safetensors")
        loaded = State.load(tmp_path / "s.safetensors")
        assert all(torch.equal(a, b) for a, b in zip(loaded.tensors(), st.tensors()))
        # expand a prefix state to a batch.
        one = st.select(1).expand(3)
        assert one.batch_size == 3 and torch.equal(one.att_pp[:, 2], st.att_pp[:, 1])
    assert st.att_x.dtype == torch.float32 and st.att_x.shape == (cfg.n_layer, 3, cfg.n_embd)
    assert st.att_aa.shape == (cfg.n_layer, 3, cfg.dim_att)
    assert st.nbytes == 3 * cfg.state_bytes_per_sequence


def test_empty_state_layout():
    cfg = CONFIGS[0]
    st = State.for_config(cfg, batch=2)
    assert (st.att_pp == -1e30).all() and (st.att_aa == 0).all() and (st.ffn_x == 0).all()


def test_bad_inputs_are_clear(tmp_path):
    cfg = CONFIGS[1]
    model, _ = make_model(cfg)
    with pytest.raises(RwkvkitError, match="empty"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(RwkvkitError, match="out of range"):
        model(torch.tensor([[cfg.vocab_size]]))
    with pytest.raises(RwkvkitError, match="2-D"):
        model(torch.tensor([1, 2]))
    _, st = model(torch.tensor([[1, 2], [3, 4]]))
    with pytest.raises(RwkvkitError, match="state field"):
        model(torch.tensor([[1]]), st)  # batch 2 state, batch 1 tokens
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a state")
    with pytest.raises(RwkvkitError, match="bad.safetensors"):
        State.load(bad)


def test_param_count_formula():
    cfg = RWKV4Config(n_layer=12, n_embd=768, vocab_size=50277)
    assert cfg.num_params == 169_342_464  # spec 1.5
    small = CONFIGS[1]
    assert RWKV(small).num_parameters() == small.num_params


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_fp32(dtype):
    cfg = CONFIGS[0]
    model, _ = make_model(cfg, seed=2)
    tokens = _tokens(cfg, 1, 20)
    with torch.no_grad():
        ref, _ = model(tokens)
        model.to(dtype)
        model.config.rescale_every = 6 if dtype == torch.float16 else 0
        got, st = model(tokens)
        rnn, _ = _rnn(model, tokens)
    assert got.dtype == torch.float32 and st.att_aa.dtype == torch.float32
    tol = 0.15
    assert (got - ref).abs().max().item() < tol
    assert (rnn - ref).abs().max().item() < tol
