"""Dataset files as (tokens, loss mask) sequences for ``kdfast capture --data PATH``.

PATH is a JSONL file (``.jsonl`` / ``.json``), a Parquet file (``.parquet``) or a directory written
by Hugging Face ``datasets`` ``save_to_disk``; all three are read through ``datasets`` (memory-mapped
Arrow: records are decoded one at a time, the file is never loaded into RAM). Exactly one mode:

- ``text_field``: plain text, tokenized with the tokenizer's special tokens, EOS appended; every
  token is learned. A document longer than ``max_len`` is cut into windows that overlap by one
  token (window w starts at ``w * (max_len - 1)``), so every next-token prediction of the document
  is learned exactly once; ``truncate=True`` keeps only the first window.
- ``prompt_field`` + ``response_field``: ``prompt ids (with special tokens) + response ids (without)
  + EOS``, concatenated as ids (no separator is added); the response tokens and the EOS are learned.
- ``messages_field``: a list of ``{"role", "content"}`` rendered with the tokenizer's chat template;
  the tokens of each assistant turn, from its content through its end-of-turn text, are learned.
  Spans are found on the rendered text: assistant turn i spans from the end of
  ``render(messages[:i], add_generation_prompt=True)`` to the end of ``render(messages[:i + 1])``;
  the template must be prefix-stable (each of those renders a prefix of the next and of the whole
  conversation), else the record is refused. The whole conversation is then tokenized once, exactly
  as ``apply_chat_template`` does (``add_special_tokens=False``), and a token is an assistant token
  when its character span overlaps an assistant span (the rule of ``return_assistant_tokens_mask``).

Mask convention (the shards' and ``ShardDataset``'s): position j's teacher target predicts token
j + 1, and ``labels[j] = tokens[j + 1]``. So ``mask[j]`` is True exactly when token j + 1 is learned
(a response / assistant token, any token but the first in text mode); ``mask[L - 1]`` is always
False (there is no next token). The token before a response (the end of the prompt or of the
assistant header) is therefore a learned *position*, and the first token never is a learned token.

Bad input (a record whose field is missing, null or of the wrong type, empty text / response /
assistant content, a conversation without an assistant turn, a template that is not prefix-stable,
a prompt/response or conversation longer than ``max_len`` without ``truncate``, or one whose learned
tokens all fall beyond ``max_len``): ValueError naming the file and the record's index, or with
``skip_bad=True`` the record is skipped and counted in ``counts.skipped``.

This module imports neither torch nor (until a source is opened) ``datasets``.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

__all__ = ["DataSource", "SourceCounts", "sequence_mask", "MODES"]

log = logging.getLogger("kdfast.sources")

MODES = ("text", "prompt_response", "messages")
_JSON_SUFFIXES = (".jsonl", ".json")
_LOGGED_SKIPS = 5


@dataclass
class SourceCounts:
    """What a pass over the source produced so far."""

    records: int = 0    # records read (including skipped ones)
    sequences: int = 0  # sequences yielded
    tokens: int = 0     # tokens in the yielded sequences
    learned: int = 0    # learned positions (mask ones) in the yielded sequences
    skipped: int = 0    # bad records skipped (skip_bad=True)


class _BadRecord(ValueError):
    """A record that cannot become a correct sequence (becomes a named ValueError or a counted skip)."""


def sequence_mask(learned_tokens: np.ndarray) -> np.ndarray:
    """[L] bool learned tokens -> [L] bool loss mask: mask[j] = learned_tokens[j + 1], mask[L-1] = False."""
    mask = np.zeros(len(learned_tokens), bool)
    mask[:-1] = learned_tokens[1:]
    return mask


class DataSource:
    """Iterate a dataset file as ``(tokens [L] int32, mask [L] bool)`` with ``2 <= L <= max_len``.

    ``tokenizer`` is a Hugging Face tokenizer (a fast one for ``messages_field``, which needs offsets).
    Each iteration reads the file from the start and resets ``counts``; the order is the file's, so
    a resumed capture can skip the sequences it already stored. ``cache_dir``: where ``datasets``
    keeps the Arrow copy of a JSONL / Parquet file (its default cache when None).
    """

    def __init__(self, path: str | Path, tokenizer, *, max_len: int, text_field: str | None = None,
                 prompt_field: str | None = None, response_field: str | None = None,
                 messages_field: str | None = None, truncate: bool = False, skip_bad: bool = False,
                 cache_dir: str | Path | None = None):
        self.path = Path(path)
        self.mode, self.fields = _check_mode(text_field, prompt_field, response_field, messages_field)
        if not (isinstance(max_len, int) and max_len >= 2):
            raise ValueError(f"max_len must be an int >= 2, got {max_len!r}")
        if tokenizer.eos_token_id is None and self.mode != "messages":
            raise ValueError(f"the tokenizer has no EOS token, which {self.mode} mode appends to every document")
        if self.mode == "messages":
            _check_chat_tokenizer(tokenizer)
        self.tokenizer, self.max_len, self.truncate, self.skip_bad = tokenizer, max_len, truncate, skip_bad
        self.dataset = _open(self.path, cache_dir)
        missing = [f for f in self.fields if f not in self.dataset.column_names]
        if missing:
            raise ValueError(f"{self.path}: no field {missing[0]!r}; the records have {self.dataset.column_names}")
        self.counts = SourceCounts()

    def identity(self) -> dict:
        """The source's record for a shard manifest (``datasets``' fingerprint of the data)."""
        return {"path": str(self.path), "mode": self.mode, "fields": list(self.fields), "max_len": self.max_len,
                "truncate": self.truncate, "skip_bad": self.skip_bad, "records": len(self.dataset),
                "fingerprint": self.dataset._fingerprint}

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        self.counts = counts = SourceCounts()
        for index, record in enumerate(self.dataset.select_columns(list(self.fields))):
            counts.records += 1
            try:
                sequences = list(self._sequences(record))
            except _BadRecord as e:
                message = f"{self.path} record {index}: {e}"
                if not self.skip_bad:
                    raise ValueError(message + "; skip_bad=True (--skip-bad) skips such records") from None
                counts.skipped += 1
                if counts.skipped <= _LOGGED_SKIPS:
                    log.warning("skipping %s", message)
                continue
            for tokens, mask in sequences:
                counts.sequences += 1
                counts.tokens += len(tokens)
                counts.learned += int(mask.sum())
                yield tokens, mask

    def summary(self) -> dict:
        return asdict(self.counts)

    # --- one record -> sequences -----------------------------------------------------------------

    def _sequences(self, record: dict) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if self.mode == "text":
            yield from self._text_windows(_string(record, self.fields[0]))
            return
        if self.mode == "prompt_response":
            ids, learned = self._prompt_response(_string(record, self.fields[0], allow_empty=True),
                                                 _string(record, self.fields[1]))
        else:
            ids, learned = self._conversation(_messages(record, self.fields[0]))
        yield self._fit(np.asarray(ids, np.int32), np.asarray(learned, bool))

    def _text_windows(self, text: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        ids = np.asarray(self.tokenizer(text)["input_ids"] + [self.tokenizer.eos_token_id], np.int32)
        if len(ids) < 2:
            raise _BadRecord("the text has no token")
        step = self.max_len - 1
        for start in range(0, max(len(ids) - 1, 1), step):
            window = ids[start:start + self.max_len]
            yield window, sequence_mask(np.ones(len(window), bool))
            if self.truncate:
                return

    def _prompt_response(self, prompt: str, response: str) -> tuple[list[int], list[bool]]:
        prompt_ids = self.tokenizer(prompt)["input_ids"] if prompt else []
        response_ids = self.tokenizer(response, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
        return prompt_ids + response_ids, [False] * len(prompt_ids) + [True] * len(response_ids)

    def _conversation(self, messages: list[dict]) -> tuple[list[int], list[bool]]:
        spans, text = _assistant_spans(self.tokenizer, messages)
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        learned = [any(end > a and start < b for a, b in spans) for start, end in encoding["offset_mapping"]]
        return encoding["input_ids"], learned

    def _fit(self, ids: np.ndarray, learned: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Apply max_len (refuse or truncate) and turn learned tokens into the loss mask."""
        if len(ids) > self.max_len:
            if not self.truncate:
                raise _BadRecord(f"{len(ids)} tokens exceed max_len={self.max_len} "
                                 "(truncate=True / --truncate cuts it)")
            ids, learned = ids[:self.max_len], learned[:self.max_len]
        mask = sequence_mask(learned)
        if not mask.any():
            raise _BadRecord(f"no learned token within the first {self.max_len} tokens" if len(ids) == self.max_len
                             else "no learned token")
        return ids, mask


# --- checks and helpers -----------------------------------------------------------------------------


def _check_mode(text_field, prompt_field, response_field, messages_field) -> tuple[str, tuple[str, ...]]:
    given = {"text_field": text_field, "prompt_field": prompt_field, "response_field": response_field,
             "messages_field": messages_field}
    for name, value in given.items():
        if value is not None and not (isinstance(value, str) and value):
            raise ValueError(f"{name} must be a non-empty field name, got {value!r}")
    if (prompt_field is None) != (response_field is None):
        raise ValueError("prompt_field and response_field go together; got only "
                         + ("prompt_field" if response_field is None else "response_field"))
    modes = [m for m, on in (("text", text_field), ("prompt_response", prompt_field), ("messages", messages_field))
             if on is not None]
    if len(modes) != 1:
        raise ValueError("give exactly one of text_field, prompt_field + response_field, messages_field; got "
                         + (", ".join(n for n, v in given.items() if v is not None) or "none"))
    fields = {"text": (text_field,), "prompt_response": (prompt_field, response_field),
              "messages": (messages_field,)}[modes[0]]
    return modes[0], fields


def _check_chat_tokenizer(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"the tokenizer ({type(tokenizer).__name__}) has no chat template, which messages_field "
                         "needs; use a tokenizer whose tokenizer_config.json has a chat_template")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"messages_field needs a fast tokenizer (character offsets), got {type(tokenizer).__name__}")


def _open(path: Path, cache_dir):
    """The source as a ``datasets.Dataset`` (memory-mapped Arrow)."""
    import datasets

    if path.is_dir():
        try:
            dataset = datasets.load_from_disk(str(path))
        except FileNotFoundError as e:
            raise ValueError(f"{path}: not a directory written by datasets save_to_disk ({e})") from None
        if isinstance(dataset, datasets.DatasetDict):
            raise ValueError(f"{path} holds a DatasetDict (splits {list(dataset)}); pass one split's directory, "
                             f"e.g. {path / next(iter(dataset))}")
        return dataset
    suffix = path.suffix.lower()
    builder = "json" if suffix in _JSON_SUFFIXES else "parquet" if suffix == ".parquet" else None
    if builder is None:
        raise ValueError(f"data path {path}: expected a .jsonl/.json or .parquet file or a datasets directory")
    if not path.is_file():
        raise ValueError(f"data path {path} does not exist")
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train",
                                     cache_dir=None if cache_dir is None else str(cache_dir))
    except Exception as e:  # datasets wraps parser errors in its own types
        raise ValueError(f"cannot read {path} as {builder}: {e}") from None


def _string(record: dict, field: str, allow_empty: bool = False) -> str:
    value = record[field]
    if value is None:
        raise _BadRecord(f"field {field!r} is missing or null")
    if not isinstance(value, str):
        raise _BadRecord(f"field {field!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise _BadRecord(f"field {field!r} is empty")
    return value


def _messages(record: dict, field: str) -> list[dict]:
    messages = record[field]
    if messages is None:
        raise _BadRecord(f"field {field!r} is missing or null")
    if not isinstance(messages, list) or not messages:
        raise _BadRecord(f"field {field!r} must be a non-empty list of {{role, content}}, got "
                         f"{type(messages).__name__}")
    clean = []
    for turn, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise _BadRecord(f"message {turn} must be {{role: str, content: str}}, got {message!r:.80}")
        if message["role"] == "assistant" and not message["content"].strip():
            raise _BadRecord(f"message {turn} is an empty assistant turn")
        clean.append({key: value for key, value in message.items() if value is not None})  # Arrow fills absent keys
    if not any(m["role"] == "assistant" for m in clean):
        raise _BadRecord("the conversation has no assistant turn")
    return clean


def _assistant_spans(tokenizer, messages: list[dict]) -> tuple[list[tuple[int, int]], str]:
    """Character spans of the assistant turns in the rendered conversation, and that text."""
    def render(turns, generation_prompt=False) -> str:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)

    try:
        text = render(messages)
        spans = []
        for turn, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before, through = render(messages[:turn], True), render(messages[:turn + 1])
            if not (through.startswith(before) and text.startswith(through)):
                raise _BadRecord(f"the chat template is not prefix-stable at message {turn} (rendering the first "
                                 f"{turn + 1} messages is not a prefix of the whole conversation), so the assistant "
                                 "tokens cannot be located")
            spans.append((len(before), len(through)))
    except _BadRecord:
        raise
    except Exception as e:  # template errors (jinja2 exceptions, raise_exception in the template)
        raise _BadRecord(f"the chat template failed: {type(e).__name__}: {e}") from None
    return spans, text
