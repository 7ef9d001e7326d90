"""Reading activations for training: a cache directory or a plain .npy file.

No torch here. Batches come shaped for `p_train_step`: [devices, B / devices, D]
float32. A transcoder's rows are (input, target) pairs, [N, 2, D] on disk,
read as rows of 2·D (`transcoder.py`). The order is a pure function of
(seed, step, process), so a run that resumes at step s gets exactly the
batches steps s, s+1, ... would have seen, without reading anything before
them.

How rows are shuffled: the training rows are cut into segments (the cache's
shards; 65536-row pieces of a .npy file). Each epoch the segments are
permuted, grouped `buffer_segments` at a time, and the rows inside each group
permuted: one stream of rows, cut into global batches, that depends on the
seed alone. With several processes, process p takes the p-th of equal slices
of every global batch and reads only those rows, so hosts read disjoint rows
and a run sees the same global batches on any number of hosts. The last
`eval_rows` rows of the data are held out for evaluation and never trained on.
"""

import pathlib
import posixpath
import queue
import threading
import typing

import jax
import numpy as np

from sae_jax import export, storage
from sae_jax import validation

NPY_SEGMENT_ROWS = 65536


def open_npy(path) -> np.ndarray:
  """A .npy file memory-mapped (on gs://, read by byte ranges), or one line
  naming it and what is wrong."""
  try:
    return storage.open_npy(path)
  except (ValueError, OSError, EOFError) as error:
    reason = validation.reason(error)
    raise ValueError(f"{path} is not a readable .npy array ({reason}); it may be truncated, "
                     f"or not a NumPy file") from None


def _to_float32(rows: np.ndarray, dtype: str) -> np.ndarray:
  if dtype == "bfloat16":
    import ml_dtypes
    return rows.view(ml_dtypes.bfloat16).astype(np.float32)
  return rows.astype(np.float32)


_DAMAGED = "the cache is damaged; export it again into an empty directory"


def _shards(path: pathlib.PurePath, manifest: dict) -> list:
  """(file, sha256, rows) of each shard a complete manifest lists, or one
  line saying what is wrong with it: each shard its own file (a shard listed
  twice would be trained on twice, and could be held out as well), and the
  rows adding up to `total_tokens` (checked after the shards' own sizes)."""
  where, remedy = f"activation cache {path}: {export.MANIFEST}", _DAMAGED
  for field, kind in (("dtype", str), ("d_model", int), ("shards", list),
                      ("total_tokens", int)):
    if not isinstance(manifest.get(field), kind):
      raise ValueError(f"{where} has {field} {manifest.get(field)!r}, not a {kind.__name__}: "
                       f"{remedy}")
  files, first = [], {}
  for index, shard in enumerate(manifest["shards"]):
    try:
      name, digest, rows = shard["files"]["acts"], shard["sha256"]["acts"], shard["rows"]
    except (KeyError, TypeError):
      raise ValueError(f"{where}: shard {index} is not an entry with files.acts, sha256.acts "
                       f"and rows ({shard!r}): {remedy}") from None
    if not isinstance(name, str) or not isinstance(rows, int) or rows < 0:
      raise ValueError(f"{where}: shard {index} names {name!r} with {rows!r} rows: {remedy}")
    same = posixpath.normpath(name)
    if same in first:
      raise ValueError(f"{where}: shards {first[same]} and {index} are both {name!r}; each "
                       f"shard must be its own file (its rows would be trained on twice): "
                       f"{remedy}")
    first[same] = index
    files.append((name, digest, rows))
  return files


class Activations:
  """Activation rows on disk, opened (and checked) before any training starts.

  Every file is opened when the data are: its header, shape and byte size
  must agree with the manifest. A cache's sha256s are checked as each shard
  is first read, or all up front with `verify=True`.

  Args:
    path: a cache directory written by `export_activations`, or a .npy file
      [N, D] made by any tool ([N, 2, D]: a transcoder's (input, target) pairs).
    eval_rows: rows at the end held out for evaluation.
    verify: check every shard's sha256 now (a full read of the cache).
  """

  def __init__(self, path, *, eval_rows: int = 0, verify: bool = False):
    self.path = storage.path(path)
    self._verified: set = set()
    self._remote: dict = {}  # file index -> RemoteNpy (its header read once)
    if self.path.is_dir():
      manifest = export.read_manifest(self.path)
      if manifest is None:
        raise ValueError(f"{self.path} has no {export.MANIFEST}: not an activation cache")
      if not manifest.get("complete"):
        raise ValueError(f"{self.path} is an unfinished export (manifest 'complete' is false); "
                         f"run the export again to finish it")
      self.manifest = manifest
      self.dtype, self.d_model = manifest["dtype"], manifest["d_model"]
      self.pairs = manifest.get("target_hook") is not None
      self._files = _shards(self.path, manifest)
      for index, (name, _, rows) in enumerate(self._files):
        self._check_shard(index, name, rows)
      listed = sum(rows for *_, rows in self._files)
      if listed != manifest["total_tokens"]:
        raise ValueError(f"activation cache {self.path}: {export.MANIFEST} says total_tokens "
                         f"{manifest['total_tokens']}, but its shards hold {listed} rows: "
                         f"{_DAMAGED}")
    elif self.path.suffix == ".npy" and self.path.is_file():
      array = open_npy(self.path)
      if (array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[1] != 2)
          or not np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"{self.path} must hold a float array [N, D] (or [N, 2, D]: "
                         f"(input, target) pairs); got {array.dtype} {array.shape}")
      self.manifest = None
      self.dtype = str(array.dtype)
      self.d_model = array.shape[-1]
      self.pairs = array.ndim == 3
      self._files = [(self.path.name, None, array.shape[0])]
    else:
      raise ValueError(f"activations must be a cache directory or a .npy file; got {str(path)!r}")
    self.width = 2 * self.d_model if self.pairs else self.d_model  # a row's columns
    self.n_rows = sum(rows for _, _, rows in self._files)
    if not isinstance(eval_rows, int) or not 0 <= eval_rows < self.n_rows:
      raise ValueError(f"eval_rows must be an integer in [0, {self.n_rows}) (rows in "
                       f"{self.path}); got {eval_rows!r}")
    self.eval_rows = eval_rows
    self.segments = self._cut(self.n_rows - eval_rows)
    if verify:
      for index in range(len(self._files)):
        self._verify(index)

  def _check_shard(self, index: int, name: str, rows: int) -> None:
    """Shard `index` exists and holds the [rows, D] (pairs: [rows, 2, D]) the
    manifest says, in full."""
    where = f"activation cache {self.path}: shard {index} ({name})"
    path = self.path / name
    if not path.is_file():
      raise ValueError(f"{where} is missing")
    array = open_npy(path)
    want = (rows, 2, self.d_model) if self.pairs else (rows, self.d_model)
    if array.shape != want:
      raise ValueError(f"{where} holds shape {array.shape}; the manifest says {want}")
    if array.offset + array.nbytes != storage.size(path):
      raise ValueError(f"{where} is {storage.size(path)} bytes; its header says "
                       f"{array.offset + array.nbytes}")

  def _verify(self, file_index: int) -> None:
    """Shard `file_index`'s sha256 against the manifest (once)."""
    name, digest, _ = self._files[file_index]
    if digest is None or file_index in self._verified:
      return
    if export.sha256(self.path / name) != digest:
      raise ValueError(f"activation cache {self.path}: shard {file_index} ({name}) is "
                       f"corrupted (sha256 does not match the manifest)")
    self._verified.add(file_index)

  def _cut(self, train_rows: int) -> list:
    """(file index, start, stop) pieces covering the first `train_rows` rows."""
    segments, first = [], 0
    piece = NPY_SEGMENT_ROWS if self.manifest is None else None
    for index, (_, _, rows) in enumerate(self._files):
      stop_in_file = min(rows, train_rows - first)
      step = piece or rows
      for start in range(0, max(stop_in_file, 0), step):
        segments.append((index, start, min(start + step, stop_in_file)))
      first += rows
    return segments

  def read(self, file_index: int, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of one file as float32 [n, width], checking its
    sha256 the first time."""
    return self._float32_rows(self._open(file_index)[start:stop])

  def _float32_rows(self, stored) -> np.ndarray:
    rows = _to_float32(np.asarray(stored), self.dtype)
    return rows.reshape(len(rows), self.width)

  def _open(self, file_index: int) -> np.ndarray:
    name, _, _ = self._files[file_index]
    path = self.path / name if self.manifest is not None else self.path
    self._verify(file_index)
    if storage.is_remote(path):
      return self._remote.setdefault(file_index, storage.RemoteNpy(path))
    return np.load(path, mmap_mode="r")

  def _gather(self, segments: list, index_N: np.ndarray) -> np.ndarray:
    """Rows `index_N` of the segments' rows laid end to end, reading only those."""
    out = np.empty((len(index_N), self.width), np.float32)
    first = 0
    for file_index, start, stop in segments:
      here_N = (index_N >= first) & (index_N < first + stop - start)
      if here_N.any():
        rows = index_N[here_N] - first + start
        order = np.argsort(rows)  # read in storage order
        taken = np.empty_like(out[:len(rows)])
        taken[order] = self._float32_rows(self._open(file_index)[rows[order]])
        out[here_N] = taken
      first += stop - start
    return out

  def _held_out(self, read) -> list:
    """read(file index, start, stop) over the held-out rows, in storage order."""
    parts, first = [], 0
    begin = self.n_rows - self.eval_rows
    for index, (_, _, rows) in enumerate(self._files):
      lo, hi = max(begin - first, 0), rows
      if lo < hi:
        parts.append(read(index, lo, hi))
      first += rows
    return parts

  def eval_batch(self) -> np.ndarray:
    """The held-out rows [eval_rows, width], float32, in storage order."""
    parts = self._held_out(self.read)
    return np.concatenate(parts) if parts else np.zeros((0, self.width), np.float32)

  def eval_tokens(self) -> typing.Optional[np.ndarray]:
    """The token ids [eval_rows] of the held-out rows (a cache's
    tokens-*.npy, checked against its sha256), or None for a .npy file."""
    return self._eval_column("tokens")

  def eval_positions(self) -> typing.Optional[np.ndarray]:
    """The held-out rows' positions in their contexts [eval_rows] (a
    cache's positions-*.npy, checked), or None for a .npy file."""
    return self._eval_column("positions")

  def _eval_column(self, kind: str) -> typing.Optional[np.ndarray]:
    if self.manifest is None:
      return None

    def read(index, start, stop):
      shard = self.manifest["shards"][index]
      path = self.path / shard["files"][kind]
      if export.sha256(path) != shard["sha256"][kind]:
        raise ValueError(f"activation cache {self.path}: {path.name} is corrupted (sha256 does "
                         f"not match the manifest)")
      return np.asarray(open_npy(path)[start:stop])

    parts = self._held_out(read)
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)

  def sample(self, n: int, seed: int = 0) -> np.ndarray:
    """n training rows from the start of a seeded shuffle (for initialisation),
    the same on every process."""
    return next(self.batches(n, 1, seed=seed, process_index=0, process_count=1, prefetch=0))[0]

  def batches(self, batch_size: int, n_devices: typing.Optional[int] = None, *,
              seed: int = 0, start_step: int = 0, buffer_segments: int = 4,
              process_index: typing.Optional[int] = None,
              process_count: typing.Optional[int] = None,
              prefetch: int = 2) -> typing.Iterator[np.ndarray]:
    """Endless training batches [n_devices, batch_size / (processes·n_devices), D]:
    this process's slice of each global batch, which are the same for any
    number of processes.

    Args:
      batch_size: the global batch, over all processes.
      n_devices: local devices (default: jax.local_device_count()).
      seed: the shuffle's seed.
      start_step: the first batch is the one for this step.
      buffer_segments: segments whose rows are shuffled together.
      process_index, process_count: this host and the number of hosts
        (default: from jax).
      prefetch: batches prepared ahead in a background thread (0: none).
    """
    n_devices = n_devices or jax.local_device_count()
    p = jax.process_index() if process_index is None else process_index
    n_proc = jax.process_count() if process_count is None else process_count
    if batch_size % (n_proc * n_devices):
      raise ValueError(f"batch_size {batch_size} must be divisible by {n_proc} processes x "
                       f"{n_devices} devices")
    if not 0 <= p < n_proc:
      raise ValueError(f"process_index must be in [0, {n_proc}); got {p}")
    local = batch_size // n_proc
    rows = self._rows(self.segments, seed, start_step * batch_size, buffer_segments,
                      (p, n_proc, local))
    batches = self._batch(rows, local, n_devices)
    return prefetched(batches, prefetch) if prefetch else batches

  # The 0 in the shuffles' seeds was once the process index (each host had a
  # stream of its own); it stays, so that one-process runs keep their rows.
  def _plan(self, segments, seed, epoch, buffer_segments):
    order = np.random.default_rng([seed, 0, epoch]).permutation(len(segments))
    return [[segments[i] for i in order[g:g + buffer_segments]]
            for g in range(0, len(order), buffer_segments)]

  def _rows(self, segments, seed, skip, buffer_segments, part):
    """The endless shuffled row stream, from row `skip` on, in chunks; of it,
    part = (p, processes, rows) keeps the p-th `rows` of every processes·rows."""
    p, n_proc, local = part
    epoch_rows = sum(stop - start for _, start, stop in segments)
    epoch, offset = divmod(skip, epoch_rows)
    position = skip - offset  # the stream position of the group's first row
    while True:
      for g, group in enumerate(self._plan(segments, seed, epoch, buffer_segments)):
        size = sum(stop - start for _, start, stop in group)
        if offset >= size:
          offset -= size
          position += size
          continue
        perm = np.random.default_rng([seed, 0, epoch, g]).permutation(size)[offset:]
        if n_proc == 1:
          yield np.concatenate([self.read(*segment) for segment in group])[perm]
        else:
          mine = (position + np.arange(offset, size)) // local % n_proc == p
          yield self._gather(group, perm[mine])
        position += size
        offset = 0
      epoch += 1

  def _batch(self, chunks, local, n_devices):
    """Batches of `local` rows; each row is copied once (a chunk can be a whole
    buffer of shards, so it is sliced, never re-joined)."""
    parts, have = [], 0
    for chunk in chunks:
      start = 0
      while start < len(chunk):
        take = min(local - have, len(chunk) - start)
        parts.append(chunk[start:start + take])
        have, start = have + take, start + take
        if have == local:
          flat = np.concatenate(parts) if len(parts) > 1 else parts[0]
          yield flat.reshape(n_devices, local // n_devices, self.width)
          parts, have = [], 0


def prefetched(iterator, size: int):
  """`iterator` run ahead by a daemon thread, `size` items at most; errors are
  re-raised in the consumer. Closing the generator stops the thread and waits
  for it, so no work is left running behind it."""
  items: queue.Queue = queue.Queue(maxsize=size)
  stop = threading.Event()
  done = object()

  def put(item) -> bool:
    while not stop.is_set():
      try:
        items.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def work():
    try:
      for item in iterator:
        if not put(item):
          return
    except BaseException as error:  # handed to the consumer
      put(error)
    else:
      put(done)

  thread = threading.Thread(target=work, daemon=True)
  thread.start()
  try:
    while True:
      item = items.get()
      if item is done:
        return
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()
    thread.join()
