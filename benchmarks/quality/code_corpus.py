"""This machine's Python standard library as a code corpus for small decoders trained from scratch.

What the decoder benchmark needs from the text, each computed from the files alone:
  - the fixed train / held-out split (corpus.split_of: a hash of the file's path),
  - a byte-level BPE trained offline on the train split, digits always single tokens (so a number's digits
    can be scored one by one),
  - key/assert pairs inserted at line boundaries (`_KEY_A = 48213` ... `assert _KEY_A == 48213`), the code passkey,
  - the identifier occurrences of a file, classed by how far back the same name last occurred.
"""
from __future__ import annotations

import bisect
import io
import keyword
import math
import random
import string
import sysconfig
import tokenize
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .corpus import split_of

BOS = "<|file|>"  # token 0: starts every file
SKIPPED_PARTS = {"site-packages", "test", "tests", "idle_test"}
KEY_DIGITS = 5
KEY_LETTERS = string.ascii_uppercase


@dataclass(frozen=True)
class CodeFile:
    name: str
    text: str


def python_files(split: str, min_chars: int = 2000) -> list[CodeFile]:
    """The standard library's .py files of one split (tests and site-packages left out), in path order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(stdlib.rglob("*.py")):
        relative = path.relative_to(stdlib)
        name = f"stdlib/{relative}"
        if SKIPPED_PARTS & set(relative.parts) or split_of(name) != split:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if len(text) >= min_chars:
            files.append(CodeFile(name, text))
    return files


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2's pre-tokenisation) with every digit its own token; BOS is id 0."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def encode(tokenizer: Tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """BOS + the text's ids, and each id's character span (BOS: (0, 0))."""
    encoding = tokenizer.encode(text, add_special_tokens=False)
    return [0] + encoding.ids, [(0, 0)] + list(encoding.offsets)


def line_token_starts(text: str, offsets: list[tuple[int, int]]) -> list[int]:
    """For each line of `text`, the index of the first token starting at or after the line's first character."""
    starts = [start for start, _ in offsets]
    line_chars, position = [], 0
    for line in text.splitlines(keepends=True):
        line_chars.append(position)
        position += len(line)
    return [bisect.bisect_left(starts, c, lo=1) for c in line_chars]


def key_lines(name: str, value: str, indent: str) -> tuple[str, str]:
    """The assignment and the assert of one key, at the indentation of the line they are put before."""
    return f"{indent}{name} = {value}\n", f"{indent}assert {name} == {value}\n"


def insert_lines(text: str, insertions: list[tuple[int, str]]) -> str:
    """`text` with each (line index, new line) inserted before that line, indented like it (stable order)."""
    lines = text.splitlines(keepends=True)
    by_line: dict[int, list[str]] = {}
    for index, new_line in insertions:
        by_line.setdefault(index, []).append(new_line)
    out = []
    for index, line in enumerate(lines):
        out.extend(by_line.get(index, []))
        out.append(line)
    return "".join(out)


def indentation(text: str, line_index: int) -> str:
    line = text.splitlines()[line_index]
    return line[: len(line) - len(line.lstrip(" \t"))] if line.strip() else ""


def first_line_at(line_tokens: list[int], token: int) -> int | None:
    """The first line starting at or after `token` (None past the end)."""
    index = bisect.bisect_left(line_tokens, token)
    return index if index < len(line_tokens) else None


def random_key_value(rng: random.Random) -> str:
    return str(rng.randint(10 ** (KEY_DIGITS - 1), 10 ** KEY_DIGITS - 1))


def with_key_pairs(tokenizer: Tokenizer, text: str, rng: random.Random, *, tokens_per_pair: int,
                   max_distance: int, min_distance: int = 16) -> str:
    """Training text: key/assert pairs with distinct names (`_KEY_<letter>`) every ~`tokens_per_pair` tokens,
    each assert a log-uniform distance in [min_distance, max_distance] tokens after its key."""
    _, offsets = encode(tokenizer, text)
    line_tokens = line_token_starts(text, offsets)
    count = min(len(KEY_LETTERS), len(offsets) // tokens_per_pair)
    insertions = []
    for letter in rng.sample(KEY_LETTERS, count):
        key_at = rng.randrange(len(offsets))
        distance = int(math.exp(rng.uniform(math.log(min_distance), math.log(max_distance))))
        key_line, assert_line = first_line_at(line_tokens, key_at), first_line_at(line_tokens, key_at + distance)
        if key_line is None or assert_line is None or assert_line <= key_line:
            continue
        value = random_key_value(rng)
        assignment, check = key_lines(f"_KEY_{letter}", value, "")
        insertions += [(key_line, indentation(text, key_line) + assignment),
                       (assert_line, indentation(text, assert_line) + check)]
    return insert_lines(text, insertions)


@dataclass(frozen=True)
class Passkey:
    """One held-out passkey sequence: BOS + tokens up to the assert's last digit; `digits` indexes the assert's
    digit tokens, `distance` is from the key's first digit to the assert's first digit, in tokens."""

    file: str
    ids: list[int]
    digits: list[int]
    distance: int
    target: int


def passkey(tokenizer: Tokenizer, file: CodeFile, distance: int, value: str, *, name: str = "_KEY_A",
            key_at: int = 16) -> Passkey | None:
    """`name = value` put before the first line starting at token `key_at`, `assert name == value` before the
    first line at least `distance` tokens later; None when the file is too short."""
    _, offsets = encode(tokenizer, file.text)
    line_tokens = line_token_starts(file.text, offsets)
    key_line = first_line_at(line_tokens, key_at)
    assert_line = None if key_line is None else first_line_at(line_tokens, line_tokens[key_line] + distance)
    if assert_line is None:
        return None
    assignment, check = key_lines(name, value, "")
    text = insert_lines(file.text, [(key_line, assignment), (assert_line, indentation(file.text, assert_line) + check)])
    ids, offsets = encode(tokenizer, text)
    key_char = sum(len(line) for line in file.text.splitlines(keepends=True)[:key_line]) + len(f"{name} = ")
    check_start = text.index(check, key_char)
    assert_char = check_start + len(check) - len(value) - 1
    starts = [start for start, _ in offsets]
    key_digit = bisect.bisect_left(starts, key_char, lo=1)
    first = bisect.bisect_left(starts, assert_char, lo=1)
    digits = list(range(first, first + len(value)))
    if tokenizer.decode(ids[first: first + len(value)]) != value:
        raise ValueError(f"the key's digits are not single tokens in {file.name}: {ids[first:first + len(value)]}")
    return Passkey(file.name, ids[: digits[-1] + 1], digits, first - key_digit, distance)


def identifier_spans(text: str) -> list[tuple[int, int, str]]:
    """(start char, end char, name) of every identifier Python's tokenizer finds (keywords left out); a file it
    cannot tokenize to the end gives the identifiers before the error."""
    line_chars, position = [0], 0
    for line in text.splitlines(keepends=True):
        position += len(line)
        line_chars.append(position)
    spans = []
    try:
        for token in tokenize.generate_tokens(io.StringIO(text).readline):
            if token.type == tokenize.NAME and not keyword.iskeyword(token.string):
                start = line_chars[token.start[0] - 1] + token.start[1]
                spans.append((start, start + len(token.string), token.string))
    except (tokenize.TokenError, SyntaxError):
        pass
    return spans


def identifier_classes(spans: list[tuple[int, int, str]], offsets: list[tuple[int, int]], gap: int
                       ) -> list[tuple[str, list[int]]]:
    """Each identifier occurrence inside the tokens given, as (class, its token indices): 'new' for a name's
    first occurrence, 'near' when it last occurred at most `gap` tokens before, 'far' when further back."""
    starts = [start for start, _ in offsets]
    last_end = offsets[-1][1]
    last_seen: dict[str, int] = {}
    out = []
    for start, end, name in spans:
        if end > last_end:
            break
        first = bisect.bisect_right(starts, start, lo=1) - 1
        last = bisect.bisect_left(starts, end, lo=1)
        previous = last_seen.get(name)
        kind = "new" if previous is None else ("near" if first - previous <= gap else "far")
        out.append((kind, list(range(max(first, 1), last))))
        last_seen[name] = first
    return out
