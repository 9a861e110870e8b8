"""minivb: a minimal, readable InstructBLIP-Video in plain PyTorch that loads the official checkpoints."""

from .checkpoint import KEY_TABLE, map_key, official_key
from .config import InstructBlipVideoConfig, load_config
from .memory import Workload
from .model import InstructBlipVideo, Output, load_model
from .saving import save_checkpoint

__all__ = ["InstructBlipVideo", "InstructBlipVideoConfig", "KEY_TABLE", "Output", "load_config", "load_model",
           "load_processor", "map_key", "official_key", "save_checkpoint", "Workload"]


def load_processor(path):
    """The processor of a checkpoint directory: frames and text in, a batch for the model out."""
    from .processor import load_processor as _load_processor

    return _load_processor(path)
