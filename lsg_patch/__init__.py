"""lsg_patch: run pretrained Hugging Face encoders on long inputs with LSG attention, as a runtime patch.

    model = lsg_patch.to_lsg(model, max_length=4096, block_size=128, sparsity_type="norm")
"""
from .config import LSGConfig
from .registry import ArchitectureEntry, register, supported_architectures, unregister
from .swap import from_lsg, is_lsg_model, to_lsg

__all__ = [
    "ArchitectureEntry",
    "LSGConfig",
    "from_lsg",
    "is_lsg_model",
    "register",
    "supported_architectures",
    "to_lsg",
    "unregister",
]
__version__ = "0.1.0"
