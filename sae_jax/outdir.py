"""A run's output folder and its guarantees: the lock, strict JSON written
whole or not at all, the config and data checks on resume, metrics.jsonl cut
back to the checkpoint, and the finished marker (summary.json, written last)."""

import fcntl
import hashlib
import json
import math
import os
import pathlib
import shutil
import typing

import jax
import numpy as np
from jax.experimental import multihost_utils

from sae_jax import export as export_lib
from sae_jax import runconfig
from sae_jax import storage
from sae_jax.runconfig import FINGERPRINT
from sae_jax.runconfig import NUMERICS
from sae_jax.runconfig import RunConfig

LOCK = ".lock"
SWEEP_FILE = "sweep.json"  # a pass's record of the runs it trains elsewhere
_ENDS = 1 << 20  # bytes at each end of a .npy that its fingerprint hashes


def strict(value):
  """`value` with every non-finite float replaced by None (strict JSON)."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {k: strict(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [strict(v) for v in value]
  return value


def writes() -> bool:
  """Whether this process writes the run's own files (config.json,
  metrics.jsonl, summary.json, saelens/): process 0 of a multi-host run,
  whose files every host would write the same; orbax writes the
  checkpoints from every host, as it must."""
  return jax.process_index() == 0


def write_text(path: pathlib.PurePath, text: str, then: str) -> None:
  """`text` written whole or not at all (`storage.atomic_write`), by process
  0 only; a failed write (a full disk) leaves nothing behind and is one line
  naming the file and `then`."""
  if not writes():
    return
  try:
    storage.atomic_write(path, lambda f: f.write(text.encode()))
  except OSError as error:
    raise ValueError(f"could not write {path} ({error.strerror or error}); nothing was left "
                     f"half-written: free space and re-run to {then}") from None


def write_json(path: pathlib.PurePath, value) -> None:
  """Strict JSON (NaN and inf as null), written whole or not at all."""
  write_text(path, json.dumps(strict(value), indent=1, allow_nan=False), "continue")


def _read_config(path: pathlib.PurePath) -> dict:
  return export_lib.read_json_object(path, "run config", "it was damaged outside sae_jax; "
                                                         "restore it, or use another --out")


def finished(out) -> bool:
  """Whether the run in `out` has written every output (summary.json last)."""
  out = storage.path(out)
  return all((out / name).is_file() for name in (
      "summary.json", "saelens/cfg.json", "saelens/sae_weights.safetensors"))


class OtherConfig(ValueError):
  """A run folder holds a run saved with another config."""


def compare(out: pathlib.PurePath, config: RunConfig) -> typing.Optional[bool]:
  """Refuses a run saved in `out` with another config (the differences
  listed); writes nothing. Returns None when no config is saved there, else
  whether it has the same `runconfig.END_FIELDS`: whether a finished run
  there would end as it did."""
  path = out / "config.json"
  return _compared(out, _read_config(path), config) if path.exists() else None


def _compared(out: pathlib.PurePath, saved: dict, config: RunConfig) -> bool:
  """`compare` against `saved`, the config.json read from `out`."""
  differences = runconfig.differences(saved, config)
  if differences:
    raise OtherConfig(f"{out} holds a run with another config; refusing to resume it "
                     f"(use another --out):\n  " + "\n  ".join(differences))
  new = config.to_dict()
  return all(saved.get(field) == new[field] for field in runconfig.END_FIELDS)


def saved_a_step(checkpoints: pathlib.PurePath) -> bool:
  """Whether a checkpoint folder holds a step."""
  return checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.glob("*"))


def trained(home: pathlib.PurePath, checkpointed: bool) -> bool:
  """Whether the run in `home` has trained: `checkpointed` (its pass saved a
  step, `saved_a_step`), a metrics line (a run stopped before its first
  checkpoint logs), or a summary."""
  metrics = home / "metrics.jsonl"
  return (checkpointed or (home / "summary.json").exists()
          or (metrics.is_file() and storage.size(metrics) > 0))


def agreed(decide: typing.Callable[[], list], n: int) -> list:
  """`decide()`, n booleans, on process 0 alone (only its files need be on
  its disk), told to every process. A ValueError it raises stops every
  process at once: process 0 with its line, the others saying so (where
  they would otherwise wait for process 0 in a collective)."""
  if jax.process_count() == 1:
    return decide()
  values, refused = [False] * n, None
  if jax.process_index() == 0:
    try:
      values = decide()
    except ValueError as error:
      refused = error
  told = multihost_utils.broadcast_one_to_all(np.array([refused is None, *values]))
  if refused is not None:
    raise refused
  if not told[0]:
    raise ValueError("process 0 refused this command (its error line says why)")
  return [bool(v) for v in told[1:]]


def check_resume(out: pathlib.PurePath, config: RunConfig, *, trained: bool = True) -> bool:
  """`compare`, then records `config` in out/config.json. Returns whether a
  finished run there would end as it did (False for a new run).

  `trained=False` (no checkpoint saved, nothing finished): a config saved
  by a start that failed before training is replaced, not refused, so that
  the corrected command runs."""
  path = out / "config.json"
  new = config.to_dict()
  saved = _read_config(path) if path.exists() else None
  try:
    ends_the_same = None if saved is None else _compared(out, saved, config)
  except OtherConfig:
    if trained:
      raise
    print(f"{out}: its config.json is of a start that never trained (no checkpoint, no metrics "
          f"line); starting over with this command's", flush=True)
    ends_the_same = None
  if ends_the_same is None:
    write_json(path, new)
    return False
  records = {k: v for k, v in saved.items() if k in runconfig.RECORDS}
  if {k: v for k, v in saved.items() if k not in records} != new:
    # Unchanged, nothing is written (so a full disk cannot stop a finished run here).
    write_json(path, new | records)
  return ends_the_same


def data_fingerprint(config: RunConfig) -> typing.Optional[dict]:
  """What identifies the run's data on disk: a cache by its shards' sha256s
  (from the manifest), a .npy by its size, mtime and a sha256 of its first
  and last MiB. None for data made from the config (synthetic, --stream)."""
  if config.data == "synthetic" or config.stream:
    return None
  path = storage.path(config.cache_dir if config.data == "pythia" else config.data)
  if path.is_dir():
    manifest = export_lib.read_manifest(path) or {}
    shards = "".join(shard["sha256"]["acts"] for shard in manifest.get("shards", []))
    return {"kind": "cache", "rows": manifest.get("total_tokens"),
            "sha256": hashlib.sha256(shards.encode()).hexdigest()}
  size = storage.size(path)
  ends = hashlib.sha256()
  with path.open("rb") as f:
    ends.update(f.read(_ENDS))
    f.seek(max(size - _ENDS, 0))
    ends.update(f.read(_ENDS))
  return {"kind": "npy", "bytes": size, "mtime": storage.mtime(path),
          "sha256_ends": ends.hexdigest()}


def numerics(latent_shards: int = 1) -> dict:
  """What a run's numbers depend on beyond its config and data: 64-bit
  mode (JAX_ENABLE_X64 changes the synthetic data and the step's dtypes),
  the device count and the latent shards (the order of the sums over
  devices)."""
  return {"x64": bool(jax.config.jax_enable_x64), "devices": jax.device_count(),
          "latent_shards": latent_shards}


def check_numerics(out: pathlib.PurePath, latent_shards: int = 1) -> None:
  """Before a checkpoint is restored (orbax would cast its arrays, which
  then fail their checksum): refuses to resume a run checkpointed under the
  other 64-bit mode, and says so when it resumes on another device count
  or another split of the latents."""
  path, now = out / "config.json", numerics(latent_shards)
  saved = _read_config(path).get(NUMERICS) if path.exists() else None
  if saved is None:  # a run saved before sae_jax recorded them
    return
  if saved.get("x64") != now["x64"]:
    env = lambda x64: "JAX_ENABLE_X64=1" if x64 else "JAX_ENABLE_X64 unset"
    raise ValueError(f"{out} was checkpointed with {env(saved.get('x64'))}, and this process "
                     f"has {env(now['x64'])}: the data and the step differ between the two, "
                     f"so the run would change; refusing to resume: run it as it began, or "
                     f"use another --out")
  if saved.get("devices") != now["devices"]:
    print(f"resuming on {now['devices']} devices a run checkpointed on {saved.get('devices')}: "
          f"the same batches, but summed over devices in another order, so the weights may "
          f"differ from an uninterrupted run's by float rounding (3.6e-7 measured)", flush=True)
  if saved.get("latent_shards", 1) != now["latent_shards"]:
    print(f"resuming with --latent-shards {now['latent_shards']} a run checkpointed with "
          f"{saved.get('latent_shards', 1)}: its SAE is split anew over the devices; the same "
          f"batches, but its sums over latents are added in another order, so the weights may "
          f"differ from an uninterrupted run's by float rounding", flush=True)


def check_data(out: pathlib.PurePath, config: RunConfig, resuming: bool, *,
               trains: bool = True) -> None:
  """Refuses to resume on data other than the run's; records them, and the
  `numerics`, otherwise. `trains=False`: a finished run that will not train
  again; its data are checked, and nothing is written."""
  path = out / "config.json"
  if not writes() and not path.exists():  # process 0's files need not be on this host
    return
  saved = _read_config(path)
  old, new = saved.get(FINGERPRINT), data_fingerprint(config)
  if resuming and old is not None and new is not None:
    changed = [f"{k} {old.get(k)!r} then, {new.get(k)!r} now"
               for k in ("kind", "rows", "bytes", "sha256", "sha256_ends")
               if old.get(k) != new.get(k)]
    if changed:
      raise ValueError(f"--data {config.data}: the data differ from those this run was "
                       f"checkpointed on ({'; '.join(changed)}); refusing to resume on other "
                       f"data: restore them, or use another --out")
    if old.get("mtime") != new.get("mtime") and trains:
      print(f"--data {config.data} was modified since the run began, but its size and first "
            f"and last MiB are the same: resuming", flush=True)
  if not trains:
    return
  records = {NUMERICS: numerics(config.latent_shards)} | ({} if new is None else {FINGERPRINT: new})
  if any(saved.get(k) != v for k, v in records.items()):
    write_json(path, saved | records)


def check_kind(out: pathlib.PurePath, sweep: bool) -> None:
  """Refuses a sweep in a single run's folder, and a single run in a sweep's
  (and an --out too long, `check_length`)."""
  check_length(out)
  if sweep and (out / "config.json").exists():
    raise ValueError(f"--out {out} holds a single run (its config.json): a sweep needs a "
                     f"folder of its own; use another --out")
  if not sweep and (out / SWEEP_FILE).exists():
    raise ValueError(f"--out {out} holds a sweep (its {SWEEP_FILE}): resume it with "
                     f"experiments/sweep_l.py, or use another --out")


def check_runs(out: pathlib.PurePath, names: list) -> None:
  """Refuses to resume a pass over another list of runs; records the list."""
  path = out / SWEEP_FILE
  if path.exists():
    saved = export_lib.read_json_object(path, "sweep record", "restore it, or use another --out")
    before = saved.get("runs")
    if before != names:
      gone = [n for n in before or [] if n not in names]
      new = [n for n in names if n not in (before or [])]
      what = "; ".join(filter(None, [f"removed {', '.join(gone)}" if gone else "",
                                     f"added {', '.join(new)}" if new else "",
                                     "" if gone or new else "the same runs in another order"]))
      raise ValueError(f"{out} holds a sweep of other runs; refusing to resume it (use another "
                       f"--out, or the same variants): {what}")
    return
  write_json(path, {"runs": names})


# The most a run adds to --out's path (checkpoints/<step>/default/
# ocdbt.process_0/d/<32 hex digits> is 75 bytes; orbax's temporary step
# folders are longer), and Linux's limits on a name and a path.
_ROOM, _NAME_MAX, _PATH_MAX = 160, 255, 4096


def check_length(out: pathlib.PurePath) -> None:
  """Refuses a local --out whose run would write paths too long for Linux,
  before anything is read or written there (a long one failed at the last
  checkpoint)."""
  if storage.is_remote(out):
    return
  out = pathlib.Path(out).absolute()
  for part in out.parts:
    if len(os.fsencode(part)) > _NAME_MAX:
      raise ValueError(f"--out has a folder name of {len(os.fsencode(part))} bytes "
                       f"({part[:24]}...); a name may have at most {_NAME_MAX}")
  if len(os.fsencode(str(out))) + _ROOM > _PATH_MAX:
    raise ValueError(f"--out is {len(os.fsencode(str(out)))} bytes long as an absolute path; "
                     f"the run writes paths up to {_ROOM} bytes longer under it, past the "
                     f"{_PATH_MAX} a path may have: use a shorter --out")


def claim(out) -> typing.Callable[[], None]:
  """Creates `out` and takes its lock; returns what releases it. Locally an
  advisory lock on out/.lock holding our pid, released when the descriptor
  closes or the process dies; on gs:// a `storage.Lease` in out/.lock. Only
  process 0 of a multi-host run takes it. Stale temporary files (a run
  killed while writing) are removed once it is held."""
  if out.exists() and not out.is_dir():
    raise ValueError(f"--out {str(out)!r} is a file, not a directory")
  if storage.is_remote(out):
    if jax.process_index():
      return lambda: None
    storage.check_bucket(out, "--out")
    lease = storage.Lease(out / LOCK)
    try:
      holder = lease.acquire()
    except OSError as error:
      raise ValueError(f"--out {out}: cannot write there ({type(error).__name__}: {error}); "
                       f"check that the bucket exists and that this machine's credentials may "
                       f"write to it") from None
    if holder is not None:
      raise ValueError(f"--out {out} is in use by another run ({holder}): wait for it to end, "
                       f"or use another --out (a lease not renewed for "
                       f"{storage.Lease.STALE:.0f} s is taken over)")
    return lease.release
  try:
    out.mkdir(parents=True, exist_ok=True)
    if jax.process_index():
      return lambda: None
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as error:
    raise ValueError(f"--out {str(out)!r}: cannot write there ({error.strerror})") from None
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
    os.close(fd)
    raise ValueError(f"--out {out} is in use by another run (pid {holder}): wait for it to "
                     f"end, or use another --out") from None
  try:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
  except OSError as error:
    os.close(fd)
    raise ValueError(f"could not write {out / LOCK} ({error.strerror}); free space and "
                     f"re-run") from None
  remove_stale(out)
  return lambda: os.close(fd)


def remove_stale(out) -> None:
  """Removes temporary files a run killed while writing left in `out` (none
  on gs://, where nothing is written under a temporary name). Process 0's
  job: on another process they may be process 0's files, being written."""
  if storage.is_remote(out) or not writes():
    return
  for stale in [*out.glob(".*.tmp-*"), *out.glob(".*.old-*"),
                *out.glob("checkpoints/.*.tmp-*")]:
    shutil.rmtree(stale) if stale.is_dir() else stale.unlink(missing_ok=True)


def resume_metrics(path: pathlib.PurePath, step: int) -> None:
  """Cuts metrics.jsonl back to its lines up to `step` (the checkpoint's).
  A line that does not parse (cut short by a full disk or kill -9, or
  garbage) is dropped, and named with its file and line number."""
  if not path.exists():
    return
  kept, bad = [], []
  text = path.read_bytes().decode(errors="replace")
  lines = text.splitlines()
  for number, line in enumerate(lines, 1):
    try:
      logged = json.loads(line)["step"]
      if isinstance(logged, bool) or not isinstance(logged, int):
        raise ValueError(f"step is {logged!r}")
    except (ValueError, KeyError, TypeError) as error:
      bad.append(f"{path}:{number}: unreadable metrics line dropped ({error})")
      continue
    if logged <= step:
      kept.append(line)
  for line in bad[:3] + ([f"{path}: {len(bad) - 3} more unreadable lines dropped"]
                         if len(bad) > 3 else []):
    print(line, flush=True)
  if not bad and len(kept) == len(lines) and text.endswith("\n") == bool(lines):
    return  # already cut at the step
  write_text(path, "".join(line + "\n" for line in kept), "resume")
