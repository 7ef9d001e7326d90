"""tcmalloc under XLA:CPU's buffers: a script re-executes itself with it
preloaded (`use_tcmalloc`), so that a step's buffers are faulted in once
rather than on every step.

XLA:CPU allocates each execution's outputs and temporaries with malloc and
frees them when it is done. glibc's malloc maps a large block afresh and
unmaps it on free, so each step pays the kernel's page faults again.
The Sampled-SAE l=8 step at D=768, F=24576, B=1024 faulted 57,500 pages
(225 MB) a step with glibc's malloc and none with tcmalloc, which keeps
freed blocks for reuse (the timings are in docs/speed.md, "tcmalloc").
glibc's own settings (one arena, no mmap, no trimming) still faulted a
third to all of a large block's pages, depending on its size.
"""

import ctypes.util
import os
import sys

LIBRARY = "tcmalloc_minimal"
"""The library preloaded (Debian and Ubuntu: libtcmalloc-minimal4)."""
OPT_OUT = "SAE_JAX_SYSTEM_MALLOC"
"""Set (to anything but empty) to keep the system's malloc."""
_REPLACED = "_SAE_JAX_PRELOADED"  # set for the re-executed process


def loaded() -> bool:
  """Whether tcmalloc is mapped into this process."""
  try:
    with open("/proc/self/maps") as maps:
      return LIBRARY in maps.read()
  except OSError:
    return False


def use_tcmalloc() -> bool:
  """Re-executes this script (the same interpreter and command line, same
  process id) with tcmalloc preloaded, once, where Linux has it; returns at
  once otherwise. Call it first thing in a script's `__main__` block: the
  script starts again from the top.

  In the re-executed process it takes LD_PRELOAD out again, so that the
  processes the script starts (a browser, workers) get the user's
  environment. Nothing happens when OPT_OUT is set, when LD_PRELOAD is
  already set (the user's choice stands), or where tcmalloc is not
  installed.

  Returns:
    Whether tcmalloc is loaded in this process.
  """
  if os.environ.pop(_REPLACED, None):  # the re-executed process
    os.environ.pop("LD_PRELOAD", None)
    return loaded()
  if (os.environ.get(OPT_OUT) or os.environ.get("LD_PRELOAD")
      or not sys.platform.startswith("linux")):
    return loaded()
  name = ctypes.util.find_library(LIBRARY)
  if name is None:
    return False
  env = dict(os.environ, LD_PRELOAD=name, **{_REPLACED: "1"})
  # tcmalloc reports each allocation over 1 GiB on stderr by default.
  env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(2**60))
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, sys.orig_argv, env)  # does not return
  except OSError:
    return False
