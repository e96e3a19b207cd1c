"""The seam between transformers and the LSG product: the "lsg" attention implementation, the per-call state
that reaches it, and the selection of the modules that run it."""
from .call import CALL_KEYWORD, LSGCall
from .interface import ATTENTION_NAME, lsg_attention_function, register_with_transformers
from .selection import deselect, is_selected, routes_through_interface, select, selected_modules

__all__ = [
    "ATTENTION_NAME", "CALL_KEYWORD", "LSGCall", "deselect", "is_selected", "lsg_attention_function",
    "register_with_transformers", "routes_through_interface", "select", "selected_modules",
]  # fmt: skip
