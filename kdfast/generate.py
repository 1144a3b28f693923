"""Distill from what the teacher writes (``kdfast generate``): the teacher answers prompts, and the
answers become a shard dataset in which only the answers are learned.

For each prompt record (``prompt_field``: a string, tokenized with the tokenizer's special tokens;
``messages_field``: a conversation rendered by the chat template with ``add_generation_prompt=True``)
the teacher generates ``samples_per_prompt`` responses of at most ``max_new_tokens`` tokens. Each
response becomes one sequence ``prompt + response`` (its EOS included when it stopped) whose learned
positions are exactly those predicting a response token (``kdfast.sources.sequence_mask``: the last
prompt position through the one before the last token), so training learns the response and its EOS.
The targets at a learned position come from the very forward pass that chose the next token:

- local Hugging Face teacher: ``model.generate(..., output_logits=True)``'s raw logits of that step,
  stored as ``topk_targets(logits / T)`` (the teacher's distribution at the sampling temperature T,
  before top-p; greedy decoding, T = 0, stores T = 1). Batches are left-padded; each batch samples
  from torch's generator seeded by (seed, batch index), so a run is deterministic for a seed and a
  batch size (on CPU, bit for bit).
- served teacher (vLLM): each request's ``logprobs=k`` of its generated tokens, vLLM's raw log-probs,
  i.e. the distribution at temperature 1 whatever T (recorded so); each request has its own seed.

``capture_temperature`` in the manifest is the temperature of the stored distribution; the sampling
settings are its ``generation`` record. The responses' texts go to ``responses.jsonl`` in the output
directory, line i describing sequence i (see docs/generate.md).

Resume: the shards are written by ``ShardWriter`` as ``kdfast capture`` writes them. Each batch's
JSONL lines are written and fsynced before its sequences reach the writer, so the JSONL always holds
at least the sequences of the finished shards; a rerun cuts it back to them and regenerates from the
batch holding the first missing response (the same batch with the same seed gives the same
responses), so the result equals an uninterrupted run's.
"""
from __future__ import annotations

import importlib
import inspect
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import xxhash
from tqdm import tqdm

from kdfast._backend import resolve_device
from kdfast.capture import (_CHUNK_ELEMENTS, _parse_dtype, _tokenizer_beside, load_teacher, tokenizer_identity,
                            topk_targets, transformers_progress_bars)
from kdfast.hf import left_padded
from kdfast.served import Generated, ServedTeacher
from kdfast.shards.writer import ShardWriter
from kdfast.sources import sequence_mask

__all__ = ["generate", "GenerateResult", "RESPONSES", "load_prompts", "Prompt"]

log = logging.getLogger("kdfast.generate")

RESPONSES = "responses.jsonl"  # beside the shards: one line per stored sequence
_BLANK_CHECK = 1 << 20


# --- prompts ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """One prompt record: its index in the file, the record itself (what a filter sees), the prompt as
    written (a string or the conversation's turns) and its token ids [P] int32 as the teacher sees them."""

    index: int
    record: dict
    prompt: str | list
    ids: np.ndarray


class _BadPrompt(ValueError):
    """A record that cannot become a prompt (named with the file and record index by load_prompts)."""


def load_prompts(path: str | Path, tokenizer, *, prompt_field: str | None = None,
                 messages_field: str | None = None, cache_dir: str | Path | None = None) -> tuple[list[Prompt], dict]:
    """The prompts of a .jsonl / .parquet file or datasets directory, and the source's manifest record.

    Exactly one of ``prompt_field`` (a string: ``tokenizer(prompt)`` with its special tokens) and
    ``messages_field`` (a list of ``{role, content}`` with at least one user turn, rendered by the chat
    template with ``add_generation_prompt=True`` and tokenized without special tokens, as
    ``kdfast.sources`` renders conversations). ValueError names the file and the bad record.
    """
    from kdfast.sources import _check_chat_tokenizer, _open

    if (prompt_field is None) == (messages_field is None):
        raise ValueError("give exactly one of prompt_field (--prompt-field) and messages_field (--messages-field)")
    field = prompt_field or messages_field
    if messages_field is not None:
        _check_chat_tokenizer(tokenizer)
    path = Path(path).resolve()
    if path.is_file() and _is_blank(path):
        raise ValueError(f"prompts file {path} is empty: no prompts to generate from")
    dataset = _open(path, cache_dir)
    if len(dataset) == 0:
        raise ValueError(f"prompts file {path} holds no records: no prompts to generate from")
    if field not in dataset.column_names:
        raise ValueError(f"{path}: no field {field!r}; the records have {dataset.column_names}")
    prompts = []
    for index, record in enumerate(dataset):
        try:
            if prompt_field is not None:
                prompt = _prompt_text(record, field)
                ids = tokenizer(prompt)["input_ids"]
            else:
                prompt = _prompt_turns(record, field)
                text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if not ids:
                raise _BadPrompt("the prompt has no token")
        except _BadPrompt as e:
            raise ValueError(f"{path} record {index}: {e}") from None
        prompts.append(Prompt(index, record, prompt, np.asarray(ids, np.int32)))
    identity = {"path": str(path), "mode": "prompt" if prompt_field is not None else "messages", "field": field,
                "records": len(dataset), "fingerprint": dataset._fingerprint}
    return prompts, identity


def _is_blank(path: Path) -> bool:
    """Whether the file holds only whitespace (read until its first other byte)."""
    with open(path, "rb") as f:
        while chunk := f.read(_BLANK_CHECK):
            if chunk.strip():
                return False
    return True


def _prompt_text(record: dict, field: str) -> str:
    value = record[field]
    if not isinstance(value, str):
        raise _BadPrompt(f"field {field!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise _BadPrompt(f"field {field!r} is empty")
    return value


def _prompt_turns(record: dict, field: str) -> list[dict]:
    turns = record[field]
    if not isinstance(turns, list) or not turns:
        raise _BadPrompt(f"field {field!r} must be a non-empty list of {{role, content}}, got {type(turns).__name__}")
    clean = []
    for turn, message in enumerate(turns):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise _BadPrompt(f"message {turn} must be {{role: str, content: str}}, got {message!r:.80}")
        clean.append({key: value for key, value in message.items() if value is not None})  # Arrow fills absent keys
    if not any(message["role"] == "user" for message in clean):
        raise _BadPrompt(f"the conversation has no user turn (roles {[m['role'] for m in clean]})")
    return clean


def _check_fit(prompts: list[Prompt], path, max_new_tokens: int, context: int | None, vocab: int) -> None:
    """Every prompt's ids lie in the teacher's vocabulary, and the prompt plus max_new_tokens fit its context."""
    for prompt in prompts:
        if int(prompt.ids.max()) >= vocab:
            raise ValueError(f"{path} record {prompt.index}: token id {int(prompt.ids.max())} is outside the "
                             f"teacher's vocabulary [0, {vocab}) (a tokenizer of another model?)")
        if context is not None and len(prompt.ids) + max_new_tokens > context:
            raise ValueError(f"{path} record {prompt.index}: {len(prompt.ids)} prompt tokens + max_new_tokens "
                             f"{max_new_tokens} exceed the teacher's context of {context} tokens")


# --- teachers --------------------------------------------------------------------------------------


class _LocalTeacher:
    """A Hugging Face causal LM generating batches of prompts with model.generate; loaded on first use."""

    def __init__(self, directory: Path, device: torch.device, dtype: torch.dtype | None, tokenizer, k: int,
                 progress: bool):
        self.dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)  # capture's default
        self.identity = load_teacher(directory, device=device, dtype=self.dtype, progress=progress).identity
        config = json.loads((directory / "config.json").read_text())  # load_teacher checked that it exists
        text_config = config.get("text_config", {})  # multimodal models: the text model's settings
        self.vocab_size = config.get("vocab_size") or text_config.get("vocab_size")
        self.context = config.get("max_position_embeddings") or text_config.get("max_position_embeddings")
        self.eos_ids = _eos_ids(directory, config, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.directory, self.device, self.k, self.progress = directory, device, k, progress
        self.model = None

    def stored_temperature(self, temperature: float) -> float:
        """The temperature of the stored distribution: the sampling one (greedy: 1)."""
        return temperature if temperature > 0 else 1.0

    def load(self) -> None:
        """Load the model; its own generation defaults are replaced by none (sampling is exactly T and top-p)."""
        if self.model is None:
            from transformers import AutoModelForCausalLM, GenerationConfig

            with transformers_progress_bars(self.progress):
                model = AutoModelForCausalLM.from_pretrained(self.directory, local_files_only=True, dtype=self.dtype)
            model.generation_config = GenerationConfig()
            self.model = model.to(self.device).eval()

    def generate(self, prompts: list[np.ndarray], names: list[str], *, seed: int, batch: int, max_new_tokens: int,
                 temperature: float, top_p: float) -> list[Generated]:
        """One left-padded model.generate over the prompts of batch number ``batch``, sampling from torch's
        generator seeded by (seed, batch)."""
        from transformers import GenerationConfig

        self.load()
        input_ids, attention_mask = left_padded([torch.from_numpy(ids.astype(np.int64)) for ids in prompts],
                                                self.pad_id)  # [B, P]
        longest = input_ids.shape[1]
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 else \
            dict(do_sample=False)
        config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=self.eos_ids, pad_token_id=self.pad_id,
                                  output_logits=True, return_dict_in_generate=True, **sampling)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(_seed(seed, f"batch {batch}"))
            out = self.model.generate(input_ids=input_ids.to(self.device),
                                      attention_mask=attention_mask.to(self.device), generation_config=config)
        return [self._response(out.sequences[row, longest:], out.logits, row, self.stored_temperature(temperature))
                for row in range(len(prompts))]

    def _response(self, generated: torch.Tensor, logits: tuple[torch.Tensor, ...], row: int,
                  temperature: float) -> Generated:
        """Row ``row``'s response up to its first EOS (included) and the top-k targets of the steps that
        chose it, from ``logits`` (one [B, V] tensor of raw logits per generation step)."""
        ids = generated.cpu().numpy().astype(np.int32)
        stops = np.flatnonzero(np.isin(ids, self.eos_ids))
        finish_reason = "stop" if len(stops) else "length"
        ids = ids[:stops[0] + 1] if len(stops) else ids
        steps = torch.stack([step[row] for step in logits[:len(ids)]])  # [R, V]
        limit = _CHUNK_ELEMENTS.get(steps.device.type, _CHUNK_ELEMENTS["default"])
        chunks = [topk_targets(rows, self.k, temperature) for rows in steps.split(max(1, limit // steps.shape[-1]))]
        indices, values, tail = (torch.cat(parts).cpu().numpy() for parts in zip(*chunks))
        return Generated(ids, indices, values, tail, finish_reason)


def _eos_ids(directory: Path, config: dict, tokenizer) -> list[int]:
    """The ids that end a response, as transformers' generate picks them: generation_config.json's EOS
    (a chat model's end-of-turn among them), else config.json's, else the tokenizer's."""
    path = directory / "generation_config.json"
    candidates = (json.loads(path.read_text()).get("eos_token_id") if path.exists() else None,
                  config.get("eos_token_id"), tokenizer.eos_token_id)
    eos = next((candidate for candidate in candidates if candidate is not None), None)
    if eos is None:
        raise ValueError(f"the teacher {directory} defines no EOS token (generation_config.json, config.json, "
                         "tokenizer), so no response could ever stop")
    return [eos] if isinstance(eos, int) else list(eos)


class _Served:
    """A ServedTeacher generating each prompt in its own request (the server batches them)."""

    def __init__(self, teacher: ServedTeacher):
        self.teacher, self.identity = teacher, teacher.identity
        self.vocab_size, self.context = teacher.vocab_size, teacher.max_model_len

    def stored_temperature(self, temperature: float) -> float:
        """The temperature of the stored distribution: 1 (vLLM's raw log-probs), whatever the sampling one."""
        return 1.0

    def load(self) -> None:
        """Nothing to load: the server holds the model."""

    def generate(self, prompts: list[np.ndarray], names: list[str], *, seed: int, batch: int,
                 **sampling) -> list[Generated]:
        """Each request seeded by (seed, its name): its response does not depend on the batch."""
        seeds = [_seed(seed, name) for name in names]
        return self.teacher.generate([ids.tolist() for ids in prompts], seeds, names, **sampling)


def _seed(seed: int, name: str) -> int:
    """A 63-bit seed from the run's seed and a batch's or request's name."""
    return xxhash.xxh3_64_intdigest(f"{seed}:{name}".encode()) >> 1


# --- filters ---------------------------------------------------------------------------------------


def _load_filter(spec) -> tuple[Callable | None, str | None]:
    """(callable, name) of a ``filter(record, response_text) -> bool`` given as a callable or "module:function"."""
    if spec is None:
        return None, None
    if callable(spec):
        function, name = spec, f"{spec.__module__}.{spec.__qualname__}"
    else:
        module, _, attribute = str(spec).partition(":")
        try:
            function = getattr(importlib.import_module(module), attribute) if attribute else None
        except (ImportError, AttributeError) as e:
            raise ValueError(f"filter {spec!r}: cannot import it ({e})") from None
        if not callable(function):
            raise ValueError(f"filter {spec!r} is not a callable 'module:function'")
        name = str(spec)
    try:
        inspect.signature(function).bind({}, "")
    except TypeError:
        raise ValueError(f"filter {name!r} cannot be called as filter(prompt_record, response_text)") from None
    except ValueError:  # no introspectable signature: the first call will tell
        pass
    return function, name


# --- the run ---------------------------------------------------------------------------------------


@dataclass
class GenerateResult:
    """What a generate call did."""

    path: Path
    responses: Path  # the JSONL of the stored responses
    sequences: int  # in the finished dataset
    generated_sequences: int  # generated and stored by this call (0: already complete)
    dropped: int  # generated by this call and dropped by drop_unfinished / filter
    generated_tokens: int  # response tokens generated by this call, dropped ones included
    seconds: float  # generation (teacher) time of this call


def generate(prompts: str | Path, out_dir: str | Path, *, teacher, max_new_tokens: int,
             prompt_field: str | None = None, messages_field: str | None = None, samples_per_prompt: int = 1,
             temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, k: int = 64, batch_size: int = 8,
             device: str | None = None, dtype: str | None = None, tokenizer: str | Path | None = None,
             shard_tokens: int = 1 << 20, value_dtype: str = "float16", index_encoding: str = "int32",
             drop_unfinished: bool = False, filter=None, cache_dir: str | Path | None = None,
             progress: bool = True) -> GenerateResult:
    """Generate ``samples_per_prompt`` teacher responses per prompt into the shard directory ``out_dir``.

    prompts: a .jsonl / .parquet file or datasets directory with ``prompt_field`` (text) or
        ``messages_field`` (a conversation with a user turn) in each record.
    teacher: a local Hugging Face model directory (``device``, ``dtype`` as in ``kdfast.capture``;
        ``batch_size`` prompts per model.generate) or a ``kdfast.served.ServedTeacher`` opened with
        this ``k`` (``batch_size`` sequences per round of requests).
    tokenizer: the tokenizer directory (default: the teacher's directory); a served teacher's must
        tokenize as the server does (checked).
    temperature: 0 is greedy (one sample per prompt); otherwise sampling at ``temperature`` within
        nucleus ``top_p``. The stored distribution is at ``temperature`` (greedy: 1) for a local teacher,
        at 1 for a served one; the manifest's capture_temperature records it.
    drop_unfinished: leave out responses that reached max_new_tokens without EOS; ``filter``: a
        callable or "module:function" ``filter(prompt_record, response_text) -> bool`` (False drops).
    Rerunning with the same arguments after an interruption finishes the job; a finished directory
    is left as is; a directory holding a different dataset raises ValueError.
    """
    from transformers import AutoTokenizer

    _check_options(max_new_tokens, samples_per_prompt, temperature, top_p, seed, k, batch_size)
    served = isinstance(teacher, ServedTeacher)
    if not served and not (isinstance(teacher, (str, Path)) and Path(teacher).is_dir()):
        raise ValueError(f"teacher {teacher!r}: generate needs a local Hugging Face model directory (it runs "
                         "model.generate) or a ServedTeacher")
    tokenizer_dir = tokenizer
    if tokenizer_dir is None and not served:
        tokenizer_dir = _tokenizer_beside(teacher)
    if tokenizer_dir is None:
        raise ValueError("generate needs the tokenizer directory (tokenizer=, --tokenizer): "
                         + ("a served teacher's tokenizer is not local" if served else
                            f"the teacher directory {teacher} holds no tokenizer files"))
    if served:
        if teacher.k != k:
            raise ValueError(f"k={k} but the served teacher was opened with k={teacher.k}")
        teacher.check_tokenizer(tokenizer_dir)
    try:
        hf_tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"tokenizer {tokenizer_dir}: cannot load it ({e})") from None
    model = _Served(teacher) if served else _LocalTeacher(Path(teacher), resolve_device(device), _parse_dtype(dtype),
                                                         hf_tokenizer, k, progress)
    if k > model.vocab_size:
        raise ValueError(f"k={k} exceeds the teacher's vocabulary of {model.vocab_size}")
    records, source = load_prompts(prompts, hf_tokenizer, prompt_field=prompt_field, messages_field=messages_field,
                                   cache_dir=cache_dir)
    _check_fit(records, source["path"], max_new_tokens, model.context, model.vocab_size)
    keep, filter_name = _load_filter(filter)
    sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    metadata = {
        "teacher": model.identity, "tokenizer": tokenizer_identity(tokenizer_dir), "source": source,
        "capture": {"mode": "topk", "num_samples": None, "seed": seed},
        "generation": {**sampling, "samples_per_prompt": samples_per_prompt, "seed": seed, "batch_size": batch_size,
                       "drop_unfinished": drop_unfinished, "filter": filter_name, "responses": RESPONSES},
    }
    writer = ShardWriter(out_dir, vocab_size=model.vocab_size, k=k, kind="logprobs", value_dtype=value_dtype,
                         index_encoding=index_encoding, capture_temperature=model.stored_temperature(temperature),
                         shard_tokens=shard_tokens, metadata=metadata, resume=True)
    run = _GenerationRun(model, writer, records, hf_tokenizer, samples_per_prompt, batch_size, seed, sampling,
                         drop_unfinished, keep, filter_name, messages_field is not None)
    try:
        run.run(progress)
    finally:
        writer.close()
    return run.result()


def _check_options(max_new_tokens, samples_per_prompt, temperature, top_p, seed, k, batch_size) -> None:
    positive = {"max_new_tokens": max_new_tokens, "samples_per_prompt": samples_per_prompt, "k": k,
                "batch_size": batch_size}
    for name, value in positive.items():
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not (isinstance(seed, int) and seed >= 0):
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if not (temperature >= 0 and np.isfinite(temperature)):
        raise ValueError(f"temperature must be >= 0 and finite (0 = greedy), got {temperature!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if temperature == 0 and samples_per_prompt > 1:
        raise ValueError(f"temperature 0 is greedy: its {samples_per_prompt} samples per prompt would be identical")
    if temperature == 0 and top_p != 1:
        raise ValueError(f"top_p={top_p} applies to sampling; temperature 0 is greedy decoding")


class _GenerationRun:
    """Batches of (prompt, sample) items through the teacher into the JSONL and the writer, resuming
    after what the directory holds."""

    def __init__(self, model, writer: ShardWriter, prompts: list[Prompt], tokenizer, samples: int, batch_size: int,
                 seed: int, sampling: dict, drop_unfinished: bool, keep: Callable | None, filter_name: str | None,
                 chat: bool):
        self.model, self.writer, self.prompts, self.tokenizer = model, writer, prompts, tokenizer
        self.samples, self.batch_size, self.seed, self.sampling = samples, batch_size, seed, sampling
        self.drop_unfinished, self.keep, self.filter_name, self.chat = drop_unfinished, keep, filter_name, chat
        self.responses = writer.directory / RESPONSES
        self.generated, self.dropped, self.tokens, self.seconds = 0, 0, 0, 0.0

    def run(self, progress: bool) -> None:
        if self.writer.complete:
            return
        start = self._resume()
        self.model.load()
        items = len(self.prompts) * self.samples
        with open(self.responses, "a", encoding="utf-8") as journal, \
                tqdm(total=items, initial=start, unit="seq", desc="generate", disable=not progress) as bar:
            for first in range(start - start % self.batch_size, items, self.batch_size):
                batch = [divmod(item, self.samples) for item in range(first, min(first + self.batch_size, items))]
                responses = self._generate(batch, first // self.batch_size)
                stored = [(p, s, r) for (p, s), r in zip(batch, responses)
                          if p * self.samples + s >= start and self._kept(self.prompts[p], s, r)]
                self._store(journal, stored)
                bar.update(sum(p * self.samples + s >= start for p, s in batch))
                bar.set_postfix_str(f"{self.tokens / max(self.seconds, 1e-9):.0f} generated tok/s")
        if self.writer.num_sequences == 0:
            raise ValueError(f"every one of the {items} responses was dropped (drop_unfinished="
                             f"{self.drop_unfinished}, filter={self.filter_name!r}): there is nothing to store")
        self.writer.finish()

    def _resume(self) -> int:
        """Cut the JSONL back to the finished shards' sequences; returns the first item not yet processed."""
        stored = self.writer.num_sequences
        if stored:
            log.warning("%s: resuming after %d sequences", self.writer.directory, stored)
        last = _truncate_lines(self.responses, stored)
        return 0 if last is None else last["prompt_id"] * self.samples + last["sample_id"] + 1

    def _generate(self, batch: list[tuple[int, int]], number: int) -> list[Generated]:
        names = [f"prompt {p} sample {s}" for p, s in batch]
        began = time.perf_counter()
        responses = self.model.generate([self.prompts[p].ids for p, _ in batch], names, seed=self.seed, batch=number,
                                        **self.sampling)
        self.seconds += time.perf_counter() - began
        self.tokens += sum(len(r.ids) for r in responses)
        return responses

    def _kept(self, prompt: Prompt, sample: int, response: Generated) -> bool:
        keep = not (self.drop_unfinished and response.finish_reason == "length")
        if keep and self.keep is not None:
            verdict = self.keep(prompt.record, self._text(response))
            if not isinstance(verdict, (bool, np.bool_)):
                raise ValueError(f"filter {self.filter_name!r} returned {type(verdict).__name__} for prompt "
                                 f"{prompt.index} sample {sample}; it must return True (keep) or False (drop)")
            keep = bool(verdict)
        self.dropped += not keep
        return keep

    def _text(self, response: Generated) -> str:
        ids = response.ids[:-1] if response.finish_reason == "stop" else response.ids  # the text without its EOS
        return self.tokenizer.decode(ids.tolist())

    def _store(self, journal, stored: list[tuple[int, int, Generated]]) -> None:
        """The batch's JSONL lines (fsynced) first, then its sequences into the writer."""
        first = self.writer.num_sequences
        for offset, (p, s, response) in enumerate(stored):
            journal.write(json.dumps(self._line(first + offset, self.prompts[p], s, response)) + "\n")
        journal.flush()
        os.fsync(journal.fileno())
        for p, _, response in stored:
            prompt = self.prompts[p].ids
            tokens = np.concatenate([prompt, response.ids])
            learned = np.concatenate([np.zeros(len(prompt), bool), np.ones(len(response.ids), bool)])
            self.writer.add(tokens, response.indices, response.values, response.tail, mask=sequence_mask(learned))
            self.generated += 1

    def _line(self, sequence: int, prompt: Prompt, sample: int, response: Generated) -> dict:
        text = self._text(response)
        asked = {"messages": [*prompt.prompt, {"role": "assistant", "content": text}]} if self.chat else \
            {"prompt": prompt.prompt}
        return {"sequence": sequence, "prompt_id": prompt.index, "sample_id": sample, **asked, "response": text,
                "finish_reason": response.finish_reason, "response_tokens": len(response.ids)}

    def result(self) -> GenerateResult:
        return GenerateResult(self.writer.directory, self.responses, self.writer.num_sequences, self.generated,
                              self.dropped, self.tokens, self.seconds)


def _truncate_lines(path: Path, lines: int) -> dict | None:
    """Cut the JSONL at ``path`` to its first ``lines`` lines (fsynced); returns the last one kept (None: none)."""
    if not path.exists():
        if lines:
            raise ValueError(f"{path} is missing, but the shards beside it hold {lines} sequences; generate into "
                             "a new directory")
        return None
    line = b""
    with open(path, "r+b") as f:
        for count in range(lines):
            line = f.readline()
            if not line.endswith(b"\n"):
                raise ValueError(f"{path} holds {count} complete lines, fewer than the {lines} sequences of the "
                                 "shards beside it; generate into a new directory")
        f.truncate(f.tell())
        os.fsync(f.fileno())
    return json.loads(line) if lines else None
