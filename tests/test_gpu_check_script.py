"""benchmarks/gpu_check.py, the parts that run without a GPU: arguments, the
model shapes it builds, its FLOP and byte counts, and that a failing section
prints its error and lets the next one run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_arguments(gc):
    a = gc.parse_args([])
    assert a.sections == list(gc.SECTIONS) and a.wkv_T == (1024, 4096, 16384) and a.budget is None
    a = gc.parse_args(["--sections", "wkv67, decode7", "--budget", "250", "--wkv-T", "64,128", "--quick"])
    assert a.sections == ["wkv67", "decode7"] and a.budget == 250 and a.wkv_T == (64, 128) and a.quick
    with pytest.raises(SystemExit):
        gc.parse_args(["--sections", "wkv67,nope"])


def test_no_gpu_exits_cleanly(gc, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert gc.main(["--sections", "wkv67"]) == 1
    assert "no CUDA GPU" in capsys.readouterr().err


def test_shapes_and_counts_at_full_size_on_meta(gc):
    """The 0.4B and 1.5B shapes the benchmark builds, on the meta device (no memory)."""
    cfg = gc.rwkv7_config(24, 1024, 65536)
    m = gc.build_rwkv7(cfg, device="meta")
    total = gc.param_count(m, exclude_embedding=False)
    # The spec's v7 formula (8.3) and the README's 450.834432M for L24-D1024.
    assert total == 450_834_432
    fl = gc.train_flops_per_token(cfg, gc.param_count(m))
    assert 6 * gc.param_count(m) < fl < 6.2 * gc.param_count(m)
    cfg15 = gc.rwkv7_config(24, 2048, 65536)
    m15 = gc.build_rwkv7(cfg15, device="meta", dtype=torch.bfloat16)
    n15 = gc.param_count(m15, exclude_embedding=False)
    assert 1.4e9 < n15 < 1.6e9
    nbytes = gc.decode_bytes_per_token(m15, 1)
    # bf16 weights except the embedding, one embedding row, the fp32 state twice.
    emb = 65536 * 2048
    state = 24 * (2 * 2048 + 32 * 64 * 64) * 4
    assert nbytes == 2 * (n15 - emb) + 2 * 2048 + 2 * state


def test_tiny_model_builds_and_runs_on_cpu(gc):
    cfg = gc.rwkv7_config(2, 128, 97)
    m = gc.build_rwkv7(cfg, device="cpu").eval()
    assert torch.isfinite(m.head.weight).all() and float(m.blocks[0].att.k_k.detach().mean()) == pytest.approx(0.85)
    logits, state = m(torch.randint(0, 97, (2, 9)))
    assert logits.shape == (2, 9, 97) and torch.isfinite(logits).all()


def test_inputs_helpers_on_cpu(gc):
    xs = gc._wkv7_inputs(1, 5, 2, 16, torch.bfloat16, device="cpu")
    assert len(xs) == 6 and all(x.dtype == torch.bfloat16 and x.shape == (1, 5, 2, 16) for x in xs)
    assert float(xs[1].float().max()) <= 0 and float(xs[1].float().min()) >= -0.61
    xs = gc._wkv6_inputs(1, 5, 2, 16, torch.float32, device="cpu")
    assert len(xs) == 5 and xs[4].shape == (2, 16) and float(xs[3].max()) < 0


def test_failing_section_prints_and_continues(gc, capsys, tmp_path):
    out = tmp_path / "res.txt"
    gc.OUT_FILE = str(out)
    try:

        @gc.section("boom")
        def boom():
            raise RuntimeError("simulated failure")

        boom()
        gc.DEADLINE = 0.0
        assert gc.out_of_time("later")
    finally:
        gc.OUT_FILE, gc.DEADLINE = None, None
    text = out.read_text()
    assert "FAILED: boom" in text and "simulated failure" in text and "(boom:" in text
    assert "SKIPPED" in text
