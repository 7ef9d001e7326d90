"""First letters: the concept SAEBench's absorption metric probes (Chanin et
al. 2024), on a real language model.

Two sources of labelled activations:

* tokens of an activation cache (`token_letters`): a token whose text is
  letters only (after one leading space) is labelled with its first letter
  (with WordPiece, BERT's, only a whole word: no "##" piece, nor one that
  a "##" piece continues);
  `finish.py` evaluates every run on a cache so, on its held-out rows.
* SAEBench's prompts (`prompt_activations`): for each word of the
  vocabulary, ten in-context examples "{word} has the first letter: {X}",
  then "{word} has the first letter:", and the activation at the word.
  `evaluate_run` runs them through the model in JAX (`sae_jax.lm`) and
  the run's saved SAE (saelens/), which is `experiments/absorption.py`.
"""

import json
import pathlib
import typing

import jax
import numpy as np
import tqdm

from sae_jax import export
from sae_jax import hf
from sae_jax import hooks
from sae_jax import lm
from sae_jax import outdir
from sae_jax import probing
from sae_jax import saelens
from sae_jax import storage
from sae_jax import transcoder
from sae_jax import validation

LETTERS = "abcdefghijklmnopqrstuvwxyz"
TEMPLATE = "{word} has the first letter:"
ICL_EXAMPLES = 10


def first_letter(text: str) -> int:
  """0..25 for a word of ASCII letters only (one leading space allowed, as
  SAEBench's vocabulary filter), else -1.

  >>> first_letter(" Cat"), first_letter("dog"), first_letter(" 3d"), first_letter("")
  (2, 3, -1, -1)
  """
  word = text[1:] if text.startswith(" ") else text
  if not word or not all(c.isascii() and c.isalpha() for c in word):
    return -1
  return LETTERS.index(word[0].lower())


def token_texts(tokenizer, ids) -> dict:
  """{id: the token's text} for the distinct ids (leading space kept)."""
  return {int(i): tokenizer.convert_tokens_to_string([tokenizer.convert_ids_to_tokens(int(i))])
          for i in np.unique(np.asarray(ids))}


def continuation_prefix(tokenizer) -> typing.Optional[str]:
  """WordPiece's "##", which opens a token that continues a word (BERT's);
  None where a token carries its word's start itself (BPE's leading space)."""
  model = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
  prefix = getattr(model, "continuing_subword_prefix", None)
  return prefix if type(model).__name__ == "WordPiece" and prefix else None


def token_letters(tokenizer, ids, positions=None) -> np.ndarray:
  """[N] first letter (0..25) of each token id's text, -1 when it is not a word.

  With WordPiece only whole-word tokens are labelled: a "##" piece is not a
  word, nor is a token whose next row (given the rows' `positions` in their
  contexts, in order) is its "##" continuation; the last row, whose next
  is unknown, is not labelled. A row whose next position is not the next
  row (a left-out [SEP], or the context's end) ends its word.
  """
  ids = np.asarray(ids).reshape(-1)
  letter_of = {i: first_letter(text) for i, text in token_texts(tokenizer, ids).items()}
  letters = np.array([letter_of[int(i)] for i in ids], np.int64)
  prefix = continuation_prefix(tokenizer)
  if prefix is None or positions is None:
    return letters
  continues = {int(i): tokenizer.convert_ids_to_tokens(int(i)).startswith(prefix)
               for i in np.unique(ids)}
  positions = np.asarray(positions).reshape(-1)
  next_continues = np.ones(len(ids), bool)  # the last row: unknown
  next_continues[:-1] = ((positions[1:] == positions[:-1] + 1)
                         & np.array([continues[int(i)] for i in ids[1:]], bool))
  return np.where(next_continues, -1, letters)


def load_tokenizer(model: str, revision=None):
  """The model's tokenizer, or None (said in a line) when it cannot be had."""
  try:
    return hf.tokenizer(model, revision)
  except (OSError, ValueError) as error:
    reason = validation.reason(error, 200)
    print(f"no tokenizer for {model!r} ({reason}): first-letter metrics skipped", flush=True)
    return None


def vocabulary(tokenizer, n_words: typing.Optional[int] = None, seed: int = 0) -> list:
  """[(id, text)] of the tokens that are words (`first_letter` >= 0), all of
  them or `n_words` drawn at random, in id order."""
  words = [(i, t) for i, t in token_texts(tokenizer, np.arange(len(tokenizer))).items()
           if first_letter(t) >= 0]
  if n_words is not None and n_words < len(words):
    chosen = np.random.default_rng(seed).choice(len(words), n_words, replace=False)
    words = [words[i] for i in sorted(chosen)]
  return words


def prompt(word: str, examples: typing.Sequence[str]) -> tuple[str, str]:
  """(the text up to and including the word, the rest): SAEBench's
  in-context prompt, examples "{w} has the first letter: {W[0]}" on lines
  of their own, then "{word} has the first letter:"."""
  lines = [TEMPLATE.format(word=w) + " " + LETTERS[first_letter(w)].upper() for w in examples]
  head, tail = TEMPLATE.split("{word}")
  return "\n".join(lines) + "\n" + head + word, tail


def prompt_activations(model: str, hook: str, tokenizer, words: list, *, revision=None,
                       seed: int = 0, batch: int = 32, progress: bool = True) -> tuple:
  """Activations [N, D] at each word in its prompt, through the model in JAX.

  The word's position is the last token of the prompt's text up to the
  word; a word whose tokens there differ from its own id (a merge across
  the boundary) is left out. The other words of `words` are the examples.

  Returns:
    (activations [N, D] float32, the ids of the words kept [N]).
  """
  config, params = lm.load(model, revision)
  hooks.check_decoder(hook, model, config.n_layers)
  params = jax.device_put(params)
  rng = np.random.default_rng(seed)
  texts = [t for _, t in words]
  rows, kept = [], []
  for i, text in words:
    others = [texts[j] for j in rng.choice(len(texts), ICL_EXAMPLES + 1, replace=False)
              if texts[j] != text][:ICL_EXAMPLES]
    head, tail = prompt(text, others)
    head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    if head_ids and head_ids[-1] == i:
      rows.append((head_ids + tokenizer(tail, add_special_tokens=False)["input_ids"],
                   len(head_ids) - 1))
      kept.append(i)
  if not rows:
    raise ValueError(f"no word of {model!r}'s vocabulary is a single token in its prompt")
  length = max(len(ids) for ids, _ in rows)  # one shape: one compilation
  out = np.zeros((len(rows), config.hidden_size), np.float32)
  bar = tqdm.tqdm(total=len(rows), unit="word", disable=not progress)
  for start in range(0, len(rows), batch):
    chunk = rows[start:start + batch]
    ids_BxL = np.zeros((batch, length), np.int32)  # padding after each prompt: causal, unseen
    for b, (ids, _) in enumerate(chunk):
      ids_BxL[b, :len(ids)] = ids
    acts = np.asarray(lm.hook_at(params, config, ids_BxL, hook))
    out[start:start + len(chunk)] = acts[np.arange(len(chunk)), [p for _, p in chunk]]
    bar.update(len(chunk))
  bar.close()
  return out, np.array(kept)


def _run_model(run_dir: pathlib.PurePath) -> tuple:
  """(model, revision, hook) a run's activations came from, or one line why none."""
  path = run_dir / "config.json"
  if not path.is_file():
    raise ValueError(f"{run_dir} holds no config.json: not a training run's directory")
  config = json.loads(path.read_text())
  data = config.get("data")
  if data == "pythia":
    e = config["export"]
    return e["model"], e.get("revision"), e["hook"]
  manifest = export.read_manifest(data) if data and storage.path(data).is_dir() else None
  if manifest is None:
    raise ValueError(f"{run_dir} trained on --data {data!r}, not on a language model's "
                     f"activations (--data pythia or an activation cache): there are no words "
                     f"to spell")
  return manifest["model"], manifest.get("revision"), manifest["hook"]


def evaluate_run(run_dir, *, n_words: typing.Optional[int] = 8000, seed: int = 0,
                 batch: int = 32, model: typing.Optional[str] = None,
                 progress: bool = True) -> dict:
  """SAEBench's first-letter evaluation of a run's saved SAE (saelens/):
  `probing.letter_absorption` and 26-way `probing.sparse_probing` (one task
  per letter) on the prompts' activations. Writes run_dir/absorption.json.

  Args:
    run_dir: a finished run on a language model's activations.
    n_words: vocabulary words drawn at random (None: every word).
    model: the model's directory or hub id, if not where the run found it.
  """
  run_dir = storage.path(run_dir)
  found, revision, hook = _run_model(run_dir)
  weights, cfg = saelens.load(run_dir / "saelens")
  model = model or found
  tokenizer = load_tokenizer(model, revision)
  if tokenizer is None:
    raise ValueError(f"could not load {model!r}'s tokenizer; pass the model's directory with "
                     f"--model DIR")
  if hf.is_encoder(hf.model_config(model, revision)):
    raise ValueError(f"{model!r} is an encoder (bidirectional attention): SAEBench's prompts "
                     f"ask a causal model for the next token; the run's summary.json holds its "
                     f"first-letter probing and absorption on the cache's whole-word tokens")
  words = vocabulary(tokenizer, n_words, seed)
  x, ids = prompt_activations(model, hook, tokenizer, words, revision=revision, seed=seed,
                              batch=batch, progress=progress)
  if x.shape[1] != weights["W_dec"].shape[1]:
    raise ValueError(f"{model!r} at {hook} has width {x.shape[1]}; the SAE in {run_dir} reads "
                     f"{weights['W_dec'].shape[1]}")
  codes = saelens.encode(weights, cfg, x)
  letter = token_letters(tokenizer, ids)
  if cfg.get("architecture", "").endswith("transcoder"):  # as finish.py: no absorption
    absorbed = {"absorption_skipped": transcoder.NO_ABSORPTION, "per_letter": {}}
  else:
    absorbed = probing.letter_absorption(x, codes, weights["W_dec"], letter, ids, seed=seed)
  probes = probing.sparse_probing(codes, letter[:, None] == np.arange(len(LETTERS))[None, :],
                                  dense_NxD=x, seed=seed)
  per_letter = {LETTERS[i]: r for i, r in absorbed.pop("per_letter").items()}
  probes.pop("per_task")
  result = {"model": model, "hook": hook, "words": len(ids), **absorbed, **probes,
            "per_letter": per_letter}
  outdir.write_json(run_dir / "absorption.json", result)
  return result
