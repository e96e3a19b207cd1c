"""ConversionOptions: everything a conversion can be told, in one frozen dataclass, validated when it is built.

Every way in builds one: `to_lsg` (its keyword-only parameters are these fields), `enabled()` and
`lsg-patch run`, `lsg-patch convert`, the LSG keywords given to `from_pretrained` inside a block. A field left
None was not given: on a first conversion it takes its default (`LSGConfig`'s, `DEFAULT_MAX_LENGTH`,
`SEEDING_DEFAULTS`); on a model that is already LSG the model's current value stays. So the same object answers
both "what did the user ask for" (to merge nested blocks, or a block with from_pretrained's keywords) and "what
does the conversion do" (`settings`, `max_length_for`, `global_init`).

What is in it, and why:
- the LSG parameters (the fields of `LSGConfig`): they are saved with the model and define its attention;
- max_length: the length the converted model accepts;
- the seeding options (global_positional_stride, bos_token_id, mask_token_id, random_global_init, seed): they
  decide the initial global tokens, so only a first conversion uses them; a model that is already LSG keeps its
  trained global tokens, and giving them there is refused rather than ignored.
The tokenizer is not an option: it is a live object the conversion also writes to (its model_max_length), so it
travels beside the options.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import MISSING, dataclass, fields, replace
from typing import Any, Callable, Mapping, TypeVar

from .config import LSGConfig, did_you_mean, option_names
from .global_tokens import GlobalInit, check_seed

DEFAULT_MAX_LENGTH = 4096
Function = TypeVar("Function", bound=Callable[..., Any])
# The seeding options are GlobalInit's fields, with its defaults (the token ids: None, resolved at conversion time).
SEEDING_DEFAULTS: dict[str, Any] = {f.name: None if f.default is MISSING else f.default for f in fields(GlobalInit)}
SEEDING_OPTIONS = tuple(SEEDING_DEFAULTS)


@dataclass(frozen=True)
class ConversionOptions:
    """The options of one conversion; None = not given (see the module docstring). Invalid values raise a
    ValueError naming the option and what is accepted, when the object is built."""

    max_length: int | None = None
    # LSG parameters (LSGConfig's fields)
    block_size: int | None = None
    sparse_block_size: int | None = None
    sparsity_factor: int | None = None
    sparsity_type: str | None = None
    num_global_tokens: int | None = None
    mask_first_token: bool | None = None
    pool_with_global: bool | None = None
    adaptive: bool | None = None
    lsh_num_pre_rounds: int | None = None
    pass_global_tokens_to_decoder: bool | None = None
    # seeding of new global tokens (first conversion only)
    global_positional_stride: int | None = None
    bos_token_id: int | None = None
    mask_token_id: int | None = None
    random_global_init: bool | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_length is not None:
            _check_positive("max_length", self.max_length)
        _check_lsg_values(self.lsg_given())
        if self.global_positional_stride is not None:
            _check_positive("global_positional_stride", self.global_positional_stride)
        for name in ("bos_token_id", "mask_token_id"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name}={value!r} is not accepted: it must be a token id (an integer >= 0) or None")
        if self.random_global_init is not None and not isinstance(self.random_global_init, bool):
            raise ValueError(f"random_global_init={self.random_global_init!r} is not accepted: it must be True or False")
        if self.seed is not None:
            check_seed(self.seed)

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any], also_accepted: tuple[str, ...] = ()) -> "ConversionOptions":
        """From keyword options (a JSON object, **kwargs): unknown names raise with a suggestion for typos (the
        message lists `also_accepted` too: names the caller takes besides the options); None counts as not given."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            name = unknown[0]
            accepted = sorted([*known, *also_accepted])
            raise ValueError(
                f"unknown LSG option {name!r}{did_you_mean(name, accepted)}; accepted options are {', '.join(accepted)}"
            )
        return cls(**{name: value for name, value in options.items() if value is not None})

    def given(self) -> dict[str, Any]:
        """The options that were given, by name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def lsg_given(self) -> dict[str, Any]:
        """The LSG parameters that were given."""
        return {name: getattr(self, name) for name in option_names() if getattr(self, name) is not None}

    def seeding_given(self) -> dict[str, Any]:
        """The seeding options that were given."""
        return {name: getattr(self, name) for name in SEEDING_OPTIONS if getattr(self, name) is not None}

    def over(self, base: "ConversionOptions") -> "ConversionOptions":
        """These options where given, else `base`'s (a nested block over its outer one, from_pretrained's keywords
        over the block's); the merge is validated again."""
        return replace(base, **self.given())

    def settings(self, current: LSGConfig | None) -> LSGConfig:
        """The LSG settings after the conversion: the given parameters over `current` (the model's, when it is
        already LSG) or over the defaults; the cross-field rules are checked on the result."""
        given = self.lsg_given()
        return replace(current, **given) if current is not None else LSGConfig(**given)

    def max_length_for(self, current: int | None) -> int:
        """The max_length of the conversion: the given one, else the model's current one (already LSG), else 4096."""
        if self.max_length is not None:
            return self.max_length
        return current if current is not None else DEFAULT_MAX_LENGTH

    def global_init(self, bos_token_id: int | None, mask_token_id: int | None) -> GlobalInit:
        """The seeding of new global tokens: the given seeding options over their defaults, with the token ids
        resolved from these options, the tokenizer or the config (`token_ids.resolve_seed_tokens`)."""
        return GlobalInit(**{**SEEDING_DEFAULTS, **self.seeding_given(), "bos_token_id": bos_token_id,
                             "mask_token_id": mask_token_id})  # fmt: skip


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} is not accepted: it must be a positive integer")


def _check_lsg_values(given: dict[str, Any]) -> None:
    """Validate the given LSG parameters on their own (LSGConfig's rules). The two cross-field rules (block_size a
    multiple of sparsity_factor, mask_first_token needs pool_with_global) are checked only when both fields are
    given: the settings they are merged into are validated again by `settings`."""
    permissive: dict[str, Any] = {}
    factor = given.get("sparsity_factor")
    if "block_size" not in given and isinstance(factor, int) and not isinstance(factor, bool) and factor > 0:
        permissive["block_size"] = factor
    if "sparsity_factor" not in given:
        permissive["sparsity_factor"] = 1
    if "pool_with_global" not in given:
        permissive["pool_with_global"] = True
    LSGConfig(**{**permissive, **given})


def refusing_unknown_options(function: Function) -> Function:
    """Make a function whose keyword-only parameters are the options answer a misspelled one with the ValueError
    `from_mapping` gives (a suggestion and the accepted names) instead of Python's bare TypeError."""
    parameters = inspect.signature(function).parameters
    options = {f.name for f in fields(ConversionOptions)}
    keywords = tuple(name for name, p in parameters.items() if p.kind is p.KEYWORD_ONLY and name not in options)

    @functools.wraps(function)
    def checked(*args: Any, **kwargs: Any) -> Any:
        unknown = sorted(set(kwargs) - set(parameters))
        if unknown:
            ConversionOptions.from_mapping({unknown[0]: kwargs[unknown[0]]}, also_accepted=keywords)  # raises
        return function(*args, **kwargs)

    return checked  # type: ignore[return-value]
