"""Where a run's files live: a local directory, or a gs:// bucket.

A local path stays a `pathlib.Path`. A gs:// URL becomes an `etils.epath.Path`
(gcsfs underneath), the path type orbax uses; orbax's tensorstore writes the
checkpoint arrays with its own GCS driver. Both read the emulator variables,
STORAGE_EMULATOR_HOST (gcsfs) and TENSORSTORE_GCS_HTTP_URL (tensorstore).

What object storage changes, and what replaces the local guarantees:
- One object is written whole or not at all: a GCS upload becomes visible
  only when complete, and replaces the old object in one step. So
  `atomic_write` uploads straight to the final name (GCS has no atomic
  rename; its "rename" is a copy and a delete), and a failed upload leaves
  the old object as it was.
- A folder cannot be swapped in one step: `saelens/` is written file by
  file, each whole; `summary.json`, written after it, is the commit marker
  of a finished run (a run without it exports again). Checkpoints are
  orbax's, which marks a finished step on GCS with its own commit file.
- Objects cannot be appended to: `appender` keeps metrics.jsonl's text and
  uploads it whole at each checkpoint, at most every FLUSH_SECONDS as lines
  come, and on close.
- No memory maps: `open_npy` reads a .npy's rows by byte ranges.
- No flock: the run's lock is a lease object (see `Lease`).
"""

import io
import json
import logging
import os
import pathlib
import shutil
import socket
import threading
import time
import typing

import numpy as np

REMOTE = "gs://"
FLUSH_SECONDS = 10.0


def is_remote(path) -> bool:
  return str(path).startswith(REMOTE)


def path(value):
  """A pathlib.Path, or an epath.Path for a gs:// URL."""
  if not is_remote(value):
    return pathlib.Path(value)
  _configure()
  from etils import epath
  return epath.Path(str(value))


_configured = False


def _configure() -> None:
  """Once: gcsfs lists afresh every time (other hosts and tensorstore write
  the same bucket, so a cached listing could be stale), and its notice that
  it cannot tell the bucket's type (no credentials for that API) is not
  printed on every file."""
  global _configured
  if _configured:
    return
  import fsspec
  for protocol in ("gs", "gcs"):
    fsspec.config.conf.setdefault(protocol, {})["use_listings_cache"] = False
  logging.getLogger("gcsfs").setLevel(logging.CRITICAL)  # its retries log tracebacks
  _configured = True


def _fs(value) -> tuple:
  """(fsspec filesystem, path without the scheme) of a gs:// URL."""
  _configure()
  import fsspec
  return fsspec.core.url_to_fs(str(value))


def check_bucket(url, flag: str) -> None:
  """One line, before any work, when a gs:// URL's bucket cannot be seen."""
  if not is_remote(url):
    return
  fs, name = _fs(url)
  bucket = name.split("/", 1)[0]
  try:
    found = fs.exists(bucket)
  except OSError as error:
    raise ValueError(f"{flag} {url}: cannot reach its bucket ({type(error).__name__}: "
                     f"{error})") from None
  if not found:
    raise ValueError(f"{flag} {url}: the bucket gs://{bucket} does not exist, or this "
                     f"machine's credentials cannot see it")


def atomic_write(target, write) -> None:
  """write(file) to `target` whole or not at all.

  Local: to a temporary name, fsync'ed, then renamed; a failed write leaves
  nothing behind. gs://: into memory, then one upload (atomic on GCS).
  """
  if is_remote(target):
    buffer = io.BytesIO()
    write(buffer)
    fs, name = _fs(target)
    fs.pipe_file(name, buffer.getvalue())
    return
  target = pathlib.Path(target)
  tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
  try:
    with open(tmp, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, target)
  finally:  # a failed write (a full disk) leaves nothing behind
    tmp.unlink(missing_ok=True)


def write_folder(out: pathlib.Path, fill: typing.Callable[[pathlib.Path], None]) -> None:
  """fill(folder) writes a local folder under a temporary name beside `out`,
  which then replaces `out` whole; a failed fill (a full disk) leaves `out`
  as it was and no partial folder behind."""
  tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  _remove_orphans(out)
  try:
    tmp.mkdir(parents=True)
    fill(tmp)
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
      os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _remove_orphans(out: pathlib.Path) -> None:
  """Removes the temporary folders beside `out` of a `write_folder` whose
  process is gone (killed with -9 while it wrote; a browser's can be
  hundreds of MiB)."""
  if not out.parent.is_dir():
    return
  for kind in ("tmp", "old"):
    for orphan in out.parent.glob(f".{out.name}.{kind}-*"):
      pid = orphan.name.rsplit("-", 1)[-1]
      if pid.isdigit() and not _alive(int(pid)):
        shutil.rmtree(orphan, ignore_errors=True)


def size(value) -> int:
  if is_remote(value):
    fs, name = _fs(value)
    return int(fs.info(name)["size"])
  return pathlib.Path(value).stat().st_size


def mtime(value) -> float:
  if is_remote(value):
    fs, name = _fs(value)
    return fs.info(name)["mtime"].timestamp()
  return pathlib.Path(value).stat().st_mtime


def files(root) -> list:
  """The files under `root`, as sorted paths relative to it."""
  if is_remote(root):
    fs, name = _fs(root)
    prefix = name.rstrip("/") + "/"
    return sorted(found[len(prefix):] for found in fs.find(name) if found.startswith(prefix))
  root = pathlib.Path(root)
  return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def move(source, target) -> None:
  """Moves a file or folder (on gs://: a copy, then a delete)."""
  if is_remote(source):
    fs, name = _fs(source)
    _, to = _fs(target)
    fs.copy(name, to, recursive=fs.isdir(name))
    fs.rm(name, recursive=True)
  else:
    shutil.move(str(source), str(target))


def remove(value) -> None:
  """Removes a file or folder, if it is there."""
  if is_remote(value):
    fs, name = _fs(value)
    if fs.exists(name):
      fs.rm(name, recursive=True)
  elif pathlib.Path(value).is_dir():
    shutil.rmtree(value)
  else:
    pathlib.Path(value).unlink(missing_ok=True)


def open_npy(value) -> typing.Union[np.ndarray, "RemoteNpy"]:
  """A .npy memory-mapped, or on gs:// read by byte ranges."""
  if is_remote(value):
    return RemoteNpy(value)
  return np.load(value, mmap_mode="r", allow_pickle=False)


class RemoteNpy:
  """A C-ordered .npy on object storage: its header is read once, then rows
  are fetched by byte range (`[start:stop]`, or sorted row indices, fetched
  as the one range that covers them)."""

  def __init__(self, url):
    self.url = str(url)
    self._fs, self._name = _fs(url)
    with self._fs.open(self._name, "rb") as f:
      version = np.lib.format.read_magic(f)
      read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                     (2, 0): np.lib.format.read_array_header_2_0}.get(version)
      if read_header is None:
        raise ValueError(f"unsupported .npy format version {version}")
      self.shape, fortran, self.dtype = read_header(f)
      self.offset = f.tell()
    if fortran:
      raise ValueError("a Fortran-ordered array; save it C-ordered")
    self.ndim = len(self.shape)
    self._row = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
    self.nbytes = self._row * (self.shape[0] if self.shape else 1)

  def __len__(self) -> int:
    return self.shape[0]

  def _rows(self, start: int, stop: int) -> np.ndarray:
    if stop <= start:
      return np.empty((0, *self.shape[1:]), self.dtype)
    data = self._fs.cat_file(self._name, self.offset + start * self._row,
                             self.offset + stop * self._row)
    return np.frombuffer(data, self.dtype).reshape(stop - start, *self.shape[1:])

  def __getitem__(self, key) -> np.ndarray:
    if isinstance(key, slice):
      start, stop, step = key.indices(self.shape[0])
      return self._rows(start, stop)[::step]
    index = np.asarray(key)
    if index.ndim != 1 or not np.issubdtype(index.dtype, np.integer):
      raise TypeError(f"RemoteNpy takes a slice or a 1-d array of row indices; got {key!r}")
    if not len(index):
      return self._rows(0, 0)
    index = np.where(index < 0, index + self.shape[0], index)
    first = int(index.min())
    return self._rows(first, int(index.max()) + 1)[index - first]


class _RemoteAppender:
  """Appends to an object by re-uploading its whole text (GCS objects cannot
  be appended to); what was appended is uploaded by `flush`, or by `write`
  when FLUSH_SECONDS have passed since the last upload."""

  def __init__(self, url):
    self._fs, self._name = _fs(url)
    self._data = bytearray(self._fs.cat_file(self._name) if self._fs.exists(self._name) else b"")
    self._dirty, self._last = False, time.monotonic()

  def write(self, data: bytes) -> int:
    self._data += data
    self._dirty = True
    if time.monotonic() - self._last >= FLUSH_SECONDS:
      self.flush()
    return len(data)

  def flush(self) -> None:
    if self._dirty:
      self._fs.pipe_file(self._name, bytes(self._data))
      self._dirty, self._last = False, time.monotonic()

  def close(self) -> None:
    self.flush()

  def __enter__(self):
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def appender(value):
  """A file to append bytes to (write, flush, close): unbuffered locally
  (each write reaches the file), whole re-uploads on gs://."""
  if is_remote(value):
    return _RemoteAppender(value)
  return open(value, "ab", buffering=0)


class Lease:
  """The lock of a folder on object storage, which has no flock: an object
  naming its holder (host, pid) and when it last renewed, renewed every
  RENEW seconds by a thread and deleted on release.

  A lease is taken when there is none (an upload that fails if the object
  exists, so of two runs one wins), or when the one there is stale: its
  holder was on this host and its pid is gone, or it was not renewed for
  STALE seconds (a run killed elsewhere). Two runs taking over the same
  stale lease at the same moment could both succeed; that race is not closed.
  """

  RENEW = 20.0
  STALE = 90.0

  def __init__(self, url):
    self.url = str(url)
    self._fs, self._name = _fs(url)
    self._stop = threading.Event()
    self._thread: typing.Optional[threading.Thread] = None

  def _record(self) -> bytes:
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                       "time": time.time()}).encode()

  def holder(self) -> typing.Optional[str]:
    """Who holds a live lease, in words, or None if there is none (or a stale one)."""
    try:
      held = json.loads(self._fs.cat_file(self._name))
      host, pid, renewed = held["host"], int(held["pid"]), float(held["time"])
    except FileNotFoundError:
      return None
    except (ValueError, KeyError, TypeError):
      return None  # unreadable: not a lease of ours
    if host == socket.gethostname() and not _alive(pid):
      return None
    age = time.time() - renewed
    if age > self.STALE:
      return None
    return f"pid {pid} on {host}, renewed {age:.0f} s ago"

  def acquire(self) -> typing.Optional[str]:
    """Takes the lease; returns None, or who holds it."""
    held = self.holder()
    if held is not None:
      return held
    if self._fs.exists(self._name):
      self._fs.rm(self._name)  # stale
    try:
      self._fs.pipe_file(self._name, self._record(), mode="create")
    except FileExistsError:
      return self.holder() or "another run, which took it just now"
    self._thread = threading.Thread(target=self._renew, daemon=True)
    self._thread.start()
    return None

  def _renew(self) -> None:
    while not self._stop.wait(self.RENEW):
      try:
        self._fs.pipe_file(self._name, self._record())
      except Exception:  # noqa: BLE001  (a blip; the next renewal may succeed)
        pass

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      try:
        self._fs.rm(self._name)
      except FileNotFoundError:
        pass


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True
