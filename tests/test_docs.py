"""The examples in the public docstrings run and print what they show."""

import doctest

import jax
import jax.numpy as jnp
import pytest

from sae_jax import evaluate
from sae_jax import losses
from sae_jax import model
from sae_jax import optimizer
from sae_jax import pool
from sae_jax import probing
from sae_jax import scoring
from sae_jax import selection
from sae_jax import spelling
from sae_jax import thresholds
from sae_jax import train


@pytest.mark.parametrize("module", [evaluate, losses, model, optimizer, pool, probing, scoring,
                                    selection, spelling, thresholds, train])
def test_docstring_examples(module):
  result = doctest.testmod(module, extraglobs={"jax": jax, "jnp": jnp},
                           optionflags=doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0
  assert result.failed == 0
