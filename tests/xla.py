"""The compiler the tests run under, here and in the processes they launch:
XLA:CPU on fake devices, at its lowest optimisation. Compiling is most of
the suite's time and its programs are tiny (the measurements:
docs/testing.md).

Two properties belong to XLA's default compiler, not to our code alone: one
token encoded alone gets the bits it gets inside a batch, and pmap runs the
step shard_map runs, bit for bit. Unoptimised, they do not hold (XLA sums a
one-row matmul in another order). The tests of such properties are
marked `xla_default` and run under XLA's own flags (with any XLA_FLAGS the
session was started with), each in a pytest process of its own.
`SAE_JAX_TEST_XLA=default` runs everything so."""

import os
import pathlib
import subprocess
import sys
import tempfile
from xml.etree import ElementTree

# The flags this session was started with: pytest-xdist's workers inherit the
# controller's XLA_FLAGS, which conftest.py has already rewritten.
_GIVEN = os.environ.setdefault("SAE_JAX_TEST_GIVEN_XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
FAST = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
DEFAULT = os.environ.get("SAE_JAX_TEST_XLA") == "default"


def flags(devices: int) -> str:
  mine = [] if DEFAULT else [FAST]
  return " ".join([*_GIVEN.split(), *mine, f"--xla_force_host_platform_device_count={devices}"])


def env(devices: int = 4) -> dict:
  """os.environ for a launched process with `devices` CPU devices."""
  return dict(os.environ, XLA_FLAGS=flags(devices), JAX_PLATFORMS="cpu")


def run_under_default_flags(nodeid: str, root) -> None:
  """Runs one test in a pytest process under XLA's default flags; raises
  with that process's report unless it ran and passed."""
  with tempfile.TemporaryDirectory() as tmp:
    report = pathlib.Path(tmp) / "report.xml"
    # Not PYTEST_ADDOPTS either: one test, here, whatever the session was given.
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    try:
      done = subprocess.run(
          [sys.executable, "-m", "pytest", "-o", "addopts=", "-p", "no:xdist", "-p",
           "no:cacheprovider", "-m", "", f"--junitxml={report}", nodeid],
          env=dict(env, XLA_FLAGS=_GIVEN, SAE_JAX_TEST_XLA="default"),
          cwd=root, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired as late:
      raise AssertionError(f"{nodeid} under XLA's default flags: no end in 600 s:\n"
                           f"{late.stdout}{late.stderr}") from None
    suite = ElementTree.parse(report).getroot().find("testsuite") if report.exists() else None
  counts = {} if suite is None else {k: int(suite.get(k)) for k in
                                     ("tests", "failures", "errors", "skipped")}
  if done.returncode != 0 or counts != {"tests": 1, "failures": 0, "errors": 0, "skipped": 0}:
    raise AssertionError(f"{nodeid} under XLA's default flags ({counts}):\n"
                         f"{done.stdout[-6000:]}{done.stderr[-2000:]}")
