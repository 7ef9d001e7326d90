"""Text to the model's contexts: documents tokenized, joined and cut in order.

A causal model's contexts are the documents' tokens joined by its
end-of-text token (Pythia's `<|endoftext|>`), cut every `context_length`
tokens. An encoder's (BERT: bidirectional attention) are framed as it was
trained: `[CLS]`, `context_length - 2` tokens of the documents joined by
`[SEP]`, then `[SEP]`. The export leaves the frame's rows out, as it leaves
out position 0 (`excluded_ids`).
"""

import collections
import dataclasses
import itertools
import typing

import numpy as np


@dataclasses.dataclass(frozen=True)
class Framing:
  """How documents become contexts: the id between two documents (None:
  nothing), and the ids that open and close every context."""
  separator: typing.Optional[int]
  head: tuple = ()
  tail: tuple = ()


def framing(tokenizer, encoder: bool = False) -> Framing:
  """A causal model's end-of-text joins (no frame); an encoder's
  [CLS] ... [SEP] frame, [SEP] between documents."""
  if not encoder:
    return Framing(tokenizer.eos_token_id)
  cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
  if cls is None or sep is None:
    raise ValueError(f"an encoder's contexts are [CLS] ... [SEP], but its tokenizer has "
                     f"cls_token_id {cls} and sep_token_id {sep}")
  return Framing(sep, (cls,), (sep,))


def check_length(context_length: int, frame: Framing) -> None:
  """A context must hold a token of text inside its frame."""
  if context_length - len(frame.head) - len(frame.tail) < 1:
    raise ValueError(f"--context-length {context_length} leaves no text inside the model's "
                     f"{len(frame.head) + len(frame.tail)} framing tokens")


def excluded_ids(tokenizer, encoder: bool, exclude_token_ids=()) -> np.ndarray:
  """The ids whose rows are left out: `exclude_token_ids`, and an encoder's
  special tokens ([CLS], [SEP], [PAD], [UNK], [MASK]): the frame and
  separators, and [UNK], which stands for text the vocabulary cannot spell."""
  special = tokenizer.all_special_ids if encoder else ()
  return np.asarray(sorted({*exclude_token_ids, *special}), np.int32)


def texts(config) -> typing.Iterator[str]:
  """The documents of `config.dataset` (an ExportConfig): local .txt files
  (a document per line) or .jsonl files, or a hub dataset, streamed."""
  import datasets  # noqa: PLC0415 (the activations extra)
  if isinstance(config.dataset, tuple):
    kind = "text" if str(config.dataset[0]).endswith(".txt") else "json"
    if any(str(p).endswith(".txt") != (kind == "text") for p in config.dataset):
      raise ValueError("ExportConfig.dataset: mix of .txt and .jsonl files; use one kind")
    records = datasets.load_dataset(kind, data_files=list(config.dataset), split="train",
                                    streaming=True)
    field = "text" if kind == "text" else config.text_field
  else:
    records = datasets.load_dataset(config.dataset, split=config.split, streaming=True)
    field = config.text_field
  for record in records:
    if field not in record:
      raise ValueError(f"dataset records have no field {field!r} (text_field); "
                       f"fields: {sorted(record)}")
    yield record[field]


def contexts(config, tokenizer, frame: typing.Optional[Framing] = None
             ) -> typing.Iterator[np.ndarray]:
  """[context_length] int32 token ids: documents joined, cut in order."""
  for context, _ in located_contexts(config, tokenizer, frame=frame):
    yield context


def located_contexts(config, tokenizer, start: tuple = (0, 0),
                     frame: typing.Optional[Framing] = None
                     ) -> typing.Iterator[tuple[np.ndarray, tuple]]:
  """`contexts` from a position in the text, each with the position after it.

  A position is (record, offset): the next context's text starts `offset`
  tokens into the record-th document (its tokens and separator). Resuming
  from the position after a context gives the contexts that followed it,
  and only one document is tokenized again. `frame`: a causal model's
  (`framing(tokenizer)`) unless given.
  """
  frame = frame or framing(tokenizer)
  check_length(config.context_length, frame)
  body = config.context_length - len(frame.head) - len(frame.tail)
  record, offset = start
  # Documents not yet cut into contexts: [record index, tokens, tokens used].
  pending: collections.deque = collections.deque()
  have = 0
  for index, text in enumerate(itertools.islice(texts(config), record, None), start=record):
    # (whole documents: a long one is cut into contexts, so no length warning)
    tokens = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if frame.separator is not None:  # Pythia's <|endoftext|> is id 0: never test it for truth
      tokens.append(frame.separator)
    used = offset if index == record else 0
    pending.append([index, tokens, used])
    have += len(tokens) - used
    while have >= body:
      context = list(frame.head)
      while len(context) < len(frame.head) + body:
        document = pending[0]
        take = min(len(frame.head) + body - len(context), len(document[1]) - document[2])
        context.extend(document[1][document[2]:document[2] + take])
        document[2] += take
        if document[2] == len(document[1]):
          pending.popleft()
      have -= body
      after = (pending[0][0], pending[0][2]) if pending else (index + 1, 0)
      yield np.asarray(context + list(frame.tail), np.int32), after


def batches(config, tokenizer, start_batch: int, frame: typing.Optional[Framing] = None):
  """(batch index, [b, L] ids) from batch `start_batch` on; skipped batches are
  tokenized but never run through the model."""
  batch, index = [], 0
  for context in contexts(config, tokenizer, frame):
    batch.append(context)
    if len(batch) == config.batch_contexts:
      if index >= start_batch:
        yield index, np.stack(batch)
      batch, index = [], index + 1
  if batch and index >= start_batch:
    yield index, np.stack(batch)
