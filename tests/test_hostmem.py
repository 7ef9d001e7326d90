"""`hostmem.use_tcmalloc`: a script re-executes itself with tcmalloc, after
which XLA:CPU's large buffers stop faulting their pages in on every call.
Real processes, the real library (setup.sh installs it)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = """
import json, os, resource, subprocess, sys
print("start", os.getpid(), sys.argv[1:], flush=True)
from sae_jax import hostmem

if __name__ == "__main__":
  loaded = hostmem.use_tcmalloc()
  import jax, jax.numpy as jnp
  relu = jax.jit(lambda a: jnp.maximum(a, 0))
  a = jnp.ones((2048, 8192))  # 64 MiB out of each call
  for _ in range(2):
    relu(a).block_until_ready()
  faults = []
  for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    relu(a).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
  faults = sorted(faults)[2]  # the median call (tcmalloc may hand pages back once)
  child = subprocess.run([sys.executable, "-c", "import os; print(os.environ.get('LD_PRELOAD'), "
                          "'tcmalloc' in open('/proc/self/maps').read())"],
                         capture_output=True, text=True, check=True).stdout.split()
  print(json.dumps({"loaded": loaded, "faults": faults, "bytes": a.nbytes, "child": child}))
"""


def run(tmp_path, **env):
  script = tmp_path / "script.py"
  script.write_text(SCRIPT)
  env = {**{k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}, **env,
         "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  done = subprocess.run([sys.executable, str(script), "--flag", "a b"], env=env, cwd=tmp_path,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]
  lines = done.stdout.splitlines()
  starts = [line for line in lines if line.startswith("start ")]
  return starts, json.loads(lines[-1])


def pages(n_bytes: int) -> int:
  """Pages the kernel faults in for n_bytes touched once (huge pages where
  transparent huge pages are always on)."""
  thp = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")
  huge = thp.exists() and "[always]" in thp.read_text()
  return n_bytes // (2**21 if huge else os.sysconf("SC_PAGE_SIZE"))


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")
def test_script_reexecutes_on_tcmalloc_and_stops_faulting(tmp_path):
  starts, got = run(tmp_path)
  # Started twice, in the same process, with the same arguments.
  assert len(starts) == 2 and starts[0] == starts[1], starts
  assert starts[0].endswith("['--flag', 'a b']")
  assert got["loaded"]
  assert got["faults"] < pages(got["bytes"]) / 100
  # What the script starts gets the environment it was given.
  assert got["child"] == ["None", "False"]

  # The control: the system's malloc faults the output in on every call.
  starts, got = run(tmp_path, SAE_JAX_SYSTEM_MALLOC="1")
  assert len(starts) == 1 and not got["loaded"]
  assert got["faults"] >= pages(got["bytes"]) / 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")
def test_a_preload_of_the_users_own_stands(tmp_path):
  starts, got = run(tmp_path, LD_PRELOAD="libm.so.6")
  assert len(starts) == 1 and not got["loaded"]
  assert got["child"] == ["libm.so.6", "False"]
