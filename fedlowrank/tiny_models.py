"""Tiny causal LMs built from configs (random weights: no download needed) with a character tokenizer, saved as
local model folders that ``fedlowrank`` loads like any Hugging Face model; and a deterministic GSM8K-shaped task.

For tests, benchmarks (throughput does not depend on the weights) and trying the causal-LM path offline."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARACTERS = [chr(c) for c in range(32, 127)] + ["\n"]
FAMILIES = ("llama", "qwen2", "mistral", "gpt2", "gpt_neox")
BOS_FAMILIES = ("llama", "qwen2", "mistral")  # their tokenizers put a BOS before every text


def char_tokenizer(add_bos: bool) -> PreTrainedTokenizerFast:
    """One token per character; ``add_bos``: a Llama-style BOS before every text encoded with special tokens."""
    vocab = {token: index for index, token in enumerate(SPECIALS + CHARACTERS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def decoder_config(family: str, vocab_size: int, hidden: int = 64, layers: int = 2):
    # a larger initialisation than the 0.02 of pretraining recipes: with a frozen random output layer of that
    # scale, logits stay within ~±1 and no adapter can make the model confident of any token
    common = {"vocab_size": vocab_size, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    common["initializer_range"] = 0.3
    if family == "llama":
        return LlamaConfig(
            hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, **common,
        )  # fmt: skip
    if family in ("qwen2", "mistral"):
        config_class = Qwen2Config if family == "qwen2" else MistralConfig
        return config_class(
            hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, **common,
        )  # fmt: skip
    if family == "gpt_neox":
        return GPTNeoXConfig(
            hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
            max_position_embeddings=256, **common,
        )  # fmt: skip
    if family == "gpt2":
        return GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=256, **common)
    raise ValueError(f"unknown family {family!r}")


def save_tiny_decoder(family: str, folder: Path, seed: int = 0, hidden: int = 64, layers: int = 2) -> Path:
    """A config-built ``family`` model and its tokenizer (a BOS for Llama-style families, none for GPT-2/NeoX) in
    ``folder``; returns the folder."""
    from transformers import AutoModelForCausalLM

    tokenizer = char_tokenizer(add_bos=family in BOS_FAMILIES)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(decoder_config(family, len(tokenizer), hidden, layers))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def addition_rows(count: int, seed: int, addend: int | None = 1) -> list[dict[str, str]]:
    """GSM8K-shaped rows: ``question`` "What is a + b?" (a two-digit), ``answer`` "#### <a + b>".

    ``addend`` fixes b (the default, b = 1, is learnable by a 2-layer random-weight model's adapters in a few
    hundred steps: copy the tens, increment the ones, carry at 9); None draws b in 0..9 too."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b = rng.randrange(10, 99), addend if addend is not None else rng.randrange(10)
        rows.append({"question": f"What is {a} + {b}?", "answer": f"#### {a + b}"})
    return rows


def write_addition_task(folder: Path, train: int = 400, test: int = 40, addend: int | None = 1) -> Path:
    """``folder`` with train.jsonl and test.jsonl of ``addition_rows``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, count, seed in (("train", train, 0), ("test", test, 1)):
        lines = [json.dumps(row) for row in addition_rows(count, seed, addend)]
        (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return folder
