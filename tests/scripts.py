"""The experiment and benchmark scripts, imported as modules so tests can
call them."""

import importlib.util
import pathlib

EXPERIMENTS = pathlib.Path(__file__).resolve().parent.parent / "experiments"
BENCHMARKS = EXPERIMENTS.parent / "benchmarks"


def _load(path: pathlib.Path, name: str):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load(name: str):
  """experiments/<name>.py as a module."""
  return _load(EXPERIMENTS / f"{name}.py", f"{name}_script")


def load_benchmark(name: str):
  """benchmarks/<name>.py as a module."""
  return _load(BENCHMARKS / f"{name}.py", f"{name}_benchmark")
