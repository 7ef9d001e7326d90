#!/usr/bin/env bash
# Sets the project up from scratch: the system's Chromium and its driver (the
# feature browser's tests drive them) and tcmalloc (the scripts run on it:
# sae_jax/hostmem.py), then .venv with everything the tests use.
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null ||
    ! /sbin/ldconfig -p | grep -q libtcmalloc_minimal.so.4; then
  as_root=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
  $as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $as_root apt-get install -y -qq chromium chromium-driver \
    libtcmalloc-minimal4 >/dev/null
fi
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -e ".[activations,demo,dev]"
# The reference trainer of tests/test_parity.py, without its heavy declared
# dependencies (nnsight and more), which an extra cannot leave out.
.venv/bin/pip install --quiet --no-deps dictionary-learning==0.1.0 einops
