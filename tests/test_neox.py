"""The JAX GPT-NeoX (`lm.py` with `neox.py`) against transformers' torch model,
block by block."""

import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from sae_jax import lm as lm_jax
from tests import tiny_lm

# (rotary_pct, parallel residual, hidden): head sizes 4 and 6; 0.25 of 6
# rotates 1 dim, which transformers rounds up to one frequency pair.
CASES = [(0.25, True, 16), (1.0, False, 16), (0.25, False, 24), (1.0, True, 24)]


def torch_outputs(directory, tokens):
  """transformers' raw block outputs (forward hooks), hidden_states and logits."""
  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415
  model = transformers.GPTNeoXForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
  blocks = []
  hooks = [layer.register_forward_hook(lambda m, i, o: blocks.append(
      (o[0] if isinstance(o, tuple) else o).detach().numpy()))
           for layer in model.gpt_neox.layers]
  with torch.no_grad():
    out = model(torch.as_tensor(tokens), output_hidden_states=True)
  for hook in hooks:
    hook.remove()
  return blocks, [h.numpy() for h in out.hidden_states], out.logits.numpy()


def close(got, want, rtol=1e-4):
  """Equal within rtol relative to the array's scale."""
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


@pytest.mark.parametrize("rotary_pct,parallel,hidden", CASES)
def test_matches_transformers(tmp_path, rotary_pct, parallel, hidden):
  directory = tiny_lm.build(tmp_path, layers=3, hidden=hidden, rotary_pct=rotary_pct,
                            parallel_residual=parallel, seed=hidden)
  config, params = lm_jax.load(str(directory))
  assert config.parallel_residual == parallel and config.n_layers == 3
  tokens = np.random.default_rng(0).integers(0, config.vocab_size, (3, 13))
  blocks, hidden_states, want_logits = torch_outputs(directory, tokens)

  for layer in range(3):
    got = np.asarray(lm_jax.hook_at(params, config, tokens, f"blocks.{layer}.hook_resid_post"))
    close(got, blocks[layer])
    if layer < 2:  # hook convention: blocks.N.hook_resid_post = hidden_states[N + 1] ...
      close(got, hidden_states[layer + 1])
  # ... except the top block, whose hidden_states entry has the final layer norm.
  assert not np.allclose(blocks[2], hidden_states[3], atol=1e-3)
  logits = np.asarray(lm_jax.logits(params, config, tokens))
  close(logits, want_logits)
  # The splice with the identity reproduces the clean logits.
  same = lm_jax.logits_with(params, config, tokens, "blocks.1.hook_resid_post", _identity)
  close(np.asarray(same), logits, 1e-6)
  # bfloat16 matmuls stay near the float32 logits.
  bf16 = np.asarray(lm_jax.logits(params, config, tokens, dtype="bfloat16"))
  assert np.abs(bf16 - logits).max() < 0.05 * np.abs(logits).max()


def _identity(x):
  return x


def test_splice_changes_what_follows_the_hook(lm):
  config, params = lm_jax.load(lm["model"])
  tokens = np.arange(2 * 10).reshape(2, 10) % config.vocab_size
  clean = np.asarray(lm_jax.logits(params, config, tokens))
  zeroed = np.asarray(lm_jax.logits_with(params, config, tokens, "blocks.1.hook_resid_post",
                                         jnp.zeros_like))
  assert not np.allclose(clean, zeroed)
  # Zeroing the top block's output leaves only the final layer norm's bias.
  top_hook = f"blocks.{config.n_layers - 1}.hook_resid_post"
  top = np.asarray(lm_jax.logits_with(params, config, tokens, top_hook, jnp.zeros_like))
  close(top[0, 0], params["final_ln_b"] @ params["unembed"])


def test_loading_imports_no_torch(lm):
  code = ("import sys; from sae_jax import lm; c, p = lm.load(sys.argv[1]); "
          "import numpy as np; lm.hook_at(p, c, np.zeros((1, 4), int), 'blocks.0.hook_mlp_out'); "
          "assert 'torch' not in sys.modules, 'torch was imported'")
  subprocess.run([sys.executable, "-c", code, lm["model"]], check=True)


@pytest.mark.parametrize("call,message", [
    (lambda c, p: lm_jax.hook_at(p, c, np.zeros((1, 4), int), "blocks.3.hook_resid_post"),
     r"hook must name a point of blocks 0..2 \(resid_pre, .*\); got 'blocks.3.hook_resid_post'"),
    (lambda c, p: lm_jax.logits(p, c, np.zeros(4, int)),
     r"tokens must have shape \[contexts, length\]"),
    (lambda c, p: lm_jax.logits(p, c, np.zeros((1, 4), int), dtype="float16"),
     "dtype must be one of"),
])
def test_bad_input_is_refused(lm, call, message):
  config, params = lm_jax.load(lm["model"])
  with pytest.raises(ValueError, match=message):
    call(config, params)


def test_a_directory_without_safetensors_is_refused(tmp_path, lm):
  import shutil  # noqa: PLC0415
  shutil.copy(f"{lm['model']}/config.json", tmp_path / "config.json")
  with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
    lm_jax.load(str(tmp_path))
