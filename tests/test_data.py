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


@pytest.mark.parametrize("start", [0, 5])
def test_hosts_read_disjoint_slices_of_the_same_global_batches(cache, start):
  """Two hosts of 2 devices: side by side, their batches are those of one
  host with 4 devices (from any step); each reads only its own rows, and
  within an epoch no row is read by both."""
  acts = data.Activations(cache, eval_rows=100)
  train = stored_rows(cache)[:600]
  read = [[], []]  # the rows each host read, as indices into the training rows
  gather = acts._gather

  def recording(host):
    def _gather(segments, index_N):
      first = 0
      for file_index, begin, stop in segments:  # a cache's shards hold 128 rows
        here = index_N[(index_N >= first) & (index_N < first + stop - begin)]
        read[host].extend((file_index * 128 + begin + here - first).tolist())
        first += stop - begin
      return gather(segments, index_N)
    return _gather

  per_host = []
  for host in range(2):
    acts._gather = recording(host)
    per_host.append(take(acts.batches(B, 2, seed=0, process_index=host, process_count=2,
                                      start_step=start, prefetch=0), 11))
  acts._gather = gather
  assert per_host[0].shape == (11, 2, B // 4, 16)  # B/2 rows per host
  one_host = take(acts.batches(B, 4, seed=0, start_step=start), 11)
  np.testing.assert_array_equal(np.concatenate(per_host, axis=1), one_host)
  # Each host read what it trained on (and the rest of the shuffle buffer's
  # share it is in); the first epoch's 600 rows, split between them.
  for host in range(2):
    assert as_set(per_host[host]) <= as_set(train[read[host]])
  if start == 0:
    share = [int(np.sum(np.arange(600) // (B // 2) % 2 == host)) for host in range(2)]
    first_epoch = [set(read[host][:share[host]]) for host in range(2)]
    assert [len(rows) for rows in first_epoch] == share and sum(share) == 600
    assert first_epoch[0] | first_epoch[1] == set(range(600))


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


def test_a_manifest_that_repeats_a_shard_or_miscounts_its_rows_is_refused(cache, tmp_path):
  """A shard listed twice (or two entries naming one file) would be trained
  on twice and held out too; total_tokens must be the shards' rows; fields
  of the wrong type are named. Each in one line, when the cache opens."""
  broken = tmp_path / "broken"
  shutil.copytree(cache, broken)
  manifest = export.read_manifest(broken)
  shards = manifest["shards"]
  renamed = dict(shards[3], files={"acts": "./acts-00000.npy"})
  cases = [
      ({"shards": [*shards, shards[0]], "total_tokens": 828},
       r"shards 0 and 6 are both 'acts-00000.npy'; each shard must be its own file"),
      ({"shards": [*shards[:3], renamed, *shards[4:]]},
       r"shards 0 and 3 are both './acts-00000.npy'"),
      ({"total_tokens": 20_000}, r"says total_tokens 20000, but its shards hold 700 rows"),
      ({"dtype": None}, r"has dtype None, not a str"),
      ({"shards": None}, r"has shards None, not a list"),
      ({"shards": [*shards[:5], {"rows": 60}]}, r"shard 5 is not an entry with files.acts"),
  ]
  for change, error in cases:
    export.write_manifest(broken, dict(manifest, **change))
    with pytest.raises(ValueError, match=error) as raised:
      data.Activations(broken, eval_rows=100)
    assert "\n" not in str(raised.value) and "export it again" in str(raised.value)
  export.write_manifest(broken, manifest)
  assert data.Activations(broken, eval_rows=100).n_rows == 700
