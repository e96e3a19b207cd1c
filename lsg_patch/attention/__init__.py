"""LSG attention over bare tensors: the layout record, the per-forward mask, the attention product."""
from .bias import RelativeBias
from .layout import AttentionLayout
from .masks import LSGMask, prepare_mask
from .product import lsg_attention

__all__ = ["AttentionLayout", "RelativeBias", "LSGMask", "prepare_mask", "lsg_attention"]
