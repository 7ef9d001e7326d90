"""benchmarks/accelerator.py, the one script a lent GPU runs, at small shapes
on this CPU: every table it promises is printed, with numbers in it."""

import pathlib
import re
import subprocess
import sys

import pytest

from tests import xla

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_accelerator_script_runs_at_small_shapes():
  env = dict(xla.env(1), PYTHONPATH=str(ROOT))
  done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "accelerator.py"), "--quick"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  out = done.stdout
  assert out.startswith("device: cpu")
  number = r"[0-9][0-9,]*(\.[0-9]+)?"
  row = lambda name: re.compile(rf"^\| {re.escape(name)} \| {number} \| {number} \| {number}x? \|$",
                                re.M)
  for dtype in ("float32", "bfloat16"):
    assert f"compute dtype {dtype}" in out and f"dictionary_learning 0.1.0 ({dtype}" in out
  for name in ("floor: the encoder matmul x @ W_enc", "step, TopK", "step, BatchTopK",
               "step, Sampled l=8", "step, Sampled l=2",
               "step, Sampled l=8, every latent dead (AuxK on all F)",
               "calibration, BatchTopK, 2 batches (x: its step)", "BatchTopK", "TopK",
               "gpt_neox: transformers (torch, cpu)", "gpt_neox: sae_jax.lm float32 (cpu)",
               "gpt_neox: sae_jax.lm bfloat16 (cpu)"):
    assert len(row(name).findall(out)) == (2 if not name.startswith("gpt_neox") else 1), name
  assert "--stream round" in out
