"""Runs experiments/train.py with Ctrl-C delivered while orbax saves a checkpoint.

    python -m tests.interrupt CALL PRESSES -- TRAIN_ARGS...

On orbax's CALL-th batching of serialization requests (inside its save),
SIGINT is sent to this process PRESSES times, as a user pressing Ctrl-C
would, and the handler runs there, in orbax's frames. Python's default
handler would raise KeyboardInterrupt inside the save.
"""

import os
import signal
import sys
import time

from orbax.checkpoint._src.handlers import base_pytree_checkpoint_handler as handler

from tests import scripts


def main() -> int:
  call, presses = int(sys.argv[1]), int(sys.argv[2])
  original = handler.batched_serialization_requests
  calls = {"n": 0}

  def batched(*args, **kwargs):
    calls["n"] += 1
    if calls["n"] == call:
      for _ in range(presses):
        os.kill(os.getpid(), signal.SIGINT)
        deadline = time.time() + 1.0
        while time.time() < deadline:  # the handler runs here, between bytecodes
          pass
      print(f"interrupt: SIGINT x{presses} sent inside orbax's save", flush=True)
    return original(*args, **kwargs)

  handler.batched_serialization_requests = batched
  return scripts.load("train").main(sys.argv[sys.argv.index("--") + 1:])


if __name__ == "__main__":
  sys.exit(main())
