"""The fused CPU decoder: one C++ call per generated token (``csrc/infer_cpu.cpp``,
RWKV-5/6 in ``csrc/step56.h``).

An RWKV-4, -5 (5.0, 5.1, 5.2), -6 or -7 model's ``forward`` uses it for T == 1 on the CPU when no gradient
is recorded and the weight matrices are float32, bfloat16, float16 (or int8, see
:mod:`rwkvkit.runtime.quant`), once :func:`rwkvkit.runtime.accelerate` has
attached it.

Half-precision weights (the official bf16 files, as ``rwkvkit.load`` keeps
them) are read as stored, 2 bytes per weight, and widened to fp32 in
registers: bf16 by a 16-bit shift, fp16 by vcvtph2ps / F16C, both exact.
Everything else runs in fp32: the activations, the products' sums, the WKV
state, LayerNorms; the per-channel vectors and LayerNorm parameters of a half
model are used through fp32 copies the plan makes once (exact: every bf16/fp16
value is a float), and its RWKV-6/7 LoRA matrices through transposed copies
kept in their half dtype (read and widened like the big matrices: 2 bytes a
weight, ~12% of a half RWKV-7 0.4B's bytes per token if they were fp32).  So the fused step of a bf16 model
computes the fp32 model on the bf16 weights, up to fp32 summation order; the
model's own PyTorch step in bf16 rounds every activation to bf16 as well, and
is less accurate (tests/test_half_decode.py states both errors).  AVX512-BF16
dot products (vdpbf16ps, which also round the activations to bf16) are
available with :func:`set_bf16_dot`; they are not the default: decoding is
bound by memory bandwidth, so they gain little, and they double the error
(see the measurements in tests/test_half_decode.py).  The extension is built on first use with
``torch.utils.cpp_extension`` (a few seconds; it includes only pybind11 and
ATen/Parallel.h) and cached in torch's extension folder.  Where it cannot be
built, one warning names the cause and the model keeps its pure-PyTorch RNN
step, which gives the same logits, only slower.

The C++ side receives raw data pointers; this module is where they are
checked: every tensor is float32 (int8, bf16 or fp16 for weight matrices), contiguous and
on the CPU, with the shape the config says.  The table of pointers is cached
per model and rebuilt whenever a tensor moved (``.to()``, a new Parameter) or a
precomputed value's source changed in place (``time_decay``, a LoRA matrix
held transposed); see :meth:`DecodePlan.current`.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

_log = logging.getLogger(__name__)

# step56.h is #included by infer_cpu.cpp; _cbuild hashes the .h files beside
# the source into the build folder's name, so a change to it rebuilds.
_SOURCE = Path(__file__).with_name("csrc") / "infer_cpu.cpp"
# No -march: the kernels carry their own target attributes and are chosen at
# run time, so a build cache shared between machines stays correct.  Of
# fast-math only the exception-free part (no errno, no traps), so exp
# vectorises while inf and exp(-1e30) == 0 keep their meaning.
_CFLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fopenmp"]

_ext: object | None = None
_tried: dict[bool, bool] = {}
_build_seconds: float | None = None

# Per-layer table layout, mirrored from the C++ `Slot` enum.
_LN1_W, _LN1_B, _LN2_W, _LN2_B, _W, _U, _ATT_MK, _ATT_MV, _ATT_MR, _FFN_MK, _FFN_MR, _LIN0 = range(12)
LAYER_SLOTS = _LIN0 + 7 * 5
# RWKV-7: 19 vectors, then 14 linears x 5 slots (the C++ `Slot7` / `Lin7` enums).
V7_VECTORS = ("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias", "att.x_r", "att.x_w", "att.x_k", "att.x_v",
              "att.x_a", "att.x_g", "att.w0", "att.a0", "att.v0", "att.k_k", "att.k_a", "att.r_k",
              "att.ln_x.weight", "att.ln_x.bias", "ffn.x_k")
V7_LINEARS = ("receptance", "key", "value", "output", "w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2",
              "ffn.key", "ffn.value")
V7_SLOTS = len(V7_VECTORS) + 5 * len(V7_LINEARS)
# RWKV-5/6: 16 vectors, then 12 linears x 5 slots (the C++ `Slot56` / `Lin56` enums, csrc/step56.h).
V56_VECTORS = ("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias", "mix_k", "mix_v", "mix_r", "mix_g",
               "maa_x", "maa_w", "decay", "u", "ln_x.weight", "ln_x.bias", "ffn.mix_k", "ffn.mix_r")
V56_LINEARS = ("receptance", "key", "value", "gate", "output", "time_maa_w1", "time_maa_w2", "time_decay_w1",
               "time_decay_w2", "ffn.key", "ffn.receptance", "ffn.value")
V56_SLOTS = len(V56_VECTORS) + 5 * len(V56_LINEARS)
GENERATIONS56 = ("5", "5.1", "5.2", "6")
# Above this batch the matrix-matrix products are large enough for the BLAS
# (the PyTorch step) to be faster than the fused kernel's row-block products
# (measured on the 169M shape: even at 64, ahead at 128).
MAX_BATCH = 64
# Half-precision matrices with no SIMD family (a CPU without AVX2 + F16C, or
# not x86): the scalar C++ loop converts and adds one weight at a time (2 tok/s
# on the 169M shape here) while PyTorch's own bf16/fp16 step runs at ~37, so
# the fused step steps aside for them.  Tests set this to check the scalar
# kernels anyway.
HALF_SCALAR = False


def load_extension(force_fail: bool = False):
    """The compiled module, building it on first use; None (after one warning) if it cannot be built.

    ``force_fail=True`` takes the failure path without compiling, so tests can
    check the fallback on a machine that has a compiler.
    """
    global _ext, _build_seconds
    if force_fail:
        if not _tried.get(True):
            _tried[True] = True
            warnings.warn(_fail_message("build disabled by load_extension(force_fail=True)"), RuntimeWarning, stacklevel=2)
        return None
    if _tried.get(False):
        return _ext
    _tried[False] = True
    try:
        from .._cbuild import build_extension

        start = time.perf_counter()
        _log.info("building the fused CPU decoder (first use on this machine)")
        ext = build_extension("rwkvkit_infer_cpu_v4", [str(_SOURCE)], _CFLAGS, "fused C++ decoder")
        have = (ext.layer_slots(), ext.layer_slots7(), ext.layer_slots56())
        if have != (LAYER_SLOTS, V7_SLOTS, V56_SLOTS):
            raise RuntimeError(
                f"table layout mismatch: C++ has {'/'.join(map(str, have))} slots per layer (RWKV-4/7/5-6), "
                f"Python {LAYER_SLOTS}/{V7_SLOTS}/{V56_SLOTS}"
            )
        _build_seconds = time.perf_counter() - start
        _ext = ext
    except Exception as exc:  # any failure means: fall back, say why once
        from .._cbuild import failure_cause

        warnings.warn(_fail_message(failure_cause(exc)), RuntimeWarning, stacklevel=2)
        _ext = None
    return _ext


def _fail_message(cause: str) -> str:
    return f"rwkvkit: could not build the fused CPU decoder ({cause}); the RNN step runs in plain PyTorch (same results, slower)"


def build_seconds() -> float | None:
    """Seconds the build (or cache load) of the extension took in this process."""
    return _build_seconds


def set_isa(isa: int) -> int:
    """Force the SIMD kernel family: 0 scalar, 1 AVX2, 2 AVX-512, -1 the best.

    Returns the family now in use (the best available if ``isa`` is not
    supported by this CPU).  For tests and benchmarks.
    """
    ext = load_extension()
    if ext is None:
        raise RuntimeError("the fused CPU decoder is not available")
    return ext.set_isa(isa)


def set_bf16_dot(on: bool | None) -> bool:
    """bf16 matrices through AVX512-BF16 ``vdpbf16ps`` (True) or widened to fp32 (False, the default).

    The dot-product form rounds the activations to bf16 too.  ``None`` only
    asks.  Returns the mode in use: True only on a CPU with AVX512-BF16 (and
    while the AVX-512 kernel family is selected).  For tests and benchmarks.
    """
    ext = load_extension()
    if ext is None:
        raise RuntimeError("the fused CPU decoder is not available")
    return bool(ext.set_bf16_dot(-1 if on is None else int(bool(on))))


# Kernel kind of a weight matrix, mirrored from the C++ `Kind` enum.
_KINDS = {torch.float32: 0, torch.int8: 1, torch.bfloat16: 2, torch.float16: 3}
_HALF = (torch.bfloat16, torch.float16)


# --------------------------------------------------------------------- plan
def _linear_entry(module, keep: list) -> list[int] | None:
    """(weight, scale, n, k, kind) of an nn.Linear or quant.Int8Linear, or None if unusable."""
    if _is_int8(module):
        q, s = module.qweight, module.scale
        if q.dtype != torch.int8 or s.dtype != torch.float32 or not (q.is_contiguous() and s.is_contiguous()):
            return None
        if q.device.type != "cpu" or s.shape != (q.shape[0],):
            return None
        keep.extend((q, s))
        return [q.data_ptr(), s.data_ptr(), q.shape[0], q.shape[1], 1]
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or getattr(module, "bias", None) is not None:
        return None
    if w.dtype not in (torch.float32, *_HALF) or not w.is_contiguous() or w.device.type != "cpu" or w.dim() != 2:
        return None
    keep.append(w)
    return [w.data_ptr(), 0, w.shape[0], w.shape[1], _KINDS[w.dtype]]


def _is_int8(module) -> bool:
    # quant.Int8Linear, recognised by its buffers: quant imports this module
    # for its kernel, so importing quant here would close a circle.
    return isinstance(getattr(module, "qweight", None), torch.Tensor) and hasattr(module, "scale")


def _linear_tensors(module) -> list[torch.Tensor]:
    if _is_int8(module):
        return [module.qweight, module.scale]
    return [module.weight]


def _watched(model) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Tensors whose storage the table points at, and those it derives values from."""
    ptrs: list[torch.Tensor] = []
    derived: list[torch.Tensor] = []
    for block in model.blocks:
        att, ffn = block.att, block.ffn
        ptrs += [block.ln1.weight, block.ln1.bias, block.ln2.weight, block.ln2.bias]
        ptrs += [att.time_first, att.time_mix_k, att.time_mix_v, att.time_mix_r, ffn.time_mix_k, ffn.time_mix_r]
        for m in (att.key, att.value, att.receptance, att.output, ffn.key, ffn.receptance, ffn.value):
            ptrs += _linear_tensors(m)
        derived.append(att.time_decay)
    ptrs += [model.ln_out.weight, model.ln_out.bias] + _linear_tensors(model.head)
    return ptrs, derived


# Bumped whenever any module anywhere gets a new parameter, buffer or
# submodule (torch's global registration hooks, installed with the first
# plan): a plan built before cannot know whether the new one is in its model.
# Walking the module tree on every token to check would cost more than the
# hooks (the walk is ~200 attribute look-ups through nn.Module.__getattr__).
_registrations = 0
_hooks_installed = False
_data_ptr = torch.Tensor.data_ptr


def _install_hooks() -> None:
    global _hooks_installed
    if _hooks_installed:
        return
    from torch.nn.modules import module as nn_module

    def bump(*_args):
        global _registrations
        _registrations += 1

    nn_module.register_module_parameter_registration_hook(bump)
    nn_module.register_module_buffer_registration_hook(bump)
    nn_module.register_module_module_registration_hook(bump)
    _hooks_installed = True


class DecodePlan:
    """The pointer table of one model, and the tensors it keeps alive."""

    def __init__(self, model, huge_pages: bool = False):
        cfg = model.config
        C, A = cfg.n_embd, cfg.dim_att
        _install_hooks()
        self.generation = _registrations
        self.watch, self.derived = _watched(model)
        self.ptrs = tuple(t.data_ptr() for t in self.watch)
        self.versions = tuple(t._version for t in self.derived)
        self.ok = False
        keep: list[torch.Tensor] = []
        copied: list[torch.Tensor] = []  # sources of fp32 copies: derived values once the plan is made
        rows = []

        def vec(t: torch.Tensor, n: int) -> int | None:
            t = _fp32_vector(t, n, copied)
            if t is None:
                return None
            keep.append(t)
            return t.data_ptr()

        for block in model.blocks:
            att, ffn = block.att, block.ffn
            # omega = -exp(d), as TimeMix computes it (spec 1.3).
            w = -torch.exp(att.time_decay.detach().float()).contiguous()
            row = [
                vec(block.ln1.weight, C), vec(block.ln1.bias, C), vec(block.ln2.weight, C), vec(block.ln2.bias, C),
                vec(w, A), vec(att.time_first, A),
                vec(att.time_mix_k, C), vec(att.time_mix_v, C), vec(att.time_mix_r, C),
                vec(ffn.time_mix_k, C), vec(ffn.time_mix_r, C),
            ]
            if any(p is None for p in row):
                return
            shapes = ((A, C), (A, C), (A, C), (C, A), (cfg.dim_ffn, C), (C, C), (C, cfg.dim_ffn))
            for m, shape in zip((att.key, att.value, att.receptance, att.output, ffn.key, ffn.receptance, ffn.value), shapes):
                entry = _linear_entry(m, keep)
                if entry is None or tuple(entry[2:4]) != shape:
                    return
                row += entry
            rows.append(row)
        head = _linear_entry(model.head, keep)
        lnw, lnb = vec(model.ln_out.weight, C), vec(model.ln_out.bias, C)
        if head is None or tuple(head[2:4]) != (cfg.vocab_size, C) or lnw is None or lnb is None:
            return
        self.table = torch.tensor(rows, dtype=torch.int64)  # [L, LAYER_SLOTS]
        assert self.table.shape == (cfg.n_layer, LAYER_SLOTS)
        self.head = torch.tensor(head, dtype=torch.int64)  # [5]
        self.ln_out = (lnw, lnb)
        self.keep = keep
        self.derived = self.derived + copied
        self.versions = tuple(t._version for t in self.derived)
        self.kinds = frozenset(int(k) for k in self.table[:, _LIN0 + 4 :: 5].flatten().tolist()) | {int(head[4])}
        self.ok = True
        self.huge_bytes = use_huge_pages((t for t in keep if t.dim() == 2), enabled=huge_pages)


    def current(self) -> bool:
        """Still valid: no new parameter/buffer/module anywhere, no tensor moved
        (``.to()``, ``.data =``), no in-place change to a derived value's source."""
        return (
            self.generation == _registrations
            and tuple(map(_data_ptr, self.watch)) == self.ptrs
            and tuple(t._version for t in self.derived) == self.versions
        )


# ---------------------------------------------------------------- huge pages
_HUGE = 2 * 1024 * 1024
_MADV_HUGEPAGE, _MADV_COLLAPSE = 14, 25


def use_huge_pages(tensors, enabled: bool = True) -> int:
    """With ``enabled``, ask Linux to back the weight matrices with 2 MiB
    pages; returns the bytes now in huge pages (0 when off or unsupported).

    Decoding streams every weight once per token.  With 4 KiB pages that is a
    TLB miss every 4 KiB, and a 600 MB matrix-vector product here ran at 24.7
    GB/s against 26.6 GB/s on 2 MiB pages.  ``MADV_COLLAPSE`` (Linux 6.1+)
    rebuilds the already-filled pages of each tensor in place: no copy, the
    same addresses, the same numbers.  It is opt-in because the rebuild is
    not free (1.6 s for 584 MiB here, once per model): it pays off for a
    server or long generations, not for a short one.  Best effort: a refusal
    changes nothing.
    """
    import sys

    if not enabled or not sys.platform.startswith("linux"):
        return 0
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
        madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    except (OSError, AttributeError):
        return 0
    done = 0
    for t in tensors:
        start = t.data_ptr()
        end = start + t.numel() * t.element_size()
        lo, hi = (start + _HUGE - 1) // _HUGE * _HUGE, end // _HUGE * _HUGE
        if hi - lo < _HUGE:
            continue
        # MADV_HUGEPAGE first: with THP in "madvise" mode COLLAPSE needs no
        # hint, but the hint keeps khugepaged from splitting the pages again.
        madvise(lo, hi - lo, _MADV_HUGEPAGE)
        if madvise(lo, hi - lo, _MADV_COLLAPSE) == 0:
            done += hi - lo
    return done


class DecodePlan7(DecodePlan):
    """RWKV-7's pointer table.  The LoRA matrices are stored [in, out] and used
    as ``x @ w1``; the table points at transposed contiguous copies ([out, in],
    in the LoRA's own dtype, see _lora_copy; made here once), so the C++ side runs every product with the same
    row-major kernels.  Those copies are derived values: an in-place change to
    a LoRA matrix (its ``_version``) rebuilds the plan, as does a moved tensor."""

    def __init__(self, model, huge_pages: bool = False):
        cfg = model.config
        C, H, N = cfg.n_embd, cfg.n_head, cfg.head_size
        _install_hooks()
        self.generation = _registrations
        self.ok = False
        watch: list[torch.Tensor] = []
        derived: list[torch.Tensor] = []
        keep: list[torch.Tensor] = []
        rows = []
        for l, block in enumerate(model.blocks):
            att, ffn = block.att, block.ffn
            vres = l > 0  # layer 0's v0/v1/v2 (if stored) are unused
            row = []
            for name in V7_VECTORS:
                if name == "att.v0" and not vres:
                    row.append(0)
                    continue
                t = _get(block, name)
                if isinstance(t, torch.Tensor):
                    watch.append(t)
                t = _fp32_vector(t, C, derived)
                if t is None:
                    return self._decline(watch, derived)
                keep.append(t)
                row.append(t.data_ptr())
            for name in V7_LINEARS:
                if name in ("v1", "v2") and not vres:
                    row += [0, 0, 0, 0, 0]
                    continue
                if name in ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2"):
                    src = getattr(att, name, None)
                    if not isinstance(src, torch.Tensor) or src.dtype not in (torch.float32, *_HALF) or src.device.type != "cpu" or src.dim() != 2:
                        return self._decline(watch, derived)
                    watch.append(src)
                    derived.append(src)
                    t = _lora_copy(src, lambda m: m.t())  # [out, in], in the source's dtype
                    keep.append(t)
                    entry = [t.data_ptr(), 0, t.shape[0], t.shape[1], _KINDS[t.dtype]]
                    want_in = C if name.endswith("1") else None
                    if want_in is not None and t.shape[1] != C or name.endswith("2") and t.shape[0] != C:
                        return self._decline(watch, derived)
                else:
                    m = att if name in ("receptance", "key", "value", "output") else ffn
                    m = getattr(m, name.split(".")[-1])
                    watch += _linear_tensors(m)
                    entry = _linear_entry(m, keep)
                    n_out = cfg.dim_ffn if name == "ffn.key" else C
                    n_in = cfg.dim_ffn if name == "ffn.value" else C
                    if entry is None or tuple(entry[2:4]) != (n_out, n_in):
                        return self._decline(watch, derived)
                row += entry
            # Each LoRA's second half reads what its first half wrote: rank must agree.
            lin = lambda j: row[len(V7_VECTORS) + 5 * j : len(V7_VECTORS) + 5 * j + 5]  # noqa: E731
            for j in (4, 6, 8, 10):
                if lin(j)[0] and lin(j)[2] != lin(j + 1)[3]:
                    return self._decline(watch, derived)
            rows.append(row)
        watch += [model.ln_out.weight, model.ln_out.bias] + _linear_tensors(model.head)
        self._decline(watch, derived)  # records what to watch; ok stays False until the end
        head = _linear_entry(model.head, keep)
        lnw, lnb = _fp32_vector(model.ln_out.weight, C, derived), _fp32_vector(model.ln_out.bias, C, derived)
        self._decline(watch, derived)  # again: the ln_out copies' sources
        if head is None or tuple(head[2:4]) != (cfg.vocab_size, C) or lnw is None or lnb is None:
            return
        keep += [lnw, lnb]
        self.table = torch.tensor(rows, dtype=torch.int64)  # [L, V7_SLOTS]
        assert self.table.shape == (cfg.n_layer, V7_SLOTS)
        self.head = torch.tensor(head, dtype=torch.int64)
        self.ln_out = (lnw.data_ptr(), lnb.data_ptr())
        self.keep = keep
        # Kinds of the big matrices, and the LoRAs' where half (they follow the
        # source's dtype; fp32 LoRAs beside int8 projections are not named).
        lin = [V7_LINEARS.index(n) for n in ("receptance", "key", "value", "output", "ffn.key", "ffn.value")]
        cols = [len(V7_VECTORS) + 5 * j + 4 for j in lin]
        self.kinds = frozenset(int(k) for k in self.table[:, cols].flatten().tolist()) | {int(head[4])}
        self.kinds |= frozenset(_KINDS[t.dtype] for t in keep if t.dtype in _HALF and t.dim() == 2)
        self.ok = True
        self.huge_bytes = use_huge_pages((t for t in keep if t.dim() == 2 and t.numel() >= C * C), enabled=huge_pages)

    def _decline(self, watch, derived) -> None:
        # Even an unusable plan is cached (so the check is not redone every
        # token) and must notice when its model changes.
        self.watch, self.derived = list(watch), list(derived)
        self.ptrs = tuple(t.data_ptr() for t in self.watch)
        self.versions = tuple(t._version for t in self.derived)


class DecodePlan56(DecodePlan7):
    """RWKV-5.x and RWKV-6's pointer table (C++ ``step56``).

    RWKV-5's decay factor exp(-exp(time_decay)) and bonus u (``time_faaaa``, or
    exp(``time_first``)) are constant: they are computed here once, in fp32 as
    the PyTorch step computes them, as per-channel [dim_att] vectors (a per-head
    value repeated over its N channels); their sources are derived values.
    RWKV-6's four LoRA matrices are stored [in, out] (``time_maa_w2`` as five
    [D, C] blocks): the table points at transposed contiguous fp32 copies made
    here once ([5D, C], [5, C, D], [D_decay, C], [dim_att, D_decay]; fp32, or
    the half dtype of a half model, see _lora_copy), watched like RWKV-7's (an
    in-place change rebuilds the plan)."""

    def __init__(self, model, huge_pages: bool = False):
        cfg = model.config
        C, A, H, N, Fd = cfg.n_embd, cfg.dim_att, cfg.n_head, cfg.head_size, cfg.dim_ffn
        v6 = cfg.generation == "6"
        _install_hooks()
        self.generation = _registrations
        self.ok = False
        watch: list[torch.Tensor] = []
        derived: list[torch.Tensor] = []
        keep: list[torch.Tensor] = []
        kinds: set[int] = set()
        rows = []

        def vec(t, n: int) -> int | None:
            if isinstance(t, torch.Tensor):
                watch.append(t)
            t = _fp32_vector(t, n, derived)
            if t is None:
                return None
            keep.append(t)
            return t.data_ptr()

        def per_channel(src, fn) -> int | None:
            # A per-head (H) or per-channel (H, N) parameter as fn(it) [A] in fp32.
            if not isinstance(src, torch.Tensor) or src.dtype not in (torch.float32, *_HALF) or src.device.type != "cpu":
                return None
            if src.numel() not in (H, A):
                return None
            watch.append(src)
            derived.append(src)
            t = fn(src.detach().float()).reshape(H, -1).expand(H, N).contiguous().view(-1)
            keep.append(t)
            return t.data_ptr()

        def linear(m, shape) -> list[int] | None:
            entry = _linear_entry(m, keep) if m is not None else None
            if entry is None or tuple(entry[2:4]) != shape:
                return None
            watch.extend(_linear_tensors(m))
            kinds.add(entry[4])
            return entry

        def lora(src, flip, shape) -> list[int] | None:
            # A LoRA matrix as flip(it) (see _lora_copy) of the given [n, k].
            if isinstance(src, torch.Tensor):
                watch.append(src)
                derived.append(src)
            t = _lora_copy(src, flip)
            if t is None or tuple(t.shape) != shape:
                return None
            keep.append(t)
            if t.dtype in _HALF:  # (fp32 LoRAs beside int8 projections are not named in the kinds)
                kinds.add(_KINDS[t.dtype])
            return [t.data_ptr(), 0, t.shape[0], t.shape[1], _KINDS[t.dtype]]

        for block in model.blocks:
            att, ffn = block.att, block.ffn
            ln = [vec(block.ln1.weight, C), vec(block.ln1.bias, C), vec(block.ln2.weight, C), vec(block.ln2.bias, C)]
            if v6:
                mixes = [vec(getattr(att, f"time_maa_{c}", None), C) for c in ("k", "v", "r", "g", "x", "w")]
                decay, u = vec(att.time_decay, A), vec(att.time_faaaa, A)
                ffn_mix = [vec(ffn.time_maa_k, C), vec(ffn.time_maa_r, C)]
            else:
                gated = getattr(att, "has_gate", False)
                mixes = [vec(getattr(att, f"time_mix_{c}", None), C) for c in ("k", "v", "r")]
                mixes += [vec(att.time_mix_g, C) if gated else 0, 0, 0]
                # The decay factor w = exp(-exp(d)) and the bonus, as TimeMix.forward and bonus_u compute them.
                decay = per_channel(att.time_decay, lambda d: torch.exp(-torch.exp(d)))
                name = getattr(att, "bonus_name", None)
                u = per_channel(getattr(att, name, None) if name in ("time_first", "time_faaaa") else None,
                                torch.exp if name == "time_first" else (lambda t: t))
                ffn_mix = [vec(ffn.time_mix_k, C), vec(ffn.time_mix_r, C)]
            row = ln + mixes + [decay, u, vec(att.ln_x.weight, A), vec(att.ln_x.bias, A)] + ffn_mix
            if any(p is None for p in row):
                return self._decline(watch, derived)
            lins = [linear(att.receptance, (A, C)), linear(att.key, (A, C)), linear(att.value, (A, C))]
            if v6 or gated:
                lins.append(linear(getattr(att, "gate", None), (A, C)))
            else:
                lins.append([0, 0, 0, 0, 0])
            lins.append(linear(att.output, (C, A)))
            if v6:
                w1 = att.time_maa_w1
                D = w1.shape[-1] // 5 if isinstance(w1, torch.Tensor) and w1.dim() == 2 else 0
                Dd = att.time_decay_w1.shape[-1] if isinstance(att.time_decay_w1, torch.Tensor) else 0
                lins += [
                    lora(w1, lambda t: t.t(), (5 * D, C)) if D and w1.shape[-1] == 5 * D else None,
                    lora(att.time_maa_w2, lambda t: t.transpose(1, 2).reshape(5 * C, -1), (5 * C, D)),
                    lora(att.time_decay_w1, lambda t: t.t(), (Dd, C)),
                    lora(att.time_decay_w2, lambda t: t.t(), (A, Dd)),
                ]
            else:
                lins += [[0, 0, 0, 0, 0]] * 4
            lins += [linear(ffn.key, (Fd, C)), linear(ffn.receptance, (C, C)), linear(ffn.value, (C, Fd))]
            if any(e is None for e in lins):
                return self._decline(watch, derived)
            rows.append(row + [v for e in lins for v in e])
        watch += [model.ln_out.weight, model.ln_out.bias] + _linear_tensors(model.head)
        self._decline(watch, derived)  # records what to watch; ok stays False until the end
        head = _linear_entry(model.head, keep)
        lnw, lnb = _fp32_vector(model.ln_out.weight, C, derived), _fp32_vector(model.ln_out.bias, C, derived)
        self._decline(watch, derived)  # again: the ln_out copies' sources
        if head is None or tuple(head[2:4]) != (cfg.vocab_size, C) or lnw is None or lnb is None:
            return
        keep += [lnw, lnb]
        self.table = torch.tensor(rows, dtype=torch.int64)  # [L, V56_SLOTS]
        assert self.table.shape == (cfg.n_layer, V56_SLOTS)
        self.head = torch.tensor(head, dtype=torch.int64)
        self.ln_out = (lnw.data_ptr(), lnb.data_ptr())
        self.keep = keep
        self.kinds = frozenset(kinds) | {int(head[4])}  # of the big matrices, and the LoRAs' where half
        self.ok = True
        self.huge_bytes = use_huge_pages((t for t in keep if t.dim() == 2 and t.numel() >= C * C), enabled=huge_pages)


def _get(module, dotted: str):
    for part in dotted.split("."):
        module = getattr(module, part, None)
    return module


def _usable(t, n: int) -> bool:
    return (
        isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.device.type == "cpu"
        and t.numel() == n and t.is_contiguous()
    )


def _fp32_vector(t, n: int, derived: list) -> torch.Tensor | None:
    """A per-channel vector as the kernel reads it: itself if float32, else an
    fp32 copy (exact for bf16/fp16) whose source joins ``derived`` so an
    in-place change to it rebuilds the plan; None if unusable."""
    if _usable(t, n):
        return t
    if not (isinstance(t, torch.Tensor) and t.dtype in _HALF and t.device.type == "cpu" and t.numel() == n):
        return None
    derived.append(t)
    return t.detach().float().contiguous().view(-1)


def _lora_copy(src, flip) -> torch.Tensor | None:
    """A LoRA matrix as the kernels read it: ``flip(src)`` ([out, in], from the
    stored [in, out]) as a contiguous copy in the source's dtype (fp32 stays
    fp32; bf16/fp16 stay 2 bytes a weight, widened exactly by the kernels like
    the big matrices); None if unusable.  The caller watches ``src`` as a derived value."""
    if not isinstance(src, torch.Tensor) or src.dtype not in (torch.float32, *_HALF) or src.device.type != "cpu":
        return None
    try:
        t = flip(src.detach()).contiguous()
    except RuntimeError:  # a shape the flip cannot take: not this model's layout
        return None
    return t if t.dim() == 2 else None


def _embed_fp32(model, ids: torch.Tensor) -> torch.Tensor:
    """LN0(emb[ids]) [B, C] in fp32: the folded table if there is one, else
    the LayerNorm computed in fp32 on the stored rows (for a half model, what
    the fp32 model on the same weights computes; the same op for fp32)."""
    if model.emb_folded is not None:
        return F.embedding(ids, model.emb_folded).float().contiguous()
    ln0 = model.blocks[0].ln0
    e = model.emb(ids).float()
    return F.layer_norm(e, (e.shape[-1],), ln0.weight.float(), ln0.bias.float(), ln0.eps).contiguous()


def _plan_class(generation: str) -> type | None:
    """The plan (and so the C++ step) that serves a generation; None if none does."""
    if generation == "4":
        return DecodePlan
    if generation == "7":
        return DecodePlan7
    return DecodePlan56 if generation in GENERATIONS56 else None


def plan_for(model, huge_pages: bool = False) -> DecodePlan | None:
    """The model's cached plan, rebuilt if any watched tensor changed; None if unusable."""
    plan = getattr(model, "_decode_plan", None)
    if plan is None or not plan.current():
        cls = _plan_class(model.config.generation)
        if cls is None:
            return None
        plan = cls(model, huge_pages)
        model._decode_plan = plan
    return plan if plan.ok else None


@torch.no_grad()
def step(model, tokens: torch.Tensor, state, want_logits: bool, huge_pages: bool = False):
    """One RNN step through the extension: tokens [B, 1] -> (logits [B, 1, V] or None, new State).

    Returns None when the fused path cannot run this model (the caller then
    runs the PyTorch step).
    """
    from ..state import State

    if model.config.generation == "7" or model.config.generation in GENERATIONS56:
        return _step_matrix(model, tokens, state, want_logits, huge_pages)
    if model.config.generation != "4" or tokens.device.type != "cpu" or tokens.shape[0] > MAX_BATCH:
        return None
    ext = load_extension()
    if ext is None:
        return None
    plan = plan_for(model, huge_pages)
    if plan is None or not _fast_enough(ext, plan):
        return None
    cfg = model.config
    B = tokens.shape[0]
    C, A, L = cfg.n_embd, cfg.dim_att, cfg.n_layer
    x = _embed_fp32(model, tokens[:, 0])  # [B, C], updated in place by the kernel
    src = [t.float().contiguous() for t in state.tensors()]
    dst = State(
        att_x=torch.empty(L, B, C),
        att_aa=torch.empty(L, B, A),
        att_bb=torch.empty(L, B, A),
        att_pp=torch.empty(L, B, A),
        ffn_x=torch.empty(L, B, C),
    )
    logits = torch.empty(B, cfg.vocab_size) if want_logits else None
    ext.step(
        plan.table.data_ptr(), L, B, C, A, cfg.dim_ffn, x.data_ptr(),
        *(t.data_ptr() for t in src),
        *(t.data_ptr() for t in dst.tensors()),
        plan.ln_out[0], plan.ln_out[1], plan.head.data_ptr(),
        logits.data_ptr() if logits is not None else 0,
        cfg.rescale_every, float(cfg.layer_norm_eps),
    )
    return (logits.unsqueeze(1) if logits is not None else None), dst


def _step_matrix(model, tokens: torch.Tensor, state, want_logits: bool, huge_pages: bool):
    """RWKV-5/6/7's fused step (C++ ``step56`` / ``step7``); None when it cannot run this call."""
    from ..state import MatrixState

    if tokens.device.type != "cpu" or tokens.shape[0] > MAX_BATCH:
        return None
    ext = load_extension()
    if ext is None:
        return None
    plan = plan_for(model, huge_pages)
    if plan is None or not _fast_enough(ext, plan):
        return None
    cfg = model.config
    B = tokens.shape[0]
    C, H, N, L = cfg.n_embd, cfg.n_head, cfg.head_size, cfg.n_layer
    x = _embed_fp32(model, tokens[:, 0])  # [B, C], updated in place by the kernel
    src = [t.float().contiguous() for t in (state.att_x, state.att_kv, state.ffn_x)]
    dst = MatrixState(
        att_x=torch.empty(L, B, C), att_kv=torch.empty(L, B, H, N, N), ffn_x=torch.empty(L, B, C),
        generation=cfg.generation,
    )
    logits = torch.empty(B, cfg.vocab_size) if want_logits else None
    rest = (
        x.data_ptr(), *(t.data_ptr() for t in src),
        dst.att_x.data_ptr(), dst.att_kv.data_ptr(), dst.ffn_x.data_ptr(),
        plan.ln_out[0], plan.ln_out[1], plan.head.data_ptr(),
        logits.data_ptr() if logits is not None else 0,
        float(cfg.layer_norm_eps), float(cfg.group_norm_eps),
    )
    if cfg.generation == "7":
        ext.step7(plan.table.data_ptr(), L, B, C, H, N, *rest)
    else:
        ext.step56(plan.table.data_ptr(), int(cfg.generation == "6"), L, B, C, cfg.dim_att, H, N, *rest)
    return (logits.unsqueeze(1) if logits is not None else None), dst


def _fast_enough(ext, plan) -> bool:
    """False for half-precision matrices when only the scalar kernels exist (see HALF_SCALAR)."""
    return HALF_SCALAR or ext.get_isa() > 0 or not (plan.kinds & {2, 3})


_ISA_NAMES = {0: "scalar C++", 1: "AVX2", 2: "AVX-512"}
_KIND_NAMES = {0: "fp32", 1: "int8", 2: "bf16", 3: "fp16"}


def describe(model) -> str:
    """One line saying which weights and which one-token step ``model`` decodes with on this machine.

    What ``model.decode_kernel`` holds (set by :func:`rwkvkit.runtime.accelerate`)
    and the CLI prints when it loads a model.  Builds (or loads) the extension
    and a throw-away plan; changes nothing.
    """
    dtype = str(getattr(model, "dtype", "?")).removeprefix("torch.")
    torch_step = f"PyTorch step ({dtype})"
    if getattr(model, "step_accelerator", None) is None:
        return f"{torch_step}: no accelerator attached"
    if model.device.type != "cpu":
        return f"{torch_step} on {model.device.type}"
    gen = model.config.generation
    cls = _plan_class(gen)
    if cls is None:
        return f"{torch_step}: the fused CPU decoder serves RWKV-4, -5, -6 and -7, this is RWKV-{gen}"
    ext = load_extension()
    if ext is None:
        return f"{torch_step}: the fused CPU decoder could not be built"
    try:
        plan = cls(model)
    except Exception as exc:  # a describer must not break loading
        return f"{torch_step}: no decode plan ({type(exc).__name__}: {exc})"
    if not plan.ok:
        return f"{torch_step}: weights the fused CPU decoder does not take (it takes fp32, bf16, fp16, int8 on the CPU)"
    return _fused_text(ext, plan.kinds, torch_step, dtype)


def _fused_text(ext, kinds: frozenset, torch_step: str, dtype: str) -> str:
    isa = ext.get_isa()
    names = "+".join(_KIND_NAMES[k] for k in sorted(kinds))
    if not (HALF_SCALAR or isa > 0 or not (kinds & {2, 3})):
        return f"{torch_step}: {names} weights and no AVX2/AVX-512 on this CPU (PyTorch's {dtype} step is faster than scalar C++)"
    how = _ISA_NAMES[isa]
    if 2 in kinds:
        how += ", bf16 by AVX512-BF16 dot products (activations rounded to bf16)" if isa == 2 and ext.set_bf16_dot(-1) else ", bf16 widened to fp32 (exact)"
    if 3 in kinds:
        how += ", fp16 widened by " + ("vcvtph2ps" if isa == 2 else "F16C" if isa == 1 else "software") + " (exact)"
    return f"fused C++ step: {names} weights, {how}, fp32 accumulation and state"


def describe_checkpoint(generation: str, dtype: torch.dtype) -> str:
    """What :func:`describe` will say of a CPU model of ``generation`` loaded in
    ``dtype`` (for ``rwkvkit info``, which builds no model)."""
    name = str(dtype).removeprefix("torch.")
    torch_step = f"PyTorch step ({name})"
    if _plan_class(generation) is None:
        return f"{torch_step}: the fused CPU decoder serves RWKV-4, -5, -6 and -7, this is RWKV-{generation}"
    if dtype not in _KINDS or dtype == torch.int8:
        return f"{torch_step}: weights the fused CPU decoder does not take"
    ext = load_extension()
    if ext is None:
        return f"{torch_step}: the fused CPU decoder could not be built"
    return _fused_text(ext, frozenset({_KINDS[dtype]}), torch_step, name)


def linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """x [M, K] fp32 @ (int8 qweight [N, K] * scale [N, 1])^T with the extension's kernel; None if unavailable."""
    ext = load_extension()
    if ext is None:
        return None
    x = x.float().contiguous()
    M, K = x.shape
    N = qweight.shape[0]
    y = torch.empty(M, N)
    ext.linear(qweight.data_ptr(), scale.data_ptr(), N, K, 1, x.data_ptr(), M, y.data_ptr())
    return y


def matvec(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] fp32 @ W [N, K]^T with the decoder's kernels as now selected
    (:func:`set_isa`, :func:`set_bf16_dot`): W float32, bfloat16, float16, or
    int8 with per-row ``scale``.  The kernels alone, for tests."""
    ext = load_extension()
    if ext is None:
        raise RuntimeError("the fused CPU decoder is not available")
    x = x.float().contiguous()
    w = w.contiguous()
    M, K = x.shape
    N = w.shape[0]
    if w.shape[1] != K or w.dtype not in _KINDS or (w.dtype == torch.int8) != (scale is not None):
        raise ValueError("matvec: W must be [N, K] float32/bfloat16/float16, or int8 with a scale")
    s = scale.float().contiguous() if scale is not None else None
    y = torch.empty(M, N)
    ext.linear(w.data_ptr(), s.data_ptr() if s is not None else 0, N, K, _KINDS[w.dtype], x.data_ptr(), M, y.data_ptr())
    return y
