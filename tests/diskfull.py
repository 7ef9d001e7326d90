"""Runs experiments/train.py on a disk that fills up: a real tmpfs of a few
MiB, mounted in a user and mount namespace (`unshare -rm`), so no root is
needed and nothing outside the namespace sees it.

    unshare -rm python -m tests.diskfull DISK REPORT -- TRAIN_ARGS...

TRAIN_ARGS must not name --out: the run goes to DISK/run. Three runs:
  1. the disk is filled before the run starts;
  2. with the space freed, a run that the disk fills up after step 20;
  3. with the space freed again, the re-run that finishes it;
  4. summary.json removed (a run killed as it finished) and the disk filled
     once more: the re-run re-exports saelens/, which does not fit.
REPORT gets, for each, the exit status, stderr and the files left in the
run's folder; and the finished run's summary, metrics and SAELens weights.
"""

import json
import os
import pathlib
import subprocess
import sys
import time

from tests import scripts

FILL_AT_STEP = 20


def fill(disk: pathlib.Path) -> None:
  """Writes a filler file until the disk is full."""
  try:
    with open(disk / "filler", "ab") as f:
      while True:
        f.write(b"\0" * 65536)
        f.flush()
  except OSError:  # full (the file may not even open)
    pass


def files(run: pathlib.Path) -> list:
  return sorted(str(p.relative_to(run)) for p in run.rglob("*")) if run.exists() else []


def main() -> int:
  disk, report_path = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
  args = sys.argv[sys.argv.index("--") + 1:]
  disk.mkdir(parents=True, exist_ok=True)
  subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], check=True)
  run = disk / "run"
  command = [sys.executable, str(scripts.EXPERIMENTS / "train.py"), *args, "--out", str(run)]
  report = {}

  def record(name, process):
    stdout, stderr = process.communicate(timeout=300)
    report[name] = {"rc": process.returncode, "stderr": stderr, "stdout": stdout,
                    "files": files(run)}

  popen = lambda: subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
  fill(disk)
  record("full_before", popen())
  (disk / "filler").unlink()
  report["free_before_mid_run"] = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize

  process = popen()
  metrics, deadline = run / "metrics.jsonl", time.time() + 120
  while time.time() < deadline and process.poll() is None:
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    if len(lines) >= FILL_AT_STEP:
      fill(disk)
      break
    time.sleep(0.02)
  record("filled_mid_run", process)
  (disk / "filler").unlink()

  record("resumed", popen())
  report["finished"] = {
      "summary": json.loads((run / "summary.json").read_text()),
      "metrics": (run / "metrics.jsonl").read_text(),
      "weights": (run / "saelens" / "sae_weights.safetensors").read_bytes().hex()}

  (run / "summary.json").unlink()
  fill(disk)
  record("full_rerun", popen())
  report["full_rerun"]["weights"] = (
      run / "saelens" / "sae_weights.safetensors").read_bytes().hex()
  report_path.write_text(json.dumps(report))
  return 0


if __name__ == "__main__":
  sys.exit(main())
