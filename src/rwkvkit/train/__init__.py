"""Training: data preparation, the paper's recipe, the loop, data parallelism.

    from rwkvkit.train import TrainConfig, train, prepare
    prepare(["input.txt"], "data/shakespeare", tokenizer="bytes")
    train(TrainConfig(data="data/shakespeare", out="runs/shk", n_layer=4, n_embd=256))
"""

from .config import TrainConfig
from .data import load_tokens, prepare
from .loop import train

__all__ = ["TrainConfig", "train", "prepare", "load_tokens"]
