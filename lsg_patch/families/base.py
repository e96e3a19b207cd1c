"""What every family shares: the LSG self-attention base class, the per-forward mask record, and the
small tensor steps (mask recovery, block padding, length check) the family hooks are made of."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..attention import AttentionLayout, LSGMask, lsg_attention
from ..hooks import LSGHook

if TYPE_CHECKING:
    from ..config import LSGConfig
    from ..registry import ArchitectureEntry


@dataclass
class EncoderMask:
    """What the encoder's layers receive as `attention_mask` while LSG runs.

    Built once per forward by the family's encoder hook and shared by every layer, so block masks are
    not rebuilt per layer. `num_tokens` is the caller's token count, before block padding.
    """

    mask: LSGMask
    num_tokens: int


class LSGSelfAttention(nn.Module, ABC):
    """Base of the modules that replace a family's self-attention.

    They adopt the original projection layers as children under the same names, so state_dict keys do
    not change, and keep the original module (unregistered) to give it back on `from_lsg`.
    """

    projection_names: tuple[str, ...] = ()
    head_size: int
    scaling: float
    is_causal: bool = False

    def __init__(self, original: nn.Module, layout: AttentionLayout) -> None:
        super().__init__()
        for name in self.projection_names:
            setattr(self, name, getattr(original, name))
        self.__dict__["_original"] = original
        self.layout = layout
        self.train(original.training)  # a patched model in eval mode stays in eval mode

    def restore(self) -> nn.Module:
        """The original module, holding this module's (possibly trained) projection layers."""
        original = self.__dict__["_original"]
        for name in self.projection_names:
            setattr(original, name, getattr(self, name))
        original.train(self.training)
        return original

    def lsg_context(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Any,
        projections: tuple[nn.Module, nn.Module, nn.Module],
        dropout_p: float,
    ) -> torch.Tensor:
        """Project queries/keys/values, run LSG attention, merge the heads: (batch, length, heads * head_size)."""
        if not isinstance(attention_mask, EncoderMask):
            raise RuntimeError(
                "this LSG attention module got a plain attention mask: it only runs inside the encoder that "
                "lsg_patch.to_lsg patched (call the whole model, not a single layer)"
            )
        batch, length, _ = hidden_states.shape
        shape = (batch, length, -1, self.head_size)
        query, key, value = (project(hidden_states).view(shape).transpose(1, 2) for project in projections)
        context = lsg_attention(
            query,
            key,
            value,
            attention_mask.mask,
            self.layout,
            dropout_p=dropout_p if self.training else 0.0,
            causal=self.is_causal,
            scale=self.scaling,
        )
        return context.transpose(1, 2).reshape(batch, length, -1)


class FamilyAdapter(ABC):
    """The forward-time behaviour of one family, installed as LSGHooks on the host modules."""

    attention_class: type[LSGSelfAttention]

    @abstractmethod
    def install_hooks(self, base_model: nn.Module, entry: "ArchitectureEntry", lsg: "LSGConfig", max_length: int) -> None:
        """Register the hooks that prepend global tokens, pad to blocks, build the mask and trim outputs."""


def token_mask_from(attention_mask: Any, batch: int, length: int, device: torch.device) -> torch.Tensor:
    """The (batch, length) bool key mask, True = may be attended, from any mask transformers builds.

    transformers hands the encoder None (nothing masked), a 2-D 0/1 mask, or a 4-D bool/additive mask
    whose last query row sees every non-padded key (also for causal masks).
    """
    if attention_mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(
            f"lsg_patch cannot read an attention mask of type {type(attention_mask).__name__}; use "
            "attn_implementation='sdpa' or 'eager' for the host model"
        )
    if attention_mask.dim() == 4:
        attention_mask = attention_mask[:, 0, -1, :]
        allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    elif attention_mask.dim() == 2:
        allowed = attention_mask.bool()
    else:
        raise ValueError(f"unexpected attention mask of shape {tuple(attention_mask.shape)}; expected 2-D or 4-D")
    return allowed.expand(batch, length).to(device)


def block_padding(length: int, lsg: "LSGConfig") -> int:
    """How many masked positions adaptive padding appends (LSG_SPEC.md section 5)."""
    if length <= 2 * lsg.block_size or length % lsg.block_size == 0:
        return 0
    if not lsg.adaptive:
        raise ValueError(
            f"an input of {length} tokens is not a multiple of block_size={lsg.block_size}; pad it to a multiple "
            f"of {lsg.block_size}, or convert with adaptive=True to let lsg_patch pad it"
        )
    return lsg.block_size - length % lsg.block_size


def mask_first(token_mask: torch.Tensor) -> torch.Tensor:
    """A copy of the key mask with token 0 masked (mask_first_token); the caller's tensors stay intact."""
    return torch.cat([torch.zeros_like(token_mask[:, :1]), token_mask[:, 1:]], dim=1)


class LengthCheck(LSGHook):
    """Refuses inputs longer than max_length before they reach an embedding lookup."""

    def __init__(self, max_length: int) -> None:
        self.max_length = max_length

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        tensor = args[0] if args else kwargs.get("input_ids")
        if tensor is None:
            tensor = kwargs.get("inputs_embeds")
            length = None if tensor is None else tensor.shape[1]
        else:
            length = tensor.shape[-1]
        if length is not None and length > self.max_length:
            raise ValueError(
                f"the input has {length} tokens but this LSG model accepts at most {self.max_length} "
                f"(the max_length it was converted with); truncate the input or convert with a larger max_length"
            )
