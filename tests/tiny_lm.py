"""A tiny random GPT-NeoX, a tokenizer built here, and text files written here
(no hub): the real transformers loading path, at test size."""

import json
import pathlib

import numpy as np

# Words of letters only, 10 for each of 6 first letters (SAEBench's
# first-letter metrics need words).
WORDS = [first + rest for first in "abcdef"
         for rest in ("ab", "ot", "un", "er", "il", "ix", "om", "ud", "ey", "ak")]
L = 16  # context length of the test exports


def write_texts(directory: pathlib.Path, seed: int = 0) -> dict:
  """Two .txt files (a document per line) and one .jsonl file."""
  rng = np.random.default_rng(seed)
  doc = lambda: " ".join(rng.choice(WORDS, size=rng.integers(3, 40)))
  directory.mkdir(parents=True, exist_ok=True)
  paths = {"txt": [directory / "a.txt", directory / "b.txt"], "jsonl": [directory / "c.jsonl"]}
  for path in paths["txt"]:
    path.write_text("\n".join(doc() for _ in range(40)) + "\n")
  paths["jsonl"][0].write_text(
      "\n".join(json.dumps({"body": doc(), "id": i}) for i in range(40)) + "\n")
  return paths


def build(directory: pathlib.Path, *, layers: int = 3, hidden: int = 16, rotary_pct: float = 0.25,
          parallel_residual: bool = True, letters: float = 0.0, seed: int = 0,
          random_norms: bool = False) -> pathlib.Path:
  """Saves a random GPTNeoXForCausalLM and a word-level tokenizer whose
  <|endoftext|> is id 0, as Pythia's is. With `letters` > 0, each word's
  embedding also carries a direction of that norm for its first letter, for
  a first-letter probe to find; with `random_norms`, the norms' weights and
  biases are not 1 and 0 (`_randomize`; the linear maps' biases stay 0, so
  that their outputs are not one constant)."""
  import torch
  import transformers
  vocab = _word_tokenizer(directory)
  config = transformers.GPTNeoXConfig(
      vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
      intermediate_size=2 * hidden, rotary_pct=rotary_pct, max_position_embeddings=128,
      use_parallel_residual=parallel_residual, bos_token_id=0, eos_token_id=0)
  torch.manual_seed(seed)
  model = transformers.GPTNeoXForCausalLM(config)
  with torch.no_grad():
    letter_dirs = letters * torch.nn.functional.normalize(torch.randn(26, hidden), dim=1)
    for word in WORDS:
      model.gpt_neox.embed_in.weight[vocab[word]] += letter_dirs[ord(word[0]) - ord("a")]
  if random_norms:
    _randomize(model, biases=False)
  model.save_pretrained(directory)
  return directory


# The causal families the export reads every hook of, beside GPT-NeoX
# (`build`): their transformers config classes, at test size.
FAMILIES = ("gpt2", "llama", "qwen2", "mistral", "gemma2")


def _word_tokenizer(directory: pathlib.Path) -> dict:
  """The word-level tokenizer of `build`, saved in directory; its vocab."""
  import tokenizers
  import transformers
  vocab = {"<|endoftext|>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<unk>").save_pretrained(directory)
  return vocab


def build_causal(directory: pathlib.Path, family: str, *, layers: int = 2, hidden: int = 16,
                 seed: int = 0, **overrides) -> pathlib.Path:
  """Saves a random causal LM of `family` (one of FAMILIES: 4 heads, 2 of
  them key-value heads where the family has grouped queries; Mistral's
  sliding window 4 positions) with the word-level tokenizer of `build`;
  `overrides` go to its transformers config."""
  import torch
  import transformers
  vocab = _word_tokenizer(directory)
  common = dict(vocab_size=len(vocab), bos_token_id=0, eos_token_id=0)
  if family == "gpt2":
    config = transformers.GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=128,
                                     **common, **overrides)
  else:
    kind = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
            "mistral": transformers.MistralConfig, "gemma2": transformers.Gemma2Config}[family]
    window = {"sliding_window": 4} if family == "mistral" else {}
    config = kind(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                  max_position_embeddings=128, pad_token_id=1, **common,
                  **{**window, **overrides})
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config)
  _randomize(model)
  model.save_pretrained(directory)
  return directory


def _randomize(model, biases: bool = True) -> None:
  """Random norms (and biases), so that one left out shows."""
  import torch
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or "ln" in name or (biases and name.endswith("bias")):
        p.add_(0.5 * torch.randn_like(p))


def export_config(lm: dict, **kwargs):
  """A small export of the `lm` fixture: 700 rows of block 1 in 128-row shards."""
  from sae_jax import export
  base = dict(model=lm["model"], hook="blocks.1.hook_resid_post", dataset=lm["texts"]["txt"],
              context_length=L, tokens=700, shard_rows=128, batch_contexts=4)
  return export.ExportConfig(**{**base, **kwargs})


def build_bert(directory: pathlib.Path, *, layers: int = 2, hidden: int = 16,
               seed: int = 0) -> pathlib.Path:
  """Saves a random BertModel (an encoder) and a WordPiece tokenizer with
  BERT's special tokens, in which the words of "ef" are whole tokens and
  the others split as their first letter, then "##" and the rest (so
  "abab" is "a", "##ab")."""
  import tokenizers
  import torch
  import transformers
  special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
  whole = [w for w in WORDS if w[0] in "ef"]
  pieces = sorted({w[0] for w in WORDS} | {"##" + w[1:] for w in WORDS if w not in whole})
  vocab = {token: i for i, token in enumerate(special + whole + pieces)}
  tok = tokenizers.Tokenizer(tokenizers.models.WordPiece(vocab, unk_token="[UNK]"))
  tok.normalizer = tokenizers.normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
  tok.decoder = tokenizers.decoders.WordPiece()
  transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
      pad_token="[PAD]", mask_token="[MASK]").save_pretrained(directory)
  config = transformers.BertConfig(
      vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
      num_attention_heads=4, intermediate_size=2 * hidden, max_position_embeddings=64)
  torch.manual_seed(seed)
  transformers.BertModel(config).save_pretrained(directory)
  return directory
