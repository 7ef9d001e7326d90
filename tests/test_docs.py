"""The examples in the public docstrings run and print what they show, and
every command in README.md and docs/ is one its script takes as written."""

import argparse
import doctest
import inspect
import pathlib
import re
import shlex
import sys

import jax
import jax.numpy as jnp
import pytest

from sae_jax import auxk
from sae_jax import collectives
from sae_jax import evaluate
from sae_jax import loop
from sae_jax import finish
from sae_jax import hooks
from sae_jax import inference
from sae_jax import losses
from sae_jax import matryoshka
from sae_jax import model
from sae_jax import optimizer
from sae_jax import pool
from sae_jax import probing
from sae_jax import scoring
from sae_jax import seeds
from sae_jax import selection
from sae_jax import spelling
from sae_jax import thresholds
from sae_jax import transcoder
from tests import scripts


@pytest.mark.parametrize("module", [auxk, collectives, evaluate, finish, hooks, inference,
                                    pytest.param(loop, marks=pytest.mark.slow), losses, matryoshka,
                                    model, optimizer, pool, probing, scoring, seeds, selection,
                                    spelling, thresholds, transcoder])
def test_docstring_examples(module):
  result = doctest.testmod(module, extraglobs={"jax": jax, "jnp": jnp},
                           optionflags=doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0
  assert result.failed == 0


# --- The commands in README.md and docs/ ------------------------------------

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# A script command as written: python (or .venv/bin/python) experiments/X.py
# or benchmarks/X.py, and its arguments up to the end of the line, backtick
# or quote. Environment assignments before it are not part of it.
COMMAND = re.compile(r"(?:\.venv/bin/)?python ((?:experiments|benchmarks)/\w+\.py)([^`\"\n]*)")


def commands() -> list:
  """(page, script, arguments) of every script command in the docs."""
  found = []
  for page in PAGES:
    for script, rest in COMMAND.findall(page.read_text()):
      found.append((page.relative_to(ROOT), script, shlex.split(rest)))
  return found


class Parsed(Exception):
  """Raised by the patched parse_args once the flags parsed."""


def test_the_docs_name_the_commands_we_test():
  """The pages are all read: README.md's main command and some of every page's."""
  found = commands()
  assert ("README.md", "experiments/train.py", ["--l", "8", "--k", "64"]) in [
      (str(p), s, a) for p, s, a in found]
  assert {str(p) for p, _, _ in found} >= {"README.md", "docs/speed.md", "docs/activations.md"}


@pytest.mark.parametrize("page, script, args", commands(),
                         ids=lambda v: str(v) if not isinstance(v, list) else "")
def test_every_command_in_the_docs_parses(page, script, args, monkeypatch):
  """Each command's script exists and takes its flags as written (parsed by
  the script's own parser, then stopped before any work)."""
  path = ROOT / script
  assert path.is_file(), f"{page}: {script} does not exist"
  source = path.read_text()
  if "parse_args" not in source:
    assert not args, f"{page}: {script} takes no arguments; the page gives {args}"
    return
  original = argparse.ArgumentParser.parse_args

  def parse(self, argv=None, namespace=None):
    original(self, argv, namespace)
    raise Parsed

  monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse)
  monkeypatch.setattr(sys, "argv", [str(path), *args])
  monkeypatch.syspath_prepend(str(path.parent))  # a script imports its siblings
  module = (scripts.load if script.startswith("experiments/") else scripts.load_benchmark)(
      path.stem)
  takes_argv = "argv" in inspect.signature(module.main).parameters
  with pytest.raises(Parsed):
    try:
      module.main(args) if takes_argv else module.main()
    except SystemExit as exit:
      raise AssertionError(f"{page}: {script} {' '.join(args)} does not parse") from exit


def test_the_python_blocks_in_the_docs_compile():
  for page in PAGES:
    for block in re.findall(r"```python\n(.*?)```", page.read_text(), re.S):
      compile(block, str(page), "exec")


def test_the_docs_links_resolve():
  """Every relative link of a page names a file that exists."""
  for page in PAGES:
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
      assert (page.parent / target).exists(), f"{page.relative_to(ROOT)}: {target}"
