"""Argument checks shared by the selection functions, and `reason`, the
first line of an error that a one-line message wraps.

Each check runs on static (Python) values before any array work, and raises a
`ValueError` that names the argument (or config field), the value given and
what is allowed.
"""

import fractions
import math
import numbers
import typing

SCORE_METHODS = ("l2", "squared_l2", "entropy", "uniform", "leverage")


def reason(error: BaseException, limit: typing.Optional[int] = None, empty: str = "") -> str:
  """The first line of `error`'s message (at most `limit` characters), or
  `empty` (else its type's name) when the message is empty.

  >>> reason(OSError("disk full\\nmore")), reason(KeyError()), reason(OSError("abc"), 2)
  ('disk full', 'KeyError', 'ab')
  """
  return (str(error).strip().splitlines() or [empty or type(error).__name__])[0][:limit]


def check_activations(a, name: str = "a") -> None:
  """`a` is a float array of shape [..., F] with at least one token axis."""
  import jax.numpy as jnp  # noqa: PLC0415 (the scripts' parsers import this module before JAX)
  ndim = getattr(a, "ndim", None)
  if ndim is None or ndim < 2:
    shape = getattr(a, "shape", None)
    raise ValueError(
        f"{name} must be an array of shape [..., F] with at least 2 dimensions "
        f"(tokens x latents); got shape {shape}")
  if not jnp.issubdtype(a.dtype, jnp.floating):
    raise ValueError(
        f"{name} must have a floating dtype (float32, bfloat16, ...); "
        f"got {a.dtype}")
  if a.shape[-1] < 1:
    raise ValueError(f"{name} must have at least one latent; got shape {a.shape}")


def check_k(k, n_latents: int, name: str = "k") -> int:
  """`k` is an integer in [1, n_latents]; returns it as a Python int."""
  if isinstance(k, bool) or not isinstance(k, numbers.Integral):
    raise ValueError(
        f"{name} must be an integer in [1, {n_latents}]; got {k!r} "
        f"({type(k).__name__})")
  if not 1 <= k <= n_latents:
    raise ValueError(
        f"{name} must be an integer in [1, {n_latents}] (the number of latents); "
        f"got {k}")
  return int(k)


def check_l(l) -> float:
  """`l` is a finite real number >= 1; returns it as a Python float."""
  if isinstance(l, bool) or not isinstance(l, numbers.Real):
    raise ValueError(f"l must be a finite number >= 1; got {l!r} ({type(l).__name__})")
  if not math.isfinite(l) or l < 1:
    raise ValueError(f"l must be a finite number >= 1; got {l}")
  return float(l)


def check_bias(bias, n_latents: int) -> None:
  """`bias` is None or a float array of shape [n_latents]."""
  if bias is None:
    return
  import jax.numpy as jnp  # noqa: PLC0415 (the scripts' parsers import this module before JAX)
  shape, dtype = getattr(bias, "shape", None), getattr(bias, "dtype", None)
  if shape != (n_latents,) or not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"bias must be a float array of shape ({n_latents},) (one per latent); "
                     f"got shape {shape}, dtype {dtype}")


def check_score_method(method) -> None:
  """`method` is one of SCORE_METHODS."""
  if method not in SCORE_METHODS:
    raise ValueError(
        f"score must be one of {', '.join(map(repr, SCORE_METHODS))}; "
        f"got {method!r}")


def check_score(method, key) -> None:
  """`method` is a known score; "uniform" also needs a PRNG key."""
  check_score_method(method)
  if method == "uniform" and key is None:
    raise ValueError(
        "score method 'uniform' gives every column the same score, so the pool "
        "is only meaningful when sampled: pass key=jax.random.key(...)")


def check_leverage(ridge, sketch, prefix: str = "") -> None:
  """The leverage score's ridge is a finite number > 0; its sketch None or an int >= 1."""
  if (isinstance(ridge, bool) or not isinstance(ridge, numbers.Real) or not math.isfinite(ridge)
      or ridge <= 0):
    raise ValueError(f"{prefix}ridge must be a finite number > 0; got {ridge!r}")
  if sketch is not None and (isinstance(sketch, bool) or not isinstance(sketch, numbers.Integral)
                             or sketch < 1):
    raise ValueError(f"{prefix}sketch must be None (exact leverage scores) or an integer >= 1 "
                     f"(rows of the token sketch); got {sketch!r}")


def pool_size(k: int, l: float, n_latents: int) -> int:
  """P = min(F, ceil(k * l)), the number of candidate columns."""
  # l as the decimal the user wrote: ceil(10 * 1.1) is 11, not 12.
  return min(n_latents, math.ceil(k * fractions.Fraction(repr(float(l)))))


def check_int_field(owner: str, name: str, value, minimum: int = 1,
                    maximum: typing.Optional[int] = None) -> None:
  """Config field `owner.name` is an integer >= minimum (and <= maximum)."""
  if (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum
      or (maximum is not None and value > maximum)):
    allowed = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    raise ValueError(f"{owner}.{name} must be an integer {allowed}; got {value!r}")


# JAX's PRNG keys hold 32 bits of an integer seed: larger seeds would share keys.
MAX_SEED = 2**32 - 1


def check_real_field(owner: str, name: str, value, lo, hi, *, lo_open=False,
                     hi_open=False) -> None:
  """Config field `owner.name` is a finite number in the interval from lo to hi."""
  ok = (not isinstance(value, bool) and isinstance(value, numbers.Real)
        and math.isfinite(value)
        and (value > lo if lo_open else value >= lo)
        and (value < hi if hi_open else value <= hi))
  if not ok:
    interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    raise ValueError(f"{owner}.{name} must be a number in {interval}; got {value!r}")


def check_choice_field(owner: str, name: str, value, allowed) -> None:
  """Config field `owner.name` is one of `allowed`."""
  if value not in allowed:
    raise ValueError(
        f"{owner}.{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
