"""rwkvkit: RWKV language models (Peng et al. 2023, and the later generations) in PyTorch.

    import rwkvkit
    model = rwkvkit.load("model.pth")          # any supported checkpoint, any supported generation
    logits, state = model(tokens)              # tokens [B, T] -> logits [B, T, V]
    logits, state = model(more, state)         # continue from a state
"""

from .config import ModelConfig
from .errors import CheckpointError, RwkvkitError, UnsupportedModelError
from .models.rwkv4 import RWKV, RWKV4Config
from .state import MatrixState, State, StateBase
from .tokenizer import Tokenizer, load_tokenizer
from .generate import SHIPPED_MODEL, generate  # noqa: E402  (the function shadows the module name)

from ._version import __version__  # noqa: E402


def load(path, *, dtype=None, device=None, **options):
    """Load any supported checkpoint (see :func:`rwkvkit.checkpoint.load`)."""
    from .checkpoint import load as _load

    return _load(path, dtype=dtype, device=device, **options)


def save(model, folder):
    """Write ``model`` as an rwkvkit folder (see :func:`rwkvkit.checkpoint.save`)."""
    from .checkpoint import save as _save

    return _save(model, folder)


def build(config):
    """An uninitialised model of ``config``'s generation (see :func:`rwkvkit.models.build`)."""
    from .models import build as _build

    return _build(config)


def __getattr__(name):
    # The RWKV-7 classes load on first use (one import less for RWKV-4 users).
    if name in ("RWKV7", "RWKV7Config"):
        from .models import rwkv7

        return getattr(rwkv7, name)
    raise AttributeError(f"module 'rwkvkit' has no attribute {name!r}")


__all__ = [
    "RWKV",
    "RWKV4Config",
    "RWKV7",
    "RWKV7Config",
    "ModelConfig",
    "State",
    "StateBase",
    "MatrixState",
    "load",
    "save",
    "build",
    "load_tokenizer",
    "Tokenizer",
    "generate",
    "SHIPPED_MODEL",
    "RwkvkitError",
    "CheckpointError",
    "UnsupportedModelError",
    "__version__",
]
