"""gs:// for --out, --cache-dir and --data, against fake-gcs-server on
127.0.0.1 (tests/gcs.py): a run, an export and a training on a gs:// cache
or .npy end with the same bytes as on a local disk; a run killed with -9
resumes from its gs:// checkpoint to the same end; two processes share a
gs:// run; the lease refuses a second run; bad URLs are one line."""

import json
import signal
import socket
import subprocess
import time

import fsspec
import numpy as np
import pytest

from sae_jax import data
from sae_jax import export
from sae_jax import storage
from tests import tiny_lm
from tests.gcs import gcs  # noqa: F401  (the fixture)
from tests.helpers import LM_ARGS
from tests.helpers import LM_NAMES
from tests.helpers import SMALL
from tests.helpers import finish
from tests.helpers import launch
from tests.helpers import no_traceback
from tests.helpers import same_run
from tests.helpers import subprocess_run
from tests.helpers import sweep_script
from tests.helpers import train_script


def download(url, to):
  """A gs:// folder copied to the local folder `to` (returned)."""
  fs, name = fsspec.core.url_to_fs(url)
  for relative in storage.files(url):
    (to / relative).parent.mkdir(parents=True, exist_ok=True)
    (to / relative).write_bytes(fs.cat_file(f"{name}/{relative}"))
  return to


def train(*args) -> int:
  return train_script.main([*SMALL, *map(str, args)])


def test_remote_npy_reads_what_numpy_reads(gcs, tmp_path):
  a = np.random.default_rng(0).standard_normal((300, 7)).astype(np.float32)
  url = gcs("npy") + "/a.npy"
  storage.atomic_write(url, lambda f: np.save(f, a))
  remote = data.open_npy(url)
  assert (remote.shape, remote.dtype, remote.ndim) == (a.shape, a.dtype, 2)
  assert remote.offset + remote.nbytes == storage.size(url)
  np.testing.assert_array_equal(remote[5:123], a[5:123])
  np.testing.assert_array_equal(remote[290:400], a[290:])
  np.testing.assert_array_equal(remote[:], a)
  rows = np.array([3, 17, 17, 250, -1])
  np.testing.assert_array_equal(remote[rows], a[rows])
  assert remote[np.array([], np.int64)].shape == (0, 7)
  fortran = gcs("npy") + "/f.npy"
  storage.atomic_write(fortran, lambda f: np.save(f, np.asfortranarray(a)))
  with pytest.raises(ValueError, match=r"f\.npy is not a readable \.npy array \(a Fortran"):
    data.open_npy(fortran)


@pytest.mark.slow
def test_run_on_gs_equals_the_run_on_disk(gcs, tmp_path):
  args = ["--data", "synthetic", "--steps", 40, "--log-every", 10, "--ckpt-every", 15]
  assert train(*args, "--out", tmp_path / "local") == 0
  url = gcs("run")
  assert train(*args, "--out", url) == 0
  names = storage.files(url)
  assert {"config.json", "metrics.jsonl", "summary.json", "saelens/cfg.json",
          "saelens/sae_weights.safetensors", "saelens/sparsity.safetensors",
          "checkpoints/15.meta.json", "checkpoints/40/commit_success.txt"} <= set(names)
  assert ".lock" not in names  # the lease is released
  same_run(tmp_path / "local", download(url, tmp_path / "copy"))
  local = (tmp_path / "local" / "saelens" / "cfg.json").read_text()
  assert (tmp_path / "copy" / "saelens" / "cfg.json").read_text() == local
  # Re-running a finished run changes nothing and is not refused by its own lease.
  assert train(*args, "--out", url) == 0
  same_run(tmp_path / "local", download(url, tmp_path / "again"))


def wait_for_checkpoint(url, step, process, timeout=120):
  deadline = time.time() + timeout
  while time.time() < deadline:  # bounded
    if process.poll() is not None:
      raise AssertionError(f"run ended early: {process.communicate()}")
    done = [n for n in storage.files(url + "/checkpoints") if n.endswith("/commit_success.txt")]
    if any(int(n.split("/")[0]) >= step for n in done if n.split("/")[0].isdigit()):
      return
    time.sleep(0.2)
  raise AssertionError("run did not reach the step in time")


@pytest.mark.slow
def test_killed_gs_run_resumes_to_the_same_end(gcs, tmp_path):
  """kill -9 leaves the lease and the metrics of the last flush; the relaunch
  takes over the lease (same host, dead pid), cuts the metrics back to the
  checkpoint and ends bit for bit as a run never stopped."""
  steps = 300
  assert train("--data", "synthetic", "--steps", steps, "--log-every", 1,
               "--out", tmp_path / "straight") == 0
  url = gcs("killed")
  process = subprocess_run(url, steps, ["--ckpt-every", "50"])
  try:
    wait_for_checkpoint(url, 100, process)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
  finally:
    if process.poll() is None:
      process.kill()
  assert ".lock" in storage.files(url)
  assert train("--data", "synthetic", "--steps", steps, "--log-every", 1, "--ckpt-every", 50,
               "--out", url) == 0
  resumed = download(url, tmp_path / "resumed")
  same_run(tmp_path / "straight", resumed)
  steps_logged = [json.loads(line)["step"]
                  for line in (resumed / "metrics.jsonl").read_text().splitlines()]
  assert steps_logged == list(range(1, steps + 1))


@pytest.fixture(scope="module")
def gs_cache(gcs, lm, cache):
  """The tiny model's cache exported straight to gs://."""
  url = gcs("cache")
  export.export_activations(tiny_lm.export_config(lm), url, progress=False)
  return url


def test_export_to_gs_writes_the_cache_written_to_disk(gs_cache, cache):
  manifest = json.loads(storage.path(gs_cache + "/manifest.json").read_text())
  assert manifest == json.loads((cache / "manifest.json").read_text())  # every sha256
  assert storage.files(gs_cache) == sorted(p.name for p in cache.iterdir())
  for p in cache.iterdir():
    assert storage.path(f"{gs_cache}/{p.name}").read_bytes() == p.read_bytes()


@pytest.mark.parametrize("process_count", [1, 2])
def test_gs_cache_gives_the_batches_of_the_disk_cache(gs_cache, cache, process_count):
  remote = data.Activations(gs_cache, eval_rows=60, verify=True)
  local = data.Activations(cache, eval_rows=60)
  np.testing.assert_array_equal(remote.eval_batch(), local.eval_batch())
  np.testing.assert_array_equal(remote.eval_tokens(), local.eval_tokens())
  for p in range(process_count):
    ours = remote.batches(64, 2, seed=3, start_step=4, process_index=p,
                          process_count=process_count, prefetch=0)
    theirs = local.batches(64, 2, seed=3, start_step=4, process_index=p,
                           process_count=process_count, prefetch=0)
    for _ in range(12):  # past the end of an epoch
      np.testing.assert_array_equal(next(ours), next(theirs))


CACHE_ARGS = ["--batch-size", 32, "--eval-tokens", 64, "--steps", 12, "--log-every", 1,
              "--ckpt-every", 5]


@pytest.mark.slow
def test_two_processes_train_on_gs_as_one_on_disk(gcs, gs_cache, cache, tmp_path):
  """Both processes read the gs:// cache and write one gs:// run (the run's
  files from process 0, orbax's checkpoint with both): the bits of one
  process with 4 devices on the local cache."""
  assert train("--data", cache, *CACHE_ARGS, "--out", tmp_path / "one") == 0
  url = gcs("two")
  results = finish(launch(["--data", gs_cache, *CACHE_ARGS, "--out", url]))
  no_traceback(results)
  assert [code for code, _, _ in results] == [0, 0], results[1][2][-2000:]
  same_run(tmp_path / "one", download(url, tmp_path / "two"))
  # The states are replicated: orbax writes their arrays from process 0 once.
  saved = [n for n in storage.files(url) if n.startswith("checkpoints/12/")]
  assert "checkpoints/12/commit_success.txt" in saved
  assert not any("process_1" in n for n in saved)


def test_npy_on_gs_trains_as_on_disk(gcs, tmp_path):
  rng = np.random.default_rng(1)
  acts = (rng.standard_normal((2000, 16)) * rng.uniform(0.5, 2, 16)).astype(np.float32)
  np.save(tmp_path / "acts.npy", acts)
  url = gcs("data") + "/acts.npy"
  storage.atomic_write(url, lambda f: f.write((tmp_path / "acts.npy").read_bytes()))
  args = ["--steps", 20, "--log-every", 5]
  assert train("--data", tmp_path / "acts.npy", *args, "--out", tmp_path / "local") == 0
  out = gcs("npy-run")
  assert train("--data", url, *args, "--out", out) == 0
  same_run(tmp_path / "local", download(out, tmp_path / "copy"))


def test_lease(gcs):
  url = gcs("lease") + "/.lock"
  held = lambda **record: storage.atomic_write(url, lambda f: f.write(json.dumps(
      {"host": "elsewhere", "pid": 1, "time": time.time()} | record).encode()))
  lease = storage.Lease(url)
  assert lease.acquire() is None
  assert "on " in storage.Lease(url).acquire()  # held by this live process
  lease.release()
  assert not storage.path(url).exists()
  held()  # another host, renewed now
  assert "pid 1 on elsewhere" in storage.Lease(url).acquire()
  held(time=time.time() - storage.Lease.STALE - 1)  # another host, not renewed: stale
  taken = storage.Lease(url)
  assert taken.acquire() is None
  taken.release()
  ended = subprocess.Popen(["true"])
  ended.wait()
  held(host=socket.gethostname(), pid=ended.pid)  # this host, its process gone: stale
  taken = storage.Lease(url)
  assert taken.acquire() is None
  taken.release()


def test_a_held_gs_out_is_refused_in_one_line(gcs, capsys):
  out = gcs("busy")
  storage.atomic_write(out + "/.lock", lambda f: f.write(json.dumps(
      {"host": "elsewhere", "pid": 1, "time": time.time()}).encode()))
  assert train("--data", "synthetic", "--steps", 20, "--out", out) != 0
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith(f"error: --out {out} is in use by another run (pid 1 on "
                            f"elsewhere"), err
  assert storage.files(out) == [".lock"]  # nothing else touched


@pytest.mark.parametrize("flag,value,says", [
    ("--data", "gs://sae-jax-test/no-such.npy", "no-such.npy' is none of these"),
    ("--out", "gs://no-such-bucket/run",
     "--out gs://no-such-bucket/run: the bucket gs://no-such-bucket does not exist"),
])
def test_bad_gs_urls_are_one_line(gcs, capsys, flag, value, says):
  args = {"--data": "synthetic", "--out": gcs("unused")} | {flag: value}
  assert train("--steps", 20, *[x for kv in args.items() for x in kv]) != 0
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and says in err[0] and "Traceback" not in err[0], err


@pytest.mark.slow
def test_sweep_on_gs_equals_the_sweep_on_disk(gs_cache, cache, gcs, tmp_path):
  """One pass over a gs:// cache into a gs:// sweep folder: each variant ends
  as in the same sweep on disk; the tables and plots are there."""
  assert sweep_script.main(["--data", str(cache), *LM_ARGS, "--out", str(tmp_path / "disk")]) == 0
  url = gcs("sweep")
  assert sweep_script.main(["--data", gs_cache, *LM_ARGS, "--out", url]) == 0
  copy = download(url, tmp_path / "copy")
  for name in LM_NAMES:
    same_run(tmp_path / "disk" / name, copy / name)
  assert (copy / "results.md").read_text() == (tmp_path / "disk" / "results.md").read_text()
  assert {"sweep.json", "results.csv", "plot_fvu.png"} <= {p.name for p in copy.iterdir()}


def test_an_export_to_a_missing_bucket_is_refused_before_the_model_loads(gcs, lm):
  config = tiny_lm.export_config(lm, model="/nonexistent/model")  # never loaded
  with pytest.raises(ValueError, match=r"^--out gs://no-such-bucket/cache: the bucket "
                                       r"gs://no-such-bucket does not exist"):
    export.export_activations(config, "gs://no-such-bucket/cache", progress=False)
