"""Watches on the other processes of a multi-host run.

While the processes join, one waiting for the others says so at once and
every `SAY_EVERY` seconds, and gives up with one line after --join-timeout
(JAX's own timeout, set later, would abort it with a C++ stack trace).

Once joined, each process beats
in JAX's coordination service every second, and one whose beat stops for
`timeout` seconds is taken for dead. The survivors then exit at once with
one line, where they would otherwise wait in a collective, or in a barrier
until JAX's own heartbeat timeout aborts them with a C++ stack trace. JAX's
is set to four times ours, so ours comes first: its client beats every half
of its timeout, so it can take a process for dead half its timeout after the
process died.
"""

import os
import sys
import threading
import time

from sae_jax import validation

BEAT_SECONDS = 1.0
SAY_EVERY = 30.0
_DONE = "done"


def _key(process: int) -> str:
  return f"sae_jax/beat/{process}"


def joining(coordinator: str, process_id: int, n_processes: int, timeout: float):
  """Starts saying that this process waits for the others (a daemon
  thread); exits with one line if they have not all joined after `timeout`
  seconds. Returns `joined()`, to call once `jax.distributed.initialize`
  has returned."""
  joined = threading.Event()

  def run():
    began = time.monotonic()
    while True:
      waited = time.monotonic() - began
      if waited >= timeout:
        _exit(f"error: process {process_id} of {n_processes} waited {timeout:g} s "
              f"(--join-timeout) at {coordinator} for the others to join; start every process "
              f"with the same --coordinator and --num-processes, and a --process-id each")
      print(f"process {process_id} of {n_processes}: waiting at {coordinator} for the other "
            f"processes to join ({waited:.0f} of {timeout:g} s, --join-timeout)", flush=True)
      if joined.wait(min(SAY_EVERY, timeout - waited)):
        return

  thread = threading.Thread(target=run, name="sae_jax-join", daemon=True)
  thread.start()
  return joined.set


def watch(client, process_id: int, n_processes: int, timeout: float):
  """Starts the watch (a daemon thread). Returns `stop()`, to call when this
  process is done: it says so to the others, which stop watching it."""
  done = threading.Event()

  def run():
    beats, last_seen, seen_at = 0, {}, {}
    # Never touches the client once stop() was called: at exit JAX shuts it
    # down, and a call in flight then would end the process in C++.
    while not done.wait(BEAT_SECONDS if beats else 0):
      now = time.monotonic()
      try:
        beats += 1
        client.key_value_set(_key(process_id), str(beats), allow_overwrite=True)
        for other in range(n_processes):
          if other == process_id:
            continue
          try:
            value = client.key_value_try_get(_key(other))
          except Exception:  # noqa: BLE001  (not yet set: NOT_FOUND)
            value = None
          if value == _DONE:
            seen_at[other] = None
          elif value != last_seen.get(other):
            last_seen[other], seen_at[other] = value, now
          elif seen_at.get(other) is not None and now - seen_at[other] > timeout:
            _die(f"process {other} stopped answering {timeout:g} s ago (--heartbeat-timeout)")
      except Exception as error:  # noqa: BLE001  (the coordinator, process 0, is gone)
        if not done.is_set():
          reason = validation.reason(error, 200)
          _die(f"the coordinator (process 0) cannot be reached ({reason})")
        return

  def stop():
    done.set()
    thread.join(timeout=10)  # a call in flight finishes before JAX shuts the client down
    try:
      client.key_value_set(_key(process_id), _DONE, allow_overwrite=True)
    except Exception:  # noqa: BLE001  (the coordinator is gone: nobody is watching)
      pass

  thread = threading.Thread(target=run, name="sae_jax-peers", daemon=True)
  thread.start()
  return stop


def _die(why: str) -> None:
  _exit(f"error: {why}: a process stopped; re-launch every process with the same command to "
        f"resume from the last complete checkpoint")


def _exit(line: str) -> None:
  """Says `line` and exits at once (status 1), from any thread."""
  print(line, file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(1)
