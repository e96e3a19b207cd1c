"""The long-document corpus: real text that every Debian/Python machine ships, joined into two-part documents.

Sources, one category each (a category is what the classification task asks about):
  python     docstrings of the standard library's modules (in source order, no tests) and the pydoc topics
  changelog  /usr/share/doc changelog* and NEWS* files (most gzipped)
  license    /usr/share/common-licenses/* and /usr/share/doc/*/copyright
  readme     /usr/share/doc READMEs, .md, .txt and .rst files

A benchmark document joins the beginning of one source file (part A) to the beginning of another (part B),
like a bundle of a package's documentation: a passage cut out of it can lie at any depth (retrieval), and
"which kinds of text does it contain" needs both parts (classification). Source files are split once into
train / held-out by a hash of their path, so no file's text is seen on both sides.
"""
from __future__ import annotations

import ast
import functools
import gzip
import hashlib
import random
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

CATEGORIES = ("python", "changelog", "license", "readme")
DEPTH_BINS = ((0, 512), (512, 1024), (1024, 2048), (2048, 4096))
HELD_OUT_PERCENT = 40
MIN_SOURCE_CHARS = 3000
MAX_SOURCE_CHARS = 24000  # documents use at most ~3.6k tokens of a source: the rest is never read


@dataclass(frozen=True)
class Source:
    """One real text file (or one module's docstrings) and its category."""

    name: str
    category: str
    text: str


@dataclass(frozen=True)
class Query:
    """A passage cut out of `document` starting at token `depth`."""

    text: str
    document: int
    depth: int


@dataclass
class Document:
    """Part A's first tokens then part B's; `split_token` is where part B starts."""

    name: str
    text: str
    categories: tuple[str, str]
    split_token: int
    num_tokens: int
    queries: list[Query] = field(default_factory=list)

    @property
    def label(self) -> frozenset[str]:
        return frozenset(self.categories)


def split_of(name: str) -> str:
    """'held_out' for a fixed HELD_OUT_PERCENT of names, by hash: the same on every machine and every run."""
    bucket = int(hashlib.sha1(name.encode()).hexdigest(), 16) % 100
    return "held_out" if bucket < HELD_OUT_PERCENT else "train"


def read_text(path: Path) -> str:
    """File text, gunzipped when needed; undecodable bytes replaced (some changelogs are latin-1)."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    return raw.decode("utf-8", errors="replace")


def module_docstrings(path: Path) -> str:
    """Every docstring of a module in source order: the documentation the stdlib ships in its code."""
    tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))]
    nodes.sort(key=lambda n: getattr(n, "lineno", 0))
    return "\n\n".join(doc for n in nodes if (doc := ast.get_docstring(n)))


def python_sources(with_modules: bool = True) -> Iterable[Source]:
    """The pydoc topics, and (slow: parses ~700 files) the docstrings of every stdlib module."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield Source(f"pydoc/{name}", "python", topics[name])
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")) if with_modules else []:
        relative = path.relative_to(stdlib)
        skipped = {"site-packages", "test", "tests", "idle_test"} & set(relative.parts)
        if skipped or path.stat().st_size < MIN_SOURCE_CHARS:  # too small to hold enough docstrings
            continue
        try:
            yield Source(f"stdlib/{relative}", "python", module_docstrings(path))
        except SyntaxError:
            continue


def doc_category(path: Path) -> str | None:
    """Category of a /usr/share/doc file from its name, None for files the corpus skips."""
    name = path.name.lower().removesuffix(".gz")
    if name.startswith(("changelog", "news")):
        return "changelog"
    if name == "copyright":
        return "license"
    if name.startswith("readme") or name.endswith((".md", ".txt", ".rst")):
        return "readme"
    return None


def debian_sources(doc_root: Path = Path("/usr/share/doc"),
                   licenses: Path = Path("/usr/share/common-licenses")) -> Iterable[Source]:
    for path in sorted(licenses.glob("*")) if licenses.is_dir() else []:
        if path.is_file() and not path.is_symlink():
            yield Source(f"common-licenses/{path.name}", "license", read_text(path))
    for path in sorted(doc_root.rglob("*")) if doc_root.is_dir() else []:
        category = doc_category(path)
        if category and path.is_file() and not path.is_symlink():
            yield Source(str(path.relative_to(doc_root)), category, read_text(path))


def unique_sources(sources: Iterable[Source], min_chars: int = MIN_SOURCE_CHARS) -> list[Source]:
    """Long enough sources, each text once: many packages ship the same copyright or README text, and a
    passage of a duplicated text would have two right answers."""
    seen: set[str] = set()
    kept = []
    for source in sources:
        key = hashlib.sha1(" ".join(source.text[:4000].split()).encode()).hexdigest()
        if len(source.text) >= min_chars and key not in seen:
            seen.add(key)
            kept.append(Source(source.name, source.category, source.text[:MAX_SOURCE_CHARS]))
    return kept


@functools.cache
def machine_sources(with_modules: bool = True) -> tuple[Source, ...]:
    """All sources of this machine in a deterministic order, read once per process (it takes seconds);
    without the stdlib modules' docstrings for the --quick runs."""
    return tuple(unique_sources(list(python_sources(with_modules)) + list(debian_sources())))


Offsets = Callable[[str], list[tuple[int, int]]]


def token_offsets(tokenizer) -> Offsets:
    """Character span of each token of a text (no special tokens): cuts fall on token boundaries."""
    def offsets(text: str) -> list[tuple[int, int]]:
        return tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return offsets


def build_documents(sources: Sequence[Source], split: str, count: int, offsets: Offsets, *,
                    min_tokens: int = 1024, max_tokens: int = 3584, query_tokens: int = 64,
                    seed: int = 0) -> list[Document]:
    """`count` two-part documents of `split`'s sources, each source used at most once.

    Categories of both parts are drawn uniformly, so a document mixes two kinds of text three times in four;
    its length is uniform in [min_tokens, max_tokens] and part B starts uniformly in
    [min_tokens // 4, length - min_tokens // 4]. Queries: one passage per depth bin the document reaches."""
    rng = random.Random(seed)
    pools = {c: [s for s in sources if s.category == c and split_of(s.name) == split] for c in CATEGORIES}
    for pool in pools.values():
        rng.shuffle(pool)
    spans_of: dict[str, list[tuple[int, int]]] = {}

    def take(category: str, tokens: int) -> tuple[Source, list[tuple[int, int]]]:
        """The next unused source of `category` with at least `tokens` tokens."""
        for i, source in enumerate(pools[category]):
            spans = spans_of.setdefault(source.name, offsets(source.text))
            if len(spans) >= tokens:
                return pools[category].pop(i), spans
        raise ValueError(f"no {split} {category} source of {tokens} tokens left for document {len(documents)}")

    documents: list[Document] = []
    while len(documents) < count:
        first, second = rng.choice(CATEGORIES), rng.choice(CATEGORIES)
        length = rng.randint(min_tokens, max_tokens)
        cut = rng.randint(min_tokens // 4, length - min_tokens // 4)
        (a, spans_a), (b, spans_b) = take(first, cut), take(second, length - cut)
        text = f"{a.text[: spans_a[cut - 1][1]]}\n\n{b.text[: spans_b[length - cut - 1][1]]}"
        document = Document(f"{a.name} + {b.name}", text, (first, second), cut, length)
        document.queries = cut_queries(document, len(documents), offsets, query_tokens, rng)
        documents.append(document)
    return documents


def cut_queries(document: Document, index: int, offsets: Offsets, query_tokens: int,
                rng: random.Random) -> list[Query]:
    """One passage of `query_tokens` tokens per depth bin that holds one entirely; it stays in the document."""
    spans = offsets(document.text)
    queries = []
    for low, high in DEPTH_BINS:
        last = min(high, len(spans) - query_tokens)
        if last > low:
            start = rng.randrange(low, last)
            end = start + query_tokens - 1
            queries.append(Query(document.text[spans[start][0]: spans[end][1]], index, start))
    return queries


def depth_bin(depth: int) -> str:
    """Label of the depth bin holding token `depth`, e.g. '512-1024'."""
    for low, high in DEPTH_BINS:
        if low <= depth < high:
            return f"{low}-{high}"
    raise ValueError(f"depth {depth} is past the last bin {DEPTH_BINS[-1]}")
