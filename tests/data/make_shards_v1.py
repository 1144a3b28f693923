"""Write the format-version-1 fixtures with the version-1 kdfast.shards code and record what it reads back.

Kept to document how tests/data/shards-v1-* and their .npz files were made; it needs the version-1
code importable as ``kdfast_v1`` (from commit 1715d11: ``kdfast/shards/*.py`` and ``kdfast/_io.py``
with ``kdfast.`` imports renamed ``kdfast_v1.``), then: ``python tests/data/make_shards_v1.py tests/data``.
"""
import sys
from pathlib import Path

import numpy as np
import torch

from kdfast_v1.shards import ShardDataset, ShardWriter, open_shards

out = Path(sys.argv[1])
rng = np.random.default_rng(11)


def sequences(count, vocab, k, kind):
    support = np.sort(rng.choice(vocab, min(vocab, 64), replace=False))
    result = []
    for _ in range(count):
        length = int(rng.integers(5, 13))
        logits = torch.from_numpy(rng.standard_normal((length, len(support))) * 3).float()
        if kind == "logprobs":
            logprobs = torch.log_softmax(logits, -1)
            values, slots = logprobs.topk(k, -1)
            tail = torch.logsumexp(logprobs.scatter(-1, slots, float("-inf")), -1).numpy()
        else:
            probs = torch.softmax(logits, -1)
            values, slots = probs.topk(k, -1)
            values = values / values.sum(-1, keepdim=True)
            tail = None
        indices = support[slots.numpy()].astype(np.int32)
        indices[:, -1] = np.where(rng.random(length) < 0.3, -1, indices[:, -1])
        result.append((rng.integers(0, vocab, length), indices, values.numpy(), tail))
    return result


configs = {
    "uint8-packed": dict(vocab_size=70_000, k=4, value_dtype="uint8", index_encoding="packed", shard_tokens=24),
    "float16-int32-probs": dict(vocab_size=300, k=5, kind="probs", value_dtype="float16", index_encoding="int32",
                                shard_tokens=1000, metadata={
                                    "teacher": {"type": "callable", "name": "fixture:teacher"}, "tokenizer": None,
                                    "source": {"fingerprint": "0" * 16, "sequences": 4, "seq_len": 12},
                                    "capture": {"mode": "sampled", "num_samples": 5, "seed": 0}}),
}
for name, config in configs.items():
    directory = out / f"shards-v1-{name}"
    with ShardWriter(directory, **config) as writer:
        for tokens, indices, values, tail in sequences(6 if name == "uint8-packed" else 4, config["vocab_size"],
                                                       config["k"], config.get("kind", "logprobs")):
            writer.add(tokens, indices, values, tail)
    shards = open_shards(directory)
    shards.verify()
    dataset = ShardDataset(directory, shuffle=False)
    expected = {}
    for i in range(len(shards)):
        row = shards.read(i)
        for field in row._fields:
            expected[f"{i}.{field}"] = getattr(row, field)
        for key, value in dataset[i].items():
            expected[f"{i}.dataset.{key}"] = value.numpy()
    np.savez_compressed(out / f"shards-v1-{name}.npz", **expected)
    print(name, len(shards), len(shards.shards), shards.nbytes)
