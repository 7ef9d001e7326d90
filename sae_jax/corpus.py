"""Real English text on every machine: Python's own documentation, written
as a .jsonl corpus for demos that cannot reach a dataset hub. Its documents
are the standard library's docstrings (in the files' sorted order), then
the language reference's help topics (`pydoc_data.topics`, what `help()`
shows), about 560,000 WordPiece tokens in Python 3.11."""

import ast
import json
import os
import pathlib
import sysconfig
import typing

# Test suites and their data hold code-like strings and deliberate nonsense.
_SKIPPED = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def stdlib_files() -> list:
  """The standard library's .py files, sorted, without tests and packages."""
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  return sorted(path for path in root.rglob("*.py")
                if not _SKIPPED & set(path.relative_to(root).parts))


def docstrings(path: pathlib.Path, min_words: int) -> typing.Iterator[str]:
  """The module's, classes' and functions' docstrings of one file (cleaned
  of indentation) with at least `min_words` words; none for a file Python
  cannot parse."""
  try:
    tree = ast.parse(path.read_bytes())
  except (SyntaxError, ValueError):
    return
  for node in ast.walk(tree):
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      text = ast.get_docstring(node, clean=True)
      if text and len(text.split()) >= min_words:
        yield text


def documents(min_words: int = 8) -> typing.Iterator[str]:
  """The corpus's documents, in order."""
  for path in stdlib_files():
    yield from docstrings(path, min_words)
  from pydoc_data import topics  # noqa: PLC0415 (a large module, read only here)
  for name in sorted(topics.topics):
    yield topics.topics[name].strip()


def write_corpus(out, min_words: int = 8) -> dict:
  """Writes the corpus to `out` (.jsonl, {"text": ...} per line) whole or
  not at all (a temporary file renamed). Returns its counts."""
  out = pathlib.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  partial = out.with_name(f".{out.name}.tmp-{os.getpid()}")
  count = words = 0
  try:
    with open(partial, "w", encoding="utf-8") as f:
      for text in documents(min_words):
        f.write(json.dumps({"text": text}) + "\n")
        count += 1
        words += len(text.split())
    os.replace(partial, out)
  finally:
    partial.unlink(missing_ok=True)
  return {"documents": count, "words": words}
