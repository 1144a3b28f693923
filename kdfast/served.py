"""A served teacher: top-k next-token log-probs from a vLLM OpenAI-compatible completions endpoint.

One request per sequence s [L] (token ids), ``POST {url}/completions`` with
``{"model": M, "prompt": s + [s[-1]], "max_tokens": 1, "temperature": 0, "prompt_logprobs": k}``.
vLLM answers ``choices[0].prompt_logprobs``: one entry per prompt token, ``null`` for the first,
then for prompt position j >= 1 a dict ``{"<token id>": {"logprob", "rank", "decoded_token"}}``
holding the k most likely tokens computed from the logits at position j - 1 plus the actual
token at j (k + 1 entries when it is not among the k, k when it is). Entry j + 1 is therefore
stored position j (the distribution of token j + 1, as ``kdfast.capture`` stores it); the one
appended token makes the last position's distribution a prompt log-prob too, computed in the same
forward pass as the others.

Per position, from what the server returned (no second guess):

- indices [k]: the returned ids less the actual token when it came extra, ordered by log-prob
  (descending; equal log-probs by id); values [k]: their log-probs (vLLM: ``log_softmax`` of the
  float32 logits; it sends -inf as -9999.0, stored as id -1 and -inf like a local capture);
- tail: ``log(1 - sum_i exp(values_i))`` in float64 (``log1p``), -inf when the sum is >= 1.

vLLM computes prompt log-probs from the raw logits (sampling parameters such as the temperature do
not reach them), so a served capture is at temperature 1. A response whose entry count, ids or
values do not fit the request raises ServerError naming the request: never a wrong row.

Generation (``ServedTeacher.generate``, for ``kdfast generate``): one request per prompt with
``max_tokens``, the sampling settings, a per-request ``seed``, ``logprobs: k`` and
``return_tokens_as_token_ids``; vLLM answers ``choices[0].logprobs`` with the generated tokens as
``token_id:N`` and per token its top-k log-probs (plus the token itself when it is not among them,
read by ``row_targets`` like a prompt entry), computed from the raw logits of the step that chose it.

Transport: the standard library only (``urllib`` in a thread pool: each request waits on the
server, not on Python). Timeouts, connection failures, 429 and 5xx are retried ``retries`` times
with exponential backoff; other HTTP errors fail at once with the server's message.
"""
from __future__ import annotations

import http.client
import json
import math
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["ServedTeacher", "ServerError", "Generated", "row_targets"]

_NEG_INF_SENT = -9999.0  # vLLM's JSON stand-in for a -inf log-prob (clamp_prompt_logprobs)
_PROBE_LOGPROBS = 1 << 30  # refused by every server; the refusal names its max_logprobs
_MAX_ALLOWED = re.compile(r"greater than max allowed: (\d+)")
_OUT_OF_VOCAB = "out of vocabulary"
_VOCAB_SIZE = re.compile(r"out-of-vocab token ids\. Vocabulary size: (\d+)")
_TOKENIZER_PROBE = "The quick brown fox jumps over the lazy dog. 0123456789 Ünïcødé 漢字 🙂\n\tx = f(y)"


@dataclass
class Generated:
    """One generated response: its token ids [R] int32 (the EOS last when ``finish_reason`` is "stop") and,
    for each of them, the teacher's top-k ids [R, k] int32, log-probs [R, k] float32 and tail [R] float32
    at the position that chose it; ``finish_reason`` "stop" (EOS) or "length" (max_new_tokens)."""

    ids: np.ndarray
    indices: np.ndarray
    values: np.ndarray
    tail: np.ndarray
    finish_reason: str


class ServerError(OSError):
    """The teacher server is unreachable, failed, or answered something that is not a valid response."""


class _HTTPStatus(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message = status, message


class ServedTeacher:
    """Top-k log-probs of ``model`` served at ``url`` (".../v1"), many requests in flight.

    ``ServedTeacher(url, model, k=k)`` checks the server at once (reachable, serves ``model``,
    allows k log-probs, answers a probe in the expected format) and finds its vocabulary size (the
    logits' width). ``topk(tokens)`` returns the targets of a batch of sequences;
    ``identity`` describes the server for the manifest.
    """

    def __init__(self, url: str, model: str, *, k: int, concurrency: int = 8, timeout: float = 300.0,
                 retries: int = 4, backoff: float = 0.5):
        if not (isinstance(k, int) and k >= 1):
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if concurrency < 1 or retries < 0 or timeout <= 0 or backoff < 0:
            raise ValueError(f"concurrency must be >= 1, retries >= 0, timeout > 0 and backoff >= 0, got "
                             f"{concurrency}, {retries}, {timeout} and {backoff}")
        self.url, self.model, self.k = url.rstrip("/"), model, k
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        served = self._served_model()
        self.max_model_len = served.get("max_model_len")
        self.max_logprobs = self._max_logprobs()
        if self.max_logprobs < k:
            raise ValueError(f"teacher server {self.url} allows at most {self.max_logprobs} log-probs per position "
                             f"(vLLM --max-logprobs), fewer than k={k}; restart it with --max-logprobs {k} or lower k")
        self.vocab_size = self._vocab_size()
        if k > self.vocab_size:
            raise ValueError(f"k={k} exceeds the served teacher's vocabulary of {self.vocab_size}")
        self.identity = {"type": "served", "name": model, "root": served.get("root"), "engine": "vllm",
                         "version": self._version(), "max_logprobs": self.max_logprobs,
                         "max_model_len": self.max_model_len, "vocab_size": self.vocab_size}
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="kdfast-served")
        self.topk(np.zeros((1, 2), np.int64))  # the response format, before any row is written

    # --- targets ---------------------------------------------------------------------------------

    def topk(self, tokens: np.ndarray, first_index: int = 0):  # tokens: [B, L]
        """Top-k ids [B, L, k] int32, log-probs [B, L, k] float32 and tail [B, L] float32 of each sequence.

        ``first_index`` is the index of ``tokens[0]`` in the capture, used to name failed requests.
        """
        tokens = np.asarray(tokens)
        if tokens.ndim != 2 or 0 in tokens.shape:
            raise ValueError(f"tokens must be [B, L] with B, L >= 1, got shape {tokens.shape}")
        if tokens.min() < 0 or tokens.max() >= self.vocab_size:  # a server may not check: its engine would die
            raise ValueError(f"token ids span [{tokens.min()}, {tokens.max()}], outside the served teacher's "
                             f"vocabulary [0, {self.vocab_size})")
        if self.max_model_len is not None and tokens.shape[1] + 2 > self.max_model_len:
            raise ValueError(f"sequences of {tokens.shape[1]} tokens need a server max-model-len of at least "
                             f"{tokens.shape[1] + 2} (the sequence, one appended token, one generated); "
                             f"{self.url} serves {self.max_model_len}")
        rows = list(self._pool.map(self._sequence, [row.tolist() for row in tokens],
                                   range(first_index, first_index + len(tokens))))
        return tuple(np.stack(parts) for parts in zip(*rows))

    def _sequence(self, ids: list[int], index: int):
        what = f"sequence {index}"
        body = {"model": self.model, "prompt": ids + ids[-1:], "max_tokens": 1, "temperature": 0,
                "prompt_logprobs": self.k}
        response = self._post("/completions", body, what)
        try:
            entries = response["choices"][0]["prompt_logprobs"]
        except (KeyError, IndexError, TypeError):
            raise ServerError(f"{self.url}/completions ({what}): the response has no choices[0].prompt_logprobs "
                              f"(is this a vLLM server?): {str(response)[:200]}") from None
        if not isinstance(entries, list) or len(entries) != len(ids) + 1:
            raise ServerError(f"{self.url}/completions ({what}): expected {len(ids) + 1} prompt_logprobs entries, "
                              f"got {len(entries) if isinstance(entries, list) else type(entries).__name__}")
        targets = [row_targets(entries[j + 1], body["prompt"][j + 1], self.k, self.vocab_size,
                               f"{self.url}/completions ({what}, position {j})") for j in range(len(ids))]
        return tuple(np.stack(parts) for parts in zip(*targets))

    # --- generation ------------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], seeds: list[int], names: list[str], *, max_new_tokens: int,
                 temperature: float, top_p: float) -> list[Generated]:
        """The server's response to each prompt (token ids), with the top-k log-probs of every generated token.

        One completions request per prompt (``logprobs=k``, token ids as ``token_id:N``), sampled at
        ``temperature`` (0 = greedy) and ``top_p`` with the request's own ``seed``, every other sampling
        parameter neutral (top_k 0, min_p 0, no penalties) so that the server's generation defaults do
        not apply. The log-probs are vLLM's default ``raw_logprobs``: the teacher's distribution at
        temperature 1, whatever the sampling temperature. ``names`` name the requests in errors.
        """
        requests = [{"model": self.model, "prompt": ids, "max_tokens": max_new_tokens, "temperature": temperature,
                     "top_p": top_p, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0,
                     "frequency_penalty": 0.0, "seed": seed, "logprobs": self.k, "return_tokens_as_token_ids": True}
                    for ids, seed in zip(prompts, seeds)]
        return list(self._pool.map(self._generated, requests, names))

    def _generated(self, body: dict, name: str) -> Generated:
        what = f"{self.url}/completions ({name})"
        response = self._post("/completions", body, name)
        try:
            choice = response["choices"][0]
            finish_reason, logprobs = choice["finish_reason"], choice.get("logprobs")
        except (KeyError, IndexError, TypeError):
            raise ServerError(f"{what}: the response has no choices[0].finish_reason: {str(response)[:200]}") from None
        if finish_reason not in ("stop", "length"):
            raise ServerError(f"{what}: finish_reason {finish_reason!r}, expected 'stop' or 'length'")
        if not (isinstance(logprobs, dict) and isinstance(logprobs.get("tokens"), list) and logprobs["tokens"]
                and isinstance(logprobs.get("top_logprobs"), list)
                and len(logprobs["top_logprobs"]) == len(logprobs["tokens"])):
            raise ServerError(f"{what}: the response has no log-probs of the generated tokens (asked logprobs="
                              f"{self.k}; is this a vLLM server?): {str(choice)[:200]}")
        ids = [_token_id(token, what) for token in logprobs["tokens"]]
        rows = [row_targets({_token_id(token, what): {"logprob": value} for token, value in (entry or {}).items()},
                            ids[j], self.k, self.vocab_size, f"{what}, generated token {j}")
                for j, entry in enumerate(logprobs["top_logprobs"])]
        indices, values, tail = (np.stack(parts) for parts in zip(*rows))
        return Generated(np.array(ids, np.int32), indices, values, tail, finish_reason)

    # --- server checks ---------------------------------------------------------------------------

    def _served_model(self) -> dict:
        listing = self._get("/models", retry=False)
        models = listing.get("data") if isinstance(listing, dict) else None
        if not isinstance(models, list):
            raise ServerError(f"{self.url}/models: not an OpenAI model list: {str(listing)[:200]}")
        for entry in models:
            if isinstance(entry, dict) and entry.get("id") == self.model:
                return entry
        raise ValueError(f"teacher server {self.url} does not serve model {self.model!r}; it serves "
                         f"{[entry.get('id') for entry in models if isinstance(entry, dict)]}")

    def _max_logprobs(self) -> int:
        """vLLM refuses more prompt log-probs than --max-logprobs and names the limit in the refusal."""
        body = {"model": self.model, "prompt": [0], "max_tokens": 1, "prompt_logprobs": _PROBE_LOGPROBS}
        try:
            self._post("/completions", body, "max-logprobs probe")
        except _HTTPStatus as e:
            found = _MAX_ALLOWED.search(e.message)
            if e.status == 400 and found:
                return int(found.group(1))
            raise ServerError(f"{self.url}/completions (max-logprobs probe): {e}") from None
        raise ServerError(f"{self.url}/completions (max-logprobs probe): accepted prompt_logprobs={_PROBE_LOGPROBS}; "
                          f"cannot tell the server's max logprobs")

    def _vocab_size(self) -> int:
        """The model's vocabulary (its logits' width), as the server reports it.

        vLLM refuses ``logprob_token_ids`` outside the vocabulary in its API layer and names the size.
        A server without that parameter is asked which prompt ids it accepts (bisection; vLLM refuses
        larger ids as out of vocabulary), but only when it has a tokenizer: without one (vLLM
        ``--skip-tokenizer-init``) it does not check prompt ids, and a bad one kills its engine.
        """
        body = {"model": self.model, "prompt": [0], "max_tokens": 1, "logprobs": 1, "logprob_token_ids": [-1]}
        try:
            self._post("/completions", body, "vocabulary probe")
        except _HTTPStatus as e:
            found = _VOCAB_SIZE.search(e.message)
            if e.status == 400 and found:
                return int(found.group(1))
        try:
            self._post("/tokenize", {"model": self.model, "prompt": "a"}, "tokenizer probe", root=True)
        except (_HTTPStatus, ServerError):
            raise ServerError(f"teacher server {self.url} reports neither its vocabulary size (logprob_token_ids) "
                              f"nor has a tokenizer (/tokenize) to check prompt ids with") from None
        return self._accepted_ids()

    def _accepted_ids(self) -> int:
        """The number of prompt ids the server accepts: a refused one by doubling, then bisection."""
        low, high = 0, 1  # low accepted (0 always is), high to test
        while self._accepts(high):
            low, high = high, high * 2
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if self._accepts(middle) else (low, middle)
        return high

    def _accepts(self, token_id: int) -> bool:
        try:
            self._post("/completions", {"model": self.model, "prompt": [token_id], "max_tokens": 1},
                       f"vocabulary probe (token id {token_id})")
        except _HTTPStatus as e:
            if e.status == 400 and _OUT_OF_VOCAB in e.message:
                return False
            raise ServerError(f"{self.url}/completions (vocabulary probe, token id {token_id}): {e}") from None
        return True

    def _version(self) -> str | None:
        """vLLM reports its version at /version beside /v1; None when the server does not."""
        try:
            version = self._get("/version", root=True).get("version")
        except (_HTTPStatus, ServerError, AttributeError):
            return None
        return str(version) if version is not None else None

    def check_tokenizer(self, directory: str | Path) -> None:
        """The server's tokenizer splits a probe text (fixed text plus words from all over the local
        vocabulary) into the same ids as the local tokenizer in ``directory``."""
        from transformers import AutoTokenizer

        local = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        spread = np.linspace(0, len(local) - 1, 64).astype(int).tolist()  # words from all over the vocabulary
        text = _TOKENIZER_PROBE + " " + local.decode(spread, skip_special_tokens=True)
        expected = local(text, add_special_tokens=False)["input_ids"]
        try:
            served = self._post("/tokenize", {"model": self.model, "prompt": text,
                                              "add_special_tokens": False}, "tokenizer probe", root=True)["tokens"]
        except (_HTTPStatus, KeyError, TypeError) as e:
            raise ServerError(f"{self.url}: cannot compare tokenizers, /tokenize failed: {e}") from None
        if served != expected or len(local) > self.vocab_size:
            raise ValueError(f"teacher server {self.url} tokenizes differently from the tokenizer {directory} "
                             f"(probe text -> {served[:8]}... vs {expected[:8]}...; vocabularies {self.vocab_size} "
                             f"vs {len(local)})")

    # --- transport -------------------------------------------------------------------------------

    def _get(self, path: str, *, root: bool = False, retry: bool = True):
        return self._call(urllib.request.Request(self._address(path, root)), f"GET {path}", retry)

    def _post(self, path: str, body: dict, what: str, *, root: bool = False):
        request = urllib.request.Request(self._address(path, root), data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        return self._call(request, what, retry=True)

    def _address(self, path: str, root: bool) -> str:
        return (self.url.removesuffix("/v1") if root else self.url) + path

    def _call(self, request: urllib.request.Request, what: str, retry: bool):
        """The JSON answer; retried on timeouts, connection errors, 429 and 5xx. Other HTTP errors raise
        _HTTPStatus (the caller knows which refusals it expects); exhausted retries raise ServerError."""
        attempts = self.retries + 1 if retry else 1
        for attempt in range(attempts):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    payload = response.read()
                break
            except urllib.error.HTTPError as e:
                failure = _HTTPStatus(e.code, _error_message(e))
                if e.code != 429 and e.code < 500:
                    raise failure from None
            except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as e:
                failure = e
            if attempt + 1 < attempts:
                time.sleep(self.backoff * 2 ** attempt)
        else:
            raise ServerError(f"teacher server {request.full_url} ({what}): failed after {attempts} attempt(s): "
                              f"{getattr(failure, 'reason', failure)}")
        try:
            return json.loads(payload)
        except ValueError:
            raise ServerError(f"{request.full_url} ({what}): the response is not JSON: {payload[:200]!r}") from None

    def close(self) -> None:
        self._pool.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _error_message(error: urllib.error.HTTPError) -> str:
    """The message of an OpenAI-style error body, or the raw body."""
    body = error.read().decode("utf-8", "replace")
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body[:500]


def _token_id(token, what: str) -> int:
    """The id in a ``token_id:N`` string (vLLM's return_tokens_as_token_ids)."""
    if not (isinstance(token, str) and token.startswith("token_id:") and token[9:].isdigit()):
        raise ServerError(f"{what}: expected tokens as 'token_id:N' (return_tokens_as_token_ids), got {token!r:.40}")
    return int(token[9:])


def row_targets(entry, actual: int, k: int, vocab_size: int, what: str):
    """One position's (ids [k] int32, log-probs [k] float32, tail float32) from a prompt_logprobs entry.

    ``entry`` maps token ids (JSON strings) to ``{"logprob": float, ...}``; ``actual`` is the prompt
    token at that position, which vLLM adds when it is not among the k most likely.
    """
    if not isinstance(entry, dict):
        raise ServerError(f"{what}: expected a dict of {k} or {k + 1} log-probs, got {type(entry).__name__}")
    try:
        logprobs = {int(token): float(value["logprob"]) for token, value in entry.items()}
    except (ValueError, KeyError, TypeError):
        raise ServerError(f"{what}: entries must map token ids to {{'logprob': float}}: {str(entry)[:200]}") from None
    if len(logprobs) == k + 1 and actual in logprobs:
        del logprobs[actual]
    if len(logprobs) != k or (len(entry) == k and actual not in logprobs):
        raise ServerError(f"{what}: expected the top {k} log-probs and the actual token {actual}, got "
                          f"{len(entry)} entries {sorted(logprobs)[:8]}")
    ordered = sorted(logprobs.items(), key=lambda item: (-item[1], item[0]))
    ids = np.array([token for token, _ in ordered], np.int64)
    values = np.array([value for _, value in ordered], np.float64)
    if ids.min() < 0 or ids.max() >= vocab_size or np.isnan(values).any() or values.max() > 0:
        raise ServerError(f"{what}: ids must lie in [0, {vocab_size}) and log-probs be <= 0, got ids "
                          f"[{ids.min()}, {ids.max()}] and log-probs up to {values.max()}")
    unset = values <= _NEG_INF_SENT
    values[unset], ids[unset] = -np.inf, -1
    mass = float(np.exp(values).sum())
    if mass > 1 + 1e-4:
        raise ServerError(f"{what}: the top-{k} probabilities sum to {mass} > 1: not log-probs (a server started "
                          f"with --logprobs-mode other than raw_logprobs / processed_logprobs?)")
    tail = math.log1p(-mass) if mass < 1 else -math.inf
    return ids.astype(np.int32), values.astype(np.float32), np.float32(tail)
