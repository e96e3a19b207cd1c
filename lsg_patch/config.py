"""LSGConfig: the LSG parameters, their validation, and their place in a transformers config.

The key names are those of the reference LSG checkpoints (`block_size`, `sparsity_type`, ...), so a
config written by lsg_patch reads like one written by the public LSG converter and vice versa.
Validation raises instead of fixing values up: a misspelled option must never become a silent default.
"""
from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from .attention.layout import AttentionLayout

SPARSITY_TYPES = ("none", "norm", "pooling", "lsh", "stride", "block_stride", "bos_pooling")
MAX_GLOBAL_TOKENS = 512  # rows of the global table in every reference checkpoint

# Keys the reference stores in model.config besides the LSG parameters themselves.
LSG_BASE_MODEL_PREFIX = "lsg"


@dataclass(frozen=True)
class LSGConfig:
    """The LSG parameters, with the reference defaults.

    `pass_global_tokens_to_decoder` only matters for encoder-decoder models; it is stored for them only.
    """

    block_size: int = 128
    sparse_block_size: int = 128
    sparsity_factor: int = 2
    sparsity_type: str = "norm"
    num_global_tokens: int = 1
    mask_first_token: bool = False
    pool_with_global: bool = True
    adaptive: bool = True
    lsh_num_pre_rounds: int = 1
    pass_global_tokens_to_decoder: bool = True

    def __post_init__(self) -> None:
        _check_int("block_size", self.block_size, minimum=1)
        _check_int("sparse_block_size", self.sparse_block_size, minimum=0)
        _check_int("sparsity_factor", self.sparsity_factor, minimum=1)
        _check_int("lsh_num_pre_rounds", self.lsh_num_pre_rounds, minimum=1)
        _check_int("num_global_tokens", self.num_global_tokens, minimum=1, maximum=MAX_GLOBAL_TOKENS)
        for name in ("mask_first_token", "pool_with_global", "adaptive", "pass_global_tokens_to_decoder"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} is not accepted: it must be True or False")
        if self.sparsity_type not in SPARSITY_TYPES:
            hint = did_you_mean(str(self.sparsity_type), SPARSITY_TYPES)
            raise ValueError(
                f"sparsity_type={self.sparsity_type!r} is not accepted{hint}; choose one of {', '.join(SPARSITY_TYPES)}"
            )
        if self.block_size % self.sparsity_factor != 0:
            divisors = [d for d in range(1, self.block_size + 1) if self.block_size % d == 0]
            raise ValueError(
                f"block_size={self.block_size} is not a multiple of sparsity_factor={self.sparsity_factor}; "
                f"with block_size={self.block_size} the sparsity_factor must be one of {divisors}"
            )
        if self.mask_first_token and not self.pool_with_global:
            raise ValueError(
                "mask_first_token=True needs pool_with_global=True (the first global token takes the place of "
                "the masked first token); got pool_with_global=False"
            )

    @classmethod
    def from_model_config(cls, model_config: Any) -> "LSGConfig":
        """Read the LSG settings a (reference or lsg_patch) checkpoint config carries.

        Reference configs were fixed up by the reference on save (sparsity_type None for unknown types,
        num_global_tokens clamped), so None is read as "none".
        """
        values = {f.name: getattr(model_config, f.name) for f in fields(cls) if hasattr(model_config, f.name)}
        if values.get("sparsity_type", "none") is None:
            values["sparsity_type"] = "none"
        return cls(**values)

    @property
    def layout(self) -> AttentionLayout:
        """The subset of the parameters the attention product needs."""
        return AttentionLayout(
            num_global_tokens=self.num_global_tokens,
            block_size=self.block_size,
            sparse_block_size=self.sparse_block_size,
            sparsity_factor=self.sparsity_factor,
            sparsity_type=self.sparsity_type,
            lsh_num_pre_rounds=self.lsh_num_pre_rounds,
        )

    def config_entries(self, encoder_decoder: bool) -> dict[str, Any]:
        """The keys written to model.config, named as in reference checkpoints."""
        entries = asdict(self)
        if not encoder_decoder:
            del entries["pass_global_tokens_to_decoder"]
        return entries


def has_lsg_settings(model_config: Any) -> bool:
    """True if a transformers config carries LSG settings (written by lsg_patch or the reference)."""
    return all(hasattr(model_config, key) for key in ("block_size", "sparsity_type", "num_global_tokens"))


def option_names() -> tuple[str, ...]:
    """The LSG parameters' names (the fields of LSGConfig), as `to_lsg` and the saved configs name them."""
    return tuple(f.name for f in fields(LSGConfig))


def _check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}={value!r} is not accepted: it must be an integer")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
        raise ValueError(f"{name}={value} is not accepted: it must be {bound}")


def did_you_mean(name: str, candidates: Mapping[str, Any] | tuple[str, ...] | list[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
