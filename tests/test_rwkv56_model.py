"""RWKV-5 (5.0, 5.1, 5.2) and RWKV-6 against the `rwkv` package 0.8.32
(`cpu fp32`, in this process with RWKV_JIT_ON=0) and against themselves:
parallel == RNN == split == batched, the package's state list, a bf16 file,
configs read off shapes, initialisation and gradients."""

from __future__ import annotations

import os

os.environ.setdefault("RWKV_JIT_ON", "0")
os.environ.setdefault("RWKV_CUDA_ON", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

import rwkvkit  # noqa: E402
from rwkvkit import RwkvkitError  # noqa: E402
from rwkvkit.errors import CheckpointError, ShapeError  # noqa: E402
from rwkvkit.models import rwkv5_init, rwkv6_init  # noqa: E402
from rwkvkit.models.rwkv5 import RWKV5, RWKV5Config  # noqa: E402
from rwkvkit.models.rwkv6 import RWKV6, RWKV6Config  # noqa: E402
from rwkvkit.state import MatrixState  # noqa: E402

C5 = RWKV5Config
CONFIGS = {
    # Odd sizes everywhere they can be (1-layer RWKV-5 files need _pip_order).
    "5.0-first-3x48-h16": C5(n_layer=3, n_embd=48, vocab_size=97, head_size=16, dim_ffn=160, gate=False, per_channel_decay=False, bonus="time_first"),
    "5.0-faaaa-2x40-h8": C5(n_layer=2, n_embd=40, vocab_size=131, head_size=8, dim_ffn=96, gate=False, per_channel_decay=False, bonus="time_faaaa"),
    "5.0-first-1x24-h12": C5(n_layer=1, n_embd=24, vocab_size=61, head_size=12, dim_ffn=72, gate=False, per_channel_decay=False, bonus="time_first"),
    "5.1-first-2x56-h8": C5(n_layer=2, n_embd=56, vocab_size=103, head_size=8, dim_ffn=192, gate=True, per_channel_decay=False, bonus="time_first"),
    "5.1-faaaa-3x32-h16": C5(n_layer=3, n_embd=32, vocab_size=89, head_size=16, dim_ffn=96, gate=True, per_channel_decay=False, bonus="time_faaaa"),
    "5.2-3x64-h16": C5(n_layer=3, n_embd=64, vocab_size=97, head_size=16, dim_ffn=224),
    "5.2-2x72-h24": C5(n_layer=2, n_embd=72, vocab_size=257, head_size=24, dim_ffn=128),
    "5.2-1x40-h20": C5(n_layer=1, n_embd=40, vocab_size=71, head_size=20, dim_ffn=64),
    "6-3x48-h16": RWKV6Config(n_layer=3, n_embd=48, vocab_size=97, head_size=16, dim_ffn=160, d_mix=8, d_decay=12),
    "6-2x80-h20": RWKV6Config(n_layer=2, n_embd=80, vocab_size=131, head_size=20, dim_ffn=96, d_mix=4, d_decay=20),
    "6-1x32-h8": RWKV6Config(n_layer=1, n_embd=32, vocab_size=61, head_size=8, dim_ffn=64, d_mix=6, d_decay=10),
}
GENERATIONS = {"5.0": "5", "5.1": "5.1", "5.2": "5.2", "6-": "6"}
SEQS = [[5, 17, 3, 60, 44, 2, 11, 33, 1, 0, 57, 31, 9], [8, 8, 8, 1, 2]]
SPLIT = 4
# fp32 round-off of two independent implementations (spec 4.4: 1.3e-6..5.6e-6
# at three layers); 1e-5 is the bound.  The WKV state holds sums of
# k v^T and is larger than the logits: compared with a relative bound too.
ATOL = 1e-5


def _module(cfg):
    return (RWKV6, rwkv6_init) if isinstance(cfg, RWKV6Config) else (RWKV5, rwkv5_init)


def _model(cfg, seed: int):
    cls, init = _module(cfg)
    sd = init.random_state_dict(cfg, seed=seed)
    m = cls(cfg)
    m.load_state_dict(sd)
    return m.eval(), sd


def _pip_order(sd: dict) -> dict:
    """The same tensors with ln_x and gate first: the package detects the
    version from the keys in file order and, in official order, fails on
    1-layer RWKV-5 files (layer 0's time_decay precedes its ln_x, spec 2.7).
    rwkvkit reads by name, so the order is irrelevant to it."""
    first = [k for k in sd if ".ln_x." in k or k.endswith(".gate.weight")]
    return {**{k: sd[k] for k in first}, **{k: v for k, v in sd.items() if k not in first}}


def _pip_run(path, seqs):
    from rwkv.model import RWKV as PipRWKV

    model = PipRWKV(model=str(path), strategy="cpu fp32", verbose=False)
    res = []
    for seq in seqs:
        full, state = model.forward(list(seq), None, full_output=True)
        rnn, st = [], None
        for t in seq:
            o, st = model.forward([t], st)
            rnn.append(o.float().clone())
        a, st2 = model.forward(list(seq[:SPLIT]), None, full_output=True)
        b, _ = model.forward(list(seq[SPLIT:]), [x.clone() for x in st2], full_output=True)
        res.append({
            "seq": full.float().clone(),
            "rnn": torch.stack(rnn),
            "split": torch.cat([a.float().reshape(-1, a.shape[-1]), b.float().reshape(-1, b.shape[-1])]),
            "state": [x.float().clone() for x in state],
        })
    return model.version, res


@pytest.fixture(scope="module")
def pip_results(tmp_path_factory):
    """The package's outputs for every config, and the models on the same weights."""
    pytest.importorskip("rwkv")
    tmp = tmp_path_factory.mktemp("pip56")
    out = {}
    for i, (name, cfg) in enumerate(CONFIGS.items()):
        m, sd = _model(cfg, seed=20 + i)
        path = tmp / f"{name}.pth"
        torch.save(_pip_order(sd), path)
        version, res = _pip_run(path, [[t % cfg.vocab_size for t in s] for s in SEQS])
        out[name] = (m, res, version)
    return out


def _seqs(cfg):
    return [[t % cfg.vocab_size for t in s] for s in SEQS]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_and_state_match_rwkv_package(pip_results, name):
    model, res, version = pip_results[name]
    gen = next(g for p, g in GENERATIONS.items() if name.startswith(p))
    assert model.generation == gen and str(version) == {"5": "5", "5.1": "5.1", "5.2": "5.2", "6": "6"}[gen]
    with torch.no_grad():
        for seq, ref in zip(_seqs(model.config), res):
            tokens = torch.tensor([seq])
            full, state = model(tokens)
            torch.testing.assert_close(full[0], ref["seq"], atol=ATOL, rtol=0)
            st, rnn = None, []
            for t in seq:
                lg, st = model(torch.tensor([[t]]), st)
                rnn.append(lg[0, 0])
            torch.testing.assert_close(torch.stack(rnn), ref["rnn"], atol=ATOL, rtol=0)
            a, sa = model(tokens[:, :SPLIT])
            b, _ = model(tokens[:, SPLIT:], sa)
            torch.testing.assert_close(torch.cat([a[0], b[0]]), ref["split"], atol=ATOL, rtol=0)
            assert state.generation == gen
            for mine, theirs in zip(state.to_rwkv_pip(), ref["state"]):
                torch.testing.assert_close(mine, theirs.reshape(mine.shape), atol=ATOL, rtol=1e-5)
            back = MatrixState.from_rwkv_pip(ref["state"], generation=gen)
            c, _ = model(torch.tensor([[seq[0]]]), back)
            d, _ = model(torch.tensor([[seq[0]]]), state)
            torch.testing.assert_close(c, d, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_batched_rows_equal_single_runs(pip_results, name):
    model, res, _ = pip_results[name]
    seqs = _seqs(model.config)
    T = len(seqs[1])
    tokens = torch.tensor([seqs[0][:T], seqs[1]])
    with torch.no_grad():
        full, _ = model(tokens)
        st, steps = None, []
        for t in range(T):
            lg, st = model(tokens[:, t : t + 1], st)
            steps.append(lg[:, 0])
    torch.testing.assert_close(full[1], res[1]["seq"], atol=ATOL, rtol=0)
    torch.testing.assert_close(full[0], res[0]["seq"][:T], atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["5.2-3x64-h16", "6-3x48-h16", "5.0-first-3x48-h16"])
def test_bf16_file_with_ln0_folded_in_bf16(tmp_path, name):
    """The package folds ln0 into the embedding in the file's dtype (bf16) for
    v5/v6 (spec 4.4); rwkvkit.load(dtype="float32", ln0_fold_dtype="bfloat16") does the same."""
    pytest.importorskip("rwkv")
    cfg = CONFIGS[name]
    sd16 = {k: v.bfloat16() for k, v in _module(cfg)[1].random_state_dict(cfg, seed=99).items()}
    path = tmp_path / "bf16.pth"
    torch.save(_pip_order(sd16), path)
    _, res = _pip_run(path, _seqs(cfg)[:1])
    model = rwkvkit.load(path, dtype="float32", ln0_fold_dtype="bfloat16")
    assert type(model) is _module(cfg)[0] and model.config == cfg
    with torch.no_grad():
        full, _ = model(torch.tensor(_seqs(cfg)[:1]))
        unfolded = rwkvkit.load(path, dtype="float32")(torch.tensor(_seqs(cfg)[:1]))[0]
    torch.testing.assert_close(full[0], res[0]["seq"], atol=ATOL, rtol=0)
    assert (unfolded[0] - res[0]["seq"]).abs().max() > 10 * ATOL  # the fold dtype matters


def test_long_sequence_parallel_equals_rnn_across_many_chunks():
    cfg = RWKV6Config(n_layer=2, n_embd=32, vocab_size=50, head_size=8, dim_ffn=64, d_mix=4, d_decay=8)
    model, _ = _model(cfg, seed=3)
    tokens = torch.randint(0, 50, (1, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full, st_full = model(tokens)
        a, sa = model(tokens[:, :131])
        b, sb = model(tokens[:, 131:], sa)
        st, rnn = None, []
        for t in range(tokens.shape[1]):
            lg, st = model(tokens[:, t : t + 1], st)
            rnn.append(lg[0, 0])
    torch.testing.assert_close(torch.cat([a, b], 1), full, atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.stack(rnn), full[0], atol=1e-4, rtol=0)
    assert st.allclose(st_full, atol=1e-4, rtol=1e-4) and sb.allclose(st_full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_read_off_shapes_and_round_trip(name):
    cfg = CONFIGS[name]
    cls = type(cfg)
    sd = _module(cfg)[1].random_state_dict(cfg, seed=1)
    again = cls.from_state_dict(sd)
    assert again == cfg and again.generation == cfg.generation
    cfg.validate_tensors(sd)
    assert cls.from_dict(cfg.to_dict()) == cfg
    assert cfg.num_params == sum(v.numel() for v in sd.values())
    if cls is RWKV5Config:
        assert again.rwkvcpp_compatible().group_norm_eps == 1e-5 and again.group_norm_eps == 64e-5


def test_bad_checkpoints_say_what_is_wrong():
    cfg6 = CONFIGS["6-3x48-h16"]
    sd = rwkv6_init.random_state_dict(cfg6)
    bad = dict(sd, **{"blocks.0.att.time_maa_w1": torch.zeros(48, 7)})
    with pytest.raises(ShapeError, match="time_maa_w1.*5 \\* d_mix"):
        RWKV6Config.from_state_dict(bad)
    bad = dict(sd, **{"blocks.1.att.time_decay_w1": torch.zeros(48, 3)})
    with pytest.raises(ShapeError, match="blocks.1.att.time_decay_w1"):
        RWKV6Config.from_state_dict(bad).validate_tensors(bad)
    cfg5 = CONFIGS["5.2-3x64-h16"]
    sd = rwkv5_init.random_state_dict(cfg5)
    bad = {k: v for k, v in sd.items() if ".ln_x." not in k}
    with pytest.raises(CheckpointError, match="ln_x"):
        RWKV5Config.from_state_dict(bad)
    bad = dict(sd, **{"blocks.0.att.time_first": sd["blocks.0.att.time_faaaa"]})
    with pytest.raises(CheckpointError, match="exactly one"):
        RWKV5Config.from_state_dict(bad)


def test_states_of_other_generations_are_refused():
    m5, _ = _model(CONFIGS["5.2-3x64-h16"], seed=1)
    m6, _ = _model(RWKV6Config(n_layer=3, n_embd=64, vocab_size=97, head_size=16, dim_ffn=224, d_mix=4, d_decay=4), seed=1)
    with torch.no_grad():
        _, s5 = m5(torch.tensor([[1, 2]]))
        with pytest.raises(RwkvkitError, match="RWKV-5.2.*RWKV-6"):
            m6(torch.tensor([[1]]), s5)
    st = m5.new_state(2)
    assert st.att_kv.shape == (3, 2, 4, 16, 16) and st.nbytes == CONFIGS["5.2-3x64-h16"].state_bytes_per_sequence * 2


@pytest.mark.parametrize("name", ["5.0-first-3x48-h16", "5.1-faaaa-3x32-h16", "5.2-2x72-h24", "6-2x80-h20"])
def test_gradients_flow_and_chunked_equals_reference(name):
    cfg = CONFIGS[name]
    model, _ = _model(cfg, seed=5)
    model.train().double()
    V = cfg.vocab_size
    tokens = torch.randint(0, V, (2, 37), generator=torch.Generator().manual_seed(1))
    grads = {}
    for backend in ("torch", "reference"):
        model.zero_grad()
        model.wkv_backend = backend
        logits, _ = model(tokens)
        torch.nn.functional.cross_entropy(logits.reshape(-1, V).double(), tokens.reshape(-1)).backward()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads["torch"]) == {n for n, _ in model.named_parameters()}
    for n, g in grads["torch"].items():
        assert torch.isfinite(g).all(), n
        torch.testing.assert_close(g, grads["reference"][n], rtol=1e-8, atol=1e-10, msg=n)


@pytest.mark.parametrize("name", ["5.0-first-3x48-h16", "5.0-faaaa-2x40-h8", "5.2-3x64-h16", "6-3x48-h16"])
def test_official_init(name):
    cfg = CONFIGS[name]
    cls, init = _module(cfg)
    model = cls(cfg)
    init.init_weights(model, seed=0)
    again = cls(cfg)
    init.init_weights(again, seed=0)
    for (n, p), q in zip(model.named_parameters(), again.parameters()):
        assert torch.isfinite(p).all() and torch.equal(p, q), n
    a = model.blocks[0].att
    assert not a.output.weight.detach().any() and not model.blocks[0].ffn.value.weight.detach().any()
    assert float(a.time_decay.detach().min()) == pytest.approx(-6.0)
    with torch.no_grad():
        logits, _ = model(torch.tensor([[1, 2, 3]]))
    assert torch.isfinite(logits).all()
