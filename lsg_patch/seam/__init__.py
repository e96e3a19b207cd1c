"""The seam between transformers and the LSG product: the "lsg" attention implementation (and "lsg_sliding" for
sliding-window layers kept beside LSG), the per-call state that reaches them, and the selection of the modules
that run them."""
from .call import CALL_KEYWORD, LSGCall
from .interface import ATTENTION_NAME, lsg_attention_function, register_with_transformers
from .selection import deselect, is_selected, routes_through_interface, select, select_sliding, selected_modules
from .sliding import SLIDING_ATTENTION_NAME, sliding_attention_function

__all__ = [
    "ATTENTION_NAME", "CALL_KEYWORD", "LSGCall", "SLIDING_ATTENTION_NAME", "deselect", "is_selected",
    "lsg_attention_function", "register_with_transformers", "routes_through_interface", "select", "select_sliding",
    "selected_modules", "sliding_attention_function",
]  # fmt: skip
