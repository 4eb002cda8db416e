"""English training text that ships with CPython itself.

Two sources, both read from the running interpreter, so no download is needed:

* ``pydoc_data.topics.topics``: the language reference topics that ``help()`` shows
  (about 0.5 MB), split into passages at blank lines.
* the docstrings of the standard library: every public module named in
  ``sys.stdlib_module_names`` (and the public submodules of its packages), with the
  docstrings of its public classes, functions and methods (``inspect.getdoc``).

Everything is visited in sorted order and identical docstrings are kept once, so the
corpus is the same on every run of the same Python build. One passage in 50 (2%,
chosen by checksum) is held out for validation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import io
import pkgutil
import re
import sys
import types
import warnings
import zlib
from collections.abc import Iterator

# Modules that are private, need a display, open a browser, print on import, are
# test suites, or are replaced by third-party shims (distutils -> setuptools).
SKIPPED_MODULES = frozenset(
    {
        "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test",
        "readline", "rlcompleter", "distutils", "pydoc_data", "encodings", "lib2to3", "ensurepip",
        "msilib", "msvcrt", "winreg", "winsound", "nt",
    }
)
SKIPPED_PARTS = frozenset({"test", "tests", "idle_test", "__main__"})
MIN_DOC_CHARS = 40
HOLDOUT_EVERY = 50
TOPIC_PASSAGE_CHARS = 1500
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Training and validation documents, each a self-contained string."""

    train_docs: list[str]
    val_docs: list[str]

    @property
    def train_chars(self) -> int:
        """Number of characters in the training documents."""
        return sum(len(doc) for doc in self.train_docs)

    @property
    def val_chars(self) -> int:
        """Number of characters in the validation documents."""
        return sum(len(doc) for doc in self.val_docs)


def _is_public(name: str) -> bool:
    parts = name.split(".")
    if parts[0] in SKIPPED_MODULES:
        return False
    return not any(part.startswith("_") or part in SKIPPED_PARTS for part in parts)


def _quiet_import(name: str) -> types.ModuleType | None:
    """Import ``name``, swallowing any failure and anything it prints or warns."""
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except BaseException:  # noqa: BLE001 - platform modules raise all sorts
            return None


def _module_names() -> list[str]:
    """Public stdlib modules and the public submodules of stdlib packages, sorted."""
    names: set[str] = set()
    for top in sorted(sys.stdlib_module_names):
        if not _is_public(top):
            continue
        module = _quiet_import(top)
        if module is None:
            continue
        names.add(top)
        path = getattr(module, "__path__", None)
        if path is None:
            continue
        for info in pkgutil.walk_packages(path, prefix=top + ".", onerror=lambda _name: None):
            if _is_public(info.name):
                names.add(info.name)
    return sorted(names)


def _signature(obj: object) -> str:
    try:
        text = str(inspect.signature(obj))  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - builtin text signatures may fail to evaluate
        return ""
    return "" if len(text) > 200 else _ADDRESS.sub("", text)


def _owned_by(obj: object, module_name: str) -> bool:
    """True if ``obj`` was defined in ``module_name`` or in a private C accelerator."""
    owner = getattr(obj, "__module__", None)
    return isinstance(owner, str) and (owner == module_name or owner.startswith("_"))


def _clean(doc: str | None) -> str | None:
    if not doc:
        return None
    doc = _ADDRESS.sub("", doc.strip())
    return doc if len(doc) >= MIN_DOC_CHARS else None


def _module_passages(module: types.ModuleType) -> Iterator[str]:
    """Yield ``header + docstring`` passages for a module, its classes and functions."""
    name = module.__name__
    doc = _clean(inspect.getdoc(module))
    if doc:
        yield f"Module {name}\n\n{doc}"
    for attr in sorted(vars(module)):
        obj = vars(module)[attr]
        if attr.startswith("_") or not _owned_by(obj, name):
            continue
        if inspect.isclass(obj):
            doc = _clean(inspect.getdoc(obj))
            if doc:
                yield f"class {name}.{attr}{_signature(obj)}\n\n{doc}"
            for member in sorted(vars(obj)):
                if member.startswith("_"):
                    continue
                try:
                    value = getattr(obj, member)
                except Exception:  # noqa: BLE001 - descriptors may raise
                    continue
                if inspect.isroutine(value) or isinstance(value, property):
                    doc = _clean(inspect.getdoc(value))
                    if doc:
                        yield f"{name}.{attr}.{member}{_signature(value)}\n\n{doc}"
        elif inspect.isroutine(obj):
            doc = _clean(inspect.getdoc(obj))
            if doc:
                yield f"{name}.{attr}{_signature(obj)}\n\n{doc}"


def _topic_passages() -> Iterator[tuple[str, list[str]]]:
    """Yield ``(topic, passages)`` for the language reference, cut at blank lines."""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        passages: list[str] = []
        current = ""
        for block in topics[key].strip().split("\n\n"):
            if current and len(current) + len(block) > TOPIC_PASSAGE_CHARS:
                passages.append(current)
                current = ""
            current = f"{current}\n\n{block}" if current else block
        if current:
            passages.append(current)
        yield key, passages


def _sources() -> Iterator[list[str]]:
    """Yield one list of passages per source (a topic or a module), in a fixed order."""
    for _key, passages in _topic_passages():
        yield passages
    for name in _module_names():
        module = sys.modules.get(name) or _quiet_import(name)
        if module is not None:
            yield list(_module_passages(module))


def build_corpus() -> Corpus:
    """Collect the corpus: one training document per source, held-out passages apart.

    A passage whose CRC-32 is a multiple of ``HOLDOUT_EVERY`` becomes a validation
    document of its own (so the split does not shift if one docstring changes); the
    rest of a source are joined into one training document. Repeated passages
    (inherited or re-exported docstrings) are dropped.
    """
    seen: set[str] = set()
    train: list[str] = []
    val: list[str] = []
    for passages in _sources():
        kept: list[str] = []
        for passage in passages:
            body = passage.split("\n\n", 1)[-1]
            if body in seen:
                continue
            seen.add(body)
            if zlib.crc32(passage.encode()) % HOLDOUT_EVERY == 0:
                val.append(passage)
            else:
                kept.append(passage)
        if kept:
            train.append("\n\n".join(kept))
    return Corpus(train_docs=train, val_docs=val)


if __name__ == "__main__":
    corpus = build_corpus()
    print(f"train: {len(corpus.train_docs)} docs, {corpus.train_chars} chars")
    print(f"val: {len(corpus.val_docs)} docs, {corpus.val_chars} chars")
