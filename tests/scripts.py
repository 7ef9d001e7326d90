"""The experiment scripts, imported as modules so tests can call their main()."""

import importlib.util
import pathlib

EXPERIMENTS = pathlib.Path(__file__).resolve().parent.parent / "experiments"


def load(name: str):
  """experiments/<name>.py as a module."""
  spec = importlib.util.spec_from_file_location(f"{name}_script", EXPERIMENTS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
