"""Teacher shards: capture a teacher's top-k (or sampled) targets once, store them safely, stream them fast.

    with ShardWriter(directory, vocab_size=V, k=64) as writer:      # kdfast.capture does this for you
        writer.add(tokens, indices, values, tail)                   # [L], [L, k], [L, k], [L]
        writer.add(tokens, indices, values, tail, mask=learned)     # [L] bool; targets [R, k] or [L, k]
    shards = open_shards(directory)                                 # O(1) per shard; ShardError on damage
    shards.verify()                                                 # every byte
    dataset = ShardDataset(directory, seed=0, rank=r, world_size=w) # tensors for kd_loss, verified reads
    dataset = ShardDataset(directory, compact=True)                 # teacher rows of learned positions only

The byte-level format (version 2; version 1 is still read) and exactly what is guaranteed are
documented in docs/shard-format.md.
"""
from kdfast.shards.dataset import IGNORE_INDEX, ShardDataset, ShardSampler
from kdfast.shards.format import ShardError
from kdfast.shards.reader import (LearnedRows, SequenceArrays, ShardFile, ShardSet, load_manifest, open_shards,
                                  verify_shards)
from kdfast.shards.writer import ShardWriter

__all__ = [
    "ShardWriter", "open_shards", "verify_shards", "load_manifest", "ShardSet", "ShardFile", "SequenceArrays",
    "LearnedRows", "ShardDataset", "ShardSampler", "ShardError", "IGNORE_INDEX",
]
