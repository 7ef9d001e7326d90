"""The loader: deterministic shuffles, exact resume, disjoint hosts, held-out
rows, and clear errors for damaged caches."""

import shutil

import numpy as np
import pytest

from sae_jax import data
from sae_jax import export

B = 64


def stored_rows(cache):
  manifest = export.read_manifest(cache)
  return np.concatenate([np.load(cache / s["files"]["acts"]) for s in manifest["shards"]])


def take(iterator, n):
  return np.stack([next(iterator) for _ in range(n)])


def as_set(rows):
  return {r.tobytes() for r in np.asarray(rows, np.float32).reshape(-1, rows.shape[-1])}


def test_an_epoch_is_a_shuffle_of_the_training_rows(cache):
  acts = data.Activations(cache, eval_rows=100)
  batches = take(acts.batches(B, 4, seed=3), 10)
  assert batches.shape == (10, 4, B // 4, 16) and batches.dtype == np.float32
  rows = batches.reshape(-1, 16)
  train = stored_rows(cache)[:600]
  epoch = rows[:600]
  assert len(as_set(epoch)) == 600 and as_set(epoch) == as_set(train)
  assert not np.array_equal(epoch, train)  # shuffled
  # Shuffled across shards: the first batch mixes rows of several shards.
  shard_of = {r.tobytes(): i // 128 for i, r in enumerate(train)}
  assert len({shard_of[r.tobytes()] for r in rows[:B]}) > 1
  np.testing.assert_array_equal(take(acts.batches(B, 4, seed=3), 10), batches)
  assert not np.array_equal(take(acts.batches(B, 4, seed=4), 10), batches)


@pytest.mark.parametrize("start", [3, 9])  # step 9 straddles the first epoch's end
def test_resume_gives_the_batches_those_steps_saw(cache, start):
  acts = data.Activations(cache, eval_rows=100)
  whole = take(acts.batches(B, 2, seed=1), start + 4)
  np.testing.assert_array_equal(take(acts.batches(B, 2, seed=1, start_step=start), 4),
                                whole[start:])


def test_hosts_read_disjoint_rows(cache):
  acts = data.Activations(cache, eval_rows=100)
  per_host = [take(acts.batches(B, 2, seed=0, process_index=p, process_count=2, prefetch=0), 11)
              for p in range(2)]
  assert per_host[0].shape == (11, 2, B // 4, 16)  # B/2 rows per host
  seen = [as_set(rows) for rows in per_host]
  assert not seen[0] & seen[1]
  train = as_set(stored_rows(cache)[:600])
  assert seen[0] | seen[1] <= train
  # Host 0 holds segments 0, 2, 4 (128 + 128 + 88 rows): its first epoch is exactly those.
  first_epoch = per_host[0].reshape(-1, 16)[:344]
  assert as_set(first_epoch) == as_set(stored_rows(cache)[np.r_[0:128, 256:384, 512:600]])


def test_eval_rows_are_held_out(cache):
  acts = data.Activations(cache, eval_rows=100)
  held_out = acts.eval_batch()
  np.testing.assert_array_equal(held_out, stored_rows(cache)[600:])
  trained = as_set(take(acts.batches(B, 1, seed=0), 30))
  assert not trained & as_set(held_out)
  sample = acts.sample(32, seed=5)
  assert sample.shape == (32, 16) and as_set(sample) <= trained


def test_npy_file(tmp_path, monkeypatch):
  monkeypatch.setattr(data, "NPY_SEGMENT_ROWS", 64)
  rows = np.random.default_rng(0).standard_normal((300, 8)).astype(np.float16)
  np.save(tmp_path / "acts.npy", rows)
  acts = data.Activations(tmp_path / "acts.npy", eval_rows=44)
  assert (acts.n_rows, acts.d_model, len(acts.segments)) == (300, 8, 4)
  epoch = take(acts.batches(32, 4, seed=0), 8).reshape(-1, 8)
  assert as_set(epoch) == as_set(rows[:256])
  np.testing.assert_array_equal(acts.eval_batch(), rows[256:].astype(np.float32))


def test_damaged_caches_fail_clearly(cache, tmp_path):
  broken = tmp_path / "broken"
  shutil.copytree(cache, broken)
  path = broken / "acts-00001.npy"
  raw = bytearray(path.read_bytes())
  raw[-1] ^= 0xFF
  path.write_bytes(bytes(raw))
  acts = data.Activations(broken)  # checked lazily, on first read
  with pytest.raises(ValueError, match=r"shard 1 \(acts-00001.npy\) is corrupted"):
    take(acts.batches(B, 1, seed=0, buffer_segments=6), 1)
  (broken / "acts-00002.npy").unlink()
  with pytest.raises(ValueError, match=r"shard 2 \(acts-00002.npy\) is missing"):
    data.Activations(broken)


def test_bad_arguments(cache, tmp_path):
  with pytest.raises(ValueError, match=r"eval_rows must be an integer in \[0, 700\)"):
    data.Activations(cache, eval_rows=700)
  with pytest.raises(ValueError, match=r"batch_size 30 must be divisible by 1 processes x 4"):
    data.Activations(cache).batches(30, 4)
  with pytest.raises(ValueError, match=r"must be a cache directory or a .npy file"):
    data.Activations(tmp_path / "nothing")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match=r"has no manifest.json"):
    data.Activations(tmp_path / "empty")
  unfinished = tmp_path / "unfinished"
  shutil.copytree(cache, unfinished)
  manifest = export.read_manifest(unfinished)
  export.write_manifest(unfinished, dict(manifest, complete=False))
  with pytest.raises(ValueError, match=r"unfinished export"):
    data.Activations(unfinished)


def test_every_shard_is_checked_when_the_cache_opens(cache, tmp_path):
  """Shape and size at once (a truncated last shard is not found only after
  training), and every sha256 up front with verify=True."""
  broken = tmp_path / "broken"
  shutil.copytree(cache, broken)
  last = broken / "acts-00005.npy"
  last.write_bytes(last.read_bytes()[:-64])
  with pytest.raises(ValueError, match=r"acts-00005.npy is not a readable .npy array"):
    data.Activations(broken)
  shutil.copy(cache / "acts-00005.npy", last)
  manifest = export.read_manifest(broken)
  shards = [dict(s) for s in manifest["shards"]]
  shards[2]["rows"] += 1
  export.write_manifest(broken, dict(manifest, shards=shards))
  with pytest.raises(ValueError, match=r"shard 2 \(acts-00002.npy\) holds shape \(128, 16\); "
                                       r"the manifest says \(129, 16\)"):
    data.Activations(broken)
  export.write_manifest(broken, manifest)
  raw = bytearray(last.read_bytes())
  raw[-1] ^= 0xFF
  last.write_bytes(bytes(raw))
  data.Activations(broken)  # lazily: found on the shard's first read
  with pytest.raises(ValueError, match=r"shard 5 \(acts-00005.npy\) is corrupted"):
    data.Activations(broken, verify=True)
