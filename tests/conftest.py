"""Strict JAX for every test, on 4 fake CPU devices compiled fast
(tests/xla.py), offline, with one persistent compilation cache for the
session and the processes it launches."""

import atexit
import os
import shutil
import tempfile

from tests import xla

os.environ["XLA_FLAGS"] = xla.flags(4)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests' exports read local text files; offline, `datasets` does not ping
# its download counter on s3.amazonaws.com for each (no address but 127.0.0.1).
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# The launched runs (train.py, sweep_l.py, two processes of a multi-host run)
# compile the same small programs again and again: they inherit this cache
# and load them (a small synthetic run: 10 s cold, 5 s warm on 2 cores). Each
# session starts empty, so nothing carries over from another version.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="sae_jax_tests_xla_")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ.update(JAX_COMPILATION_CACHE_DIR=_cache,
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

import jax  # noqa: E402  (must come after XLA_FLAGS)
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_threefry_partitionable", True)


def pytest_configure(config):
  assert jax.device_count() == 4, "tests expect 4 fake CPU devices"


def pytest_pyfunc_call(pyfuncitem):
  """A test marked `xla_default` runs in a pytest process of its own under
  XLA's default flags (tests/xla.py says why), unless this one already is."""
  if xla.DEFAULT or pyfuncitem.get_closest_marker("xla_default") is None:
    return None
  xla.run_under_default_flags(pyfuncitem.nodeid, pyfuncitem.config.rootpath)
  return True


@pytest.fixture(autouse=True, scope="module")
def compiled_per_file():
  """Frees each test file's compiled functions after it (the persistent
  cache brings back any another file needs). XLA:CPU crashed in a compile
  (SIGSEGV, SIGABRT) late in a session that kept every file's programs."""
  yield
  jax.clear_caches()


@pytest.fixture(params=["bisect", "offers"])
def threshold_path(request):
  """Runs a test once per way of finding the BatchTopK threshold: bisection
  over all entries (small inputs) and certified per-token offers (large).
  The test passes it as `search=`, a static argument, so each path compiles
  once and nothing is cleared."""
  return request.param


@pytest.fixture(scope="session")
def lm(tmp_path_factory):
  """A tiny random GPT-NeoX with its tokenizer, and text files, on disk."""
  from tests import tiny_lm
  root = tmp_path_factory.mktemp("lm")
  return {"model": str(tiny_lm.build(root / "model")),
          "texts": {k: tuple(map(str, v)) for k, v in tiny_lm.write_texts(root / "texts").items()}}


@pytest.fixture(scope="session")
def cache(lm, tmp_path_factory):
  """A complete 700-row cache of the tiny model (5 shards of 128 rows + 60)."""
  from sae_jax import export
  from tests import tiny_lm
  out = tmp_path_factory.mktemp("cache") / "cache"
  export.export_activations(tiny_lm.export_config(lm), out, progress=False)
  return out
