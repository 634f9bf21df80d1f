"""rwkvkit: the RWKV-4 language model (Peng et al. 2023) in PyTorch.

    import rwkvkit
    model = rwkvkit.load("model.pth")          # any supported checkpoint
    logits, state = model(tokens)              # tokens [B, T] -> logits [B, T, V]
    logits, state = model(more, state)         # continue from a state
"""

from .config import ModelConfig
from .errors import CheckpointError, RwkvkitError, UnsupportedModelError
from .model import RWKV
from .state import State
from .tokenizer import Tokenizer, load_tokenizer
from .generate import SHIPPED_MODEL, generate  # noqa: E402  (the function shadows the module name)

__version__ = "0.1.0"


def load(path, *, dtype=None, device=None, **options):
    """Load any supported checkpoint (see :func:`rwkvkit.checkpoint.load`)."""
    from .checkpoint import load as _load

    return _load(path, dtype=dtype, device=device, **options)


def save(model, folder):
    """Write ``model`` as an rwkvkit folder (see :func:`rwkvkit.checkpoint.save`)."""
    from .checkpoint import save as _save

    return _save(model, folder)


__all__ = [
    "RWKV",
    "ModelConfig",
    "State",
    "load",
    "save",
    "load_tokenizer",
    "Tokenizer",
    "generate",
    "SHIPPED_MODEL",
    "RwkvkitError",
    "CheckpointError",
    "UnsupportedModelError",
    "__version__",
]
