"""The tiny, offline setting the recipes in docs/recipes.md run in: models built from configs, a
synthetic token pattern, a word-level tokenizer. Nothing is downloaded; a CPU runs each recipe in
seconds. Swap in your own models, data and tokenizer; the recipes' loss code stays the same."""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB = 128
EOS = VOCAB - 1  # also the padding token; pattern tokens are 0 .. VOCAB - 2
SEQ_LEN = 32
TEACHER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
STUDENT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)


def llama(size: dict, seed: int) -> LlamaForCausalLM:
    """A Llama causal LM of ``size`` (TEACHER or STUDENT) built from a config, initialized from ``seed``."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=2 * SEQ_LEN, tie_word_embeddings=True,
                         num_key_value_heads=size["num_attention_heads"], bos_token_id=EOS, eos_token_id=EOS,
                         pad_token_id=EOS, **size)
    return LlamaForCausalLM(config)


def pattern_tokens(count: int, seed: int, length: int = SEQ_LEN) -> torch.Tensor:
    """[count, length] int64: arithmetic progressions modulo VOCAB - 1, each with its own start and stride
    (1, 2, 3 or 5), so the next token follows from the two before it."""
    generator = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB - 1, (count, 1), generator=generator)
    stride = torch.tensor([1, 2, 3, 5])[torch.randint(0, 4, (count, 1), generator=generator)]
    return (start + stride * torch.arange(length)) % (VOCAB - 1)


def train_teacher(model: LlamaForCausalLM, tokens: torch.Tensor, steps: int = 60, seed: int = 0) -> LlamaForCausalLM:
    """A few AdamW steps of next-token training on random batches of ``tokens``; returns the model in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        batch = tokens[torch.randint(0, len(tokens), (16,), generator=generator)]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model.eval()


def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose ids are the pattern tokens: "t0" .. "t126", and "<eos>" (padding too)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(VOCAB - 1)} | {"<eos>": EOS}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=words, eos_token="<eos>", pad_token="<eos>")
