"""lsg_patch: run pretrained Hugging Face encoders on long inputs with LSG attention, as a runtime patch.

    model = lsg_patch.to_lsg(model, max_length=4096, block_size=128, sparsity_type="norm")
"""
from .api import from_lsg, is_lsg_model, to_lsg
from .config import LSGConfig
from .context import enabled, from_pretrained
from .export import export_onnx
from .late_chunking import ChunkedDocument, encode_chunks
from .architecture_inference import architecture_support
from .options import ConversionOptions
from .pattern import attention_pattern, plot_pattern
from .seam.lsg_cache import LSGCache
from .moved_modules import alias_moved_modules
from .registry import ArchitectureEntry, register, supported_architectures, unregister

alias_moved_modules()

__all__ = [
    "ArchitectureEntry",
    "ChunkedDocument",
    "ConversionOptions",
    "LSGCache",
    "LSGConfig",
    "architecture_support",
    "attention_pattern",
    "enabled",
    "encode_chunks",
    "export_onnx",
    "from_lsg",
    "from_pretrained",
    "is_lsg_model",
    "plot_pattern",
    "register",
    "supported_architectures",
    "to_lsg",
    "unregister",
]
__version__ = "0.1.0"
