"""Tiny, seeded, offline models for tests, examples and quick experiments.

Nothing here downloads: the tokenizer is a byte-level BPE trained in-process
on a fixed text, the model is a randomly initialised Llama from a seeded
generator. Same arguments, same files.
"""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_WORDS = ("the quick brown fox jumps over a lazy dog while paris is the capital of france and "
          "rome of italy models compress weights into fewer bits so that latency drops on every "
          "device from a phone to a large accelerator").split()


def tiny_corpus(n_lines: int = 400, seed: int = 0) -> list[str]:
    """Deterministic pseudo-English lines from a small word list."""
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 20))) + "." for _ in range(n_lines)]


def tiny_tokenizer(vocab_size: int = 384):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with chat template, built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(tiny_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
        unk_token="<|endoftext|>", pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE,
    )


def tiny_llama_config(vocab_size: int = 256, **overrides):
    """A small ``LlamaConfig``: 4 layers, hidden 64, 4 query / 2 kv heads, MLP 128."""
    from transformers import LlamaConfig

    kw = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
              pad_token_id=0, rope_theta=10000.0)
    kw.update(overrides)
    return LlamaConfig(**kw)


def tiny_llama(config=None, seed: int = 0):
    """A randomly initialised ``LlamaForCausalLM`` (float32, eval mode) from a seed."""
    import torch
    from transformers import AutoModelForCausalLM

    config = config or tiny_llama_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def save_tiny_llama(directory: str | Path, seed: int = 0, **config_overrides) -> Path:
    """Write a tiny Llama (config, safetensors, tokenizer) to ``directory`` and return it."""
    directory = Path(directory)
    tokenizer = tiny_tokenizer()
    config = tiny_llama_config(vocab_size=len(tokenizer), **config_overrides)
    model = tiny_llama(config, seed=seed)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def trained_tiny_llama(steps: int = 200, seq_len: int = 32, seed: int = 0):
    """A tiny Llama trained for ``steps`` Adam steps on :func:`tiny_corpus` (seconds on a CPU), and its tokenizer.

    A random model's outputs are near uniform, so quantization barely changes them; a trained
    one has structure to lose and to recover, as a real model does. Returns ``(model, tokenizer,
    ids)`` with ``ids`` ``[N, seq_len]``: sequences of the corpus (the last 400 lines, not trained on).
    """
    import torch

    tokenizer = tiny_tokenizer()
    model = tiny_llama(tiny_llama_config(vocab_size=len(tokenizer)), seed=seed).train()

    def rows(lines: list[str]) -> torch.Tensor:
        flat = [t for line in lines for t in tokenizer(line + " ")["input_ids"]]
        n = len(flat) // seq_len
        return torch.tensor(flat[: n * seq_len]).view(n, seq_len)

    train, held = rows(tiny_corpus(2000, seed)), rows(tiny_corpus(400, seed + 1))
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(steps):
            batch = train[torch.randint(len(train), (16,), generator=gen)]
            loss = model(input_ids=batch, labels=batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval(), tokenizer, held
