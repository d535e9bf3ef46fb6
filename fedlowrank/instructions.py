"""Instruction tuning of causal LMs (``task = "causal-lm"``): rows become a prompt and a response, the loss is
on response tokens only, and the model is scored by response loss, perplexity and exact match of generated
answers (GSM8K: the number after ``####``).

Row formats, recognised by their columns (or named with ``data.prompt-column`` / ``data.response-column``):
- instruction/response columns, e.g. GSM8K's ``question`` / ``answer``, or ``prompt`` / ``response``;
- Alpaca's ``instruction`` / ``input`` (optional, may be empty) / ``output``;
- chat ``messages`` (a list of ``{"role", "content"}``): the last assistant message is the response, everything
  before it goes through the tokenizer's chat template when it has one.
Prompts without a chat template go through ``data.prompt-template`` (a ``str.format`` string over the row's
columns and ``{prompt}``; empty: the format's default below).

Tokens: the prompt (with the tokenizer's special tokens, e.g. Llama's BOS) then the response and EOS. Labels are
-100 on the prompt and on padding, so the loss counts response tokens only. Too long an example loses the start
of its prompt first: the response is what is learned, and the end of the prompt is what it follows.
"""

from __future__ import annotations

import decimal
import hashlib
import math
import re
import string
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from fedlowrank.errors import DataError

if TYPE_CHECKING:  # the engine imports this module; a GPU machine without datasets can still run it
    from datasets import Dataset

    from fedlowrank.data import Loader

IGNORE_INDEX = -100  # label of a token the loss skips (prompt, padding): torch's cross_entropy default
ANSWER_MARK = "####"  # GSM8K: the final answer follows this mark
QUESTION_TEMPLATE = "Question: {prompt}\nAnswer:"
ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_INPUT_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
    "response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
# Column pairs recognised without configuration, in order of preference.
KNOWN_PAIRS = (("question", "answer"), ("prompt", "response"), ("prompt", "completion"), ("input", "output"))


@dataclass(frozen=True)
class InstructionFormat:
    """How a row becomes (prompt text, response text)."""

    kind: str  # "columns", "alpaca" or "chat"
    prompt_column: str = ""
    response_column: str = ""
    template: str = ""  # "" : the kind's default

    @property
    def columns(self) -> list[str]:
        if self.kind == "chat":
            return ["messages"]
        if self.kind == "alpaca":
            return ["instruction", "output"]
        return [self.prompt_column, self.response_column]

    def render(self, row: dict, tokenizer: PreTrainedTokenizerBase) -> tuple[str, str]:
        """The prompt (as the model sees it) and the response of ``row``."""
        if self.kind == "chat":
            return _render_chat(row["messages"], tokenizer, self.template)
        if self.kind == "alpaca":
            has_input = bool(str(row.get("input") or "").strip())
            template = self.template or (ALPACA_INPUT_TEMPLATE if has_input else ALPACA_TEMPLATE)
            fields = {**row, "prompt": row["instruction"], "input": row.get("input") or ""}
            prompt = template.format_map(fields)
            return prompt, _joined(prompt, str(row["output"]))
        template = self.template or QUESTION_TEMPLATE
        prompt = template.format_map({**row, "prompt": row[self.prompt_column]})
        return prompt, _joined(prompt, str(row[self.response_column]))

    @property
    def template_fields(self) -> list[str]:
        """The names ``template`` formats (row columns the data must keep, and ``prompt``)."""
        return sorted({name for _, name, _, _ in string.Formatter().parse(self.template) if name})

    @property
    def prompt_has_special_tokens(self) -> bool:
        """A chat template writes the BOS itself; other prompts get the tokenizer's special tokens."""
        return self.kind != "chat"


def _joined(prompt: str, response: str) -> str:
    """The response as it follows the prompt: after a space when the prompt ends on a word ("Answer:"), so that
    a byte-level BPE tokenizer sees " 72", the way pretraining text has it, and not a lone space token."""
    if prompt and not prompt[-1].isspace() and response and not response[0].isspace():
        return " " + response
    return response


def _render_chat(messages: list[dict], tokenizer: PreTrainedTokenizerBase, template: str) -> tuple[str, str]:
    if not messages or messages[-1].get("role") != "assistant":
        raise DataError("a chat example must end with an assistant message (the response to learn)")
    history, response = messages[:-1], str(messages[-1]["content"])
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        return prompt, response
    # No chat template: one "Role: content" line per turn, then the assistant's turn
    turns = "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in history)
    return (template or "{prompt}\nAssistant: ").format_map({"prompt": turns}), response


def detect_format(columns: list[str], prompt_column: str = "", response_column: str = "", template: str = ""):
    """The row format of a dataset with ``columns`` (explicit columns win over recognised ones)."""
    if prompt_column or response_column:
        if not (prompt_column and response_column):
            raise DataError("set both data.prompt-column and data.response-column (or neither, to detect them)")
        found = InstructionFormat("columns", prompt_column, response_column, template)
    elif "messages" in columns:
        found = InstructionFormat("chat", template=template)
    elif {"instruction", "output"} <= set(columns):
        found = InstructionFormat("alpaca", template=template)
    else:
        pair = next(((p, r) for p, r in KNOWN_PAIRS if p in columns and r in columns), None)
        if pair is None:
            raise DataError(
                f"cannot tell the prompt and response columns of this instruction data (columns: {columns}). "
                "Recognised: question/answer (GSM8K), prompt/response, instruction/input/output (Alpaca), "
                "messages (chat). Otherwise set data.prompt-column and data.response-column"
            )
        found = InstructionFormat("columns", pair[0], pair[1], template)
    missing = [c for c in found.columns if c not in columns]
    if missing:
        raise DataError(f"instruction data have no column(s) {missing}; their columns are {columns}")
    _check_template(found, columns)
    return found


def _check_template(fmt: InstructionFormat, columns: list[str]) -> None:
    unknown = sorted(set(fmt.template_fields) - {*columns, "prompt", "input"})
    if unknown:
        raise DataError(
            f"data.prompt-template names {unknown}, which are not columns of the data ({columns}) nor {{prompt}}"
        )


# ---- tokens -----------------------------------------------------------------------------------------
def encode_example(
    prompt: str, response: str, tokenizer: PreTrainedTokenizerBase, max_length: int, prompt_special: bool = True
) -> dict[str, list[int]]:
    """``input_ids`` = prompt + response + EOS, ``labels`` = -100 over the prompt, the response tokens after.

    The text is tokenized whole where the prompt's tokens start it, so the response's tokens are those the
    model would see in running text (see ``_split_tokens``). Over
    ``max_length``, the prompt gives way first (its start is cut, a leading BOS kept) down to half the length;
    only then is the response's end cut."""
    prompt_ids, response_ids = _split_tokens(prompt, response, tokenizer, prompt_special)
    response_ids = response_ids + [tokenizer.eos_token_id]
    keep_response = min(len(response_ids), max_length - min(len(prompt_ids), max_length // 2))
    prompt_ids = _keep_end(prompt_ids, max_length - keep_response, tokenizer.bos_token_id)
    response_ids = response_ids[:keep_response]
    return {
        "input_ids": prompt_ids + response_ids,
        "attention_mask": [1] * (len(prompt_ids) + len(response_ids)),
        "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids,
    }


def _split_tokens(
    prompt: str, response: str, tokenizer: PreTrainedTokenizerBase, prompt_special: bool
) -> tuple[list[int], list[int]]:
    """(prompt tokens, response tokens): of ``prompt + response`` tokenized as one text when its start is the
    prompt's own tokens (the prompt ends where a token ends, as "Answer:" before " 72" does), else of the two
    tokenized apart (a prompt whose last token would merge with the response's first)."""
    prompt_ids = tokenizer(prompt, add_special_tokens=prompt_special)["input_ids"]
    whole = tokenizer(prompt + response, add_special_tokens=prompt_special)["input_ids"]
    if whole[: len(prompt_ids)] == prompt_ids:
        tail = whole[len(prompt_ids) :]
        specials = set(tokenizer.all_special_ids)
        while tail and tail[-1] in specials:  # an EOS the tokenizer adds itself: ours is appended once
            tail = tail[:-1]
        return prompt_ids, tail
    return prompt_ids, tokenizer(response, add_special_tokens=False)["input_ids"]


def encode_prompt(prompt: str, tokenizer: PreTrainedTokenizerBase, max_length: int, special: bool = True) -> list[int]:
    """The prompt's tokens for generation (its end kept when too long, as in training)."""
    ids = tokenizer(prompt, add_special_tokens=special)["input_ids"]
    return _keep_end(ids, max_length, tokenizer.bos_token_id)


def _keep_end(ids: list[int], room: int, bos: int | None) -> list[int]:
    if len(ids) <= room:
        return ids
    if room <= 0:
        return []
    if bos is not None and ids and ids[0] == bos:
        return [bos] + ids[len(ids) - room + 1 :] if room > 1 else [bos]
    return ids[len(ids) - room :]


def tokenize_instructions(
    dataset: Dataset, tokenizer: PreTrainedTokenizerBase, fmt: InstructionFormat, max_length: int
) -> Dataset:
    """Model-ready rows (``input_ids``, ``attention_mask``, ``labels``) of instruction data, unpadded."""

    def encode(batch: dict) -> dict:
        rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
        encoded = [
            encode_example(*fmt.render(row, tokenizer), tokenizer, max_length, fmt.prompt_has_special_tokens)
            for row in rows
        ]
        return {key: [e[key] for e in encoded] for key in ("input_ids", "attention_mask", "labels")}

    # fingerprint from what decides the output (hashing the tokenizer itself would pickle it: slow)
    recipe = "|".join(
        [dataset._fingerprint, str(getattr(tokenizer, "name_or_path", "")), str(len(tokenizer)), repr(fmt)]
        + [str(max_length), str(getattr(tokenizer, "chat_template", ""))]
    )
    fingerprint = hashlib.sha256(recipe.encode()).hexdigest()[:32]
    return dataset.map(encode, batched=True, remove_columns=dataset.column_names, new_fingerprint=fingerprint)


class InstructionCollator:
    """Right-pads a batch: ``input_ids`` with the pad token, ``attention_mask`` with 0, ``labels`` with -100
    (right padding whatever the tokenizer's side: positions then count from the first real token)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(row["input_ids"]) for row in rows)
        pads = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        return {
            key: torch.tensor([list(row[key]) + [pad] * (width - len(row[key])) for row in rows], dtype=torch.long)
            for key, pad in pads.items()
        }


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy at every position (B, T-1); 0 where the label is -100."""
    vocabulary = logits.shape[-1]
    shifted = logits[:, :-1].reshape(-1, vocabulary)
    if shifted.dtype in (torch.float16, torch.bfloat16):  # a bf16 model's logits: the softmax in fp32
        shifted = shifted.float()
    targets = labels[:, 1:].reshape(-1)
    losses = nn.functional.cross_entropy(shifted, targets, ignore_index=IGNORE_INDEX, reduction="none")
    return losses.view(labels.shape[0], -1)


# ---- answers --------------------------------------------------------------------------------------
NUMBER = re.compile(r"-?\s*\$?\s*(?:\d[\d,]*(?:\.\d+)?|\.\d+)")


def final_answer(text: str) -> str | None:
    """The number after the first ``####`` (GSM8K), normalised: no commas, no ``$``, no leading or trailing
    zeros (``1,000.50`` → ``1000.5``, ``-3.0`` → ``-3``, ``.5`` → ``0.5``); None when there is no mark or no
    number after it. The first mark: a model that does not stop may go on to invent another question."""
    if ANSWER_MARK not in text:
        return None
    match = NUMBER.search(text.split(ANSWER_MARK, 1)[1])
    if match is None:
        return None
    number = decimal.Decimal(re.sub(r"[\s$,]", "", match.group()))
    text = format(number.normalize(), "f")
    return "0" if text == "-0" else text


def answers_match(prediction: str, reference: str) -> bool:
    """GSM8K-style references (with ``####``): the final numbers are equal; otherwise the stripped texts are."""
    if ANSWER_MARK in reference:
        expected = final_answer(reference)
        return expected is not None and final_answer(prediction) == expected
    return " ".join(prediction.split()) == " ".join(reference.split())


# ---- evaluation -------------------------------------------------------------------------------------
@torch.no_grad()
def response_scores(model: nn.Module, loader: Loader) -> tuple[float, float, int]:
    """(mean NLL per response token, next-token accuracy on response tokens, examples) over ``loader``."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # no dropout while scoring
    total, correct, tokens, examples = 0.0, 0, 0, 0
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        logits = model(**batch).logits
        counted = labels[:, 1:] != IGNORE_INDEX
        total += float(token_losses(logits, labels).sum())
        correct += int(((logits[:, :-1].argmax(dim=-1) == labels[:, 1:]) & counted).sum())
        tokens += int(counted.sum())
        examples += int(labels.shape[0])
    model.train(was_training)
    if tokens == 0:
        return float("nan"), float("nan"), examples
    return total / tokens, correct / tokens, examples


@torch.no_grad()
def generate_responses(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_size: int,
) -> list[str]:
    """Greedy continuations of token prompts, batched with left padding, each stopped at EOS."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = stop_tokens(model, tokenizer)
    texts = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(len(p) for p in chunk)
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=pad,
            use_cache=True,  # also where gradient checkpointing turned the model's cache off
        )
        for row in output[:, width:].tolist():
            end = next((i for i, token in enumerate(row) if token in stops), len(row))
            texts.append(tokenizer.decode(row[:end], skip_special_tokens=True))
    return texts


def stop_tokens(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokenizer's EOS and every end token of the model's generation config (e.g. Llama-3's end of turn)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [configured]
    return sorted({t for t in [tokenizer.eos_token_id, *configured] if t is not None})


def exact_match(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    rows: Dataset,
    fmt: InstructionFormat,
    *,
    max_length: int,
    max_new_tokens: int,
    batch_size: int,
) -> tuple[float, list[dict[str, str]]]:
    """Share of ``rows`` whose greedy answer matches the reference (``answers_match``), and the first few
    (prompt, generated, reference) triples to read."""
    if len(rows) == 0:
        return float("nan"), []
    rendered = [fmt.render(row, tokenizer) for row in rows]
    prompts = [encode_prompt(p, tokenizer, max_length, fmt.prompt_has_special_tokens) for p, _ in rendered]
    was_training = model.training
    model.eval()
    try:
        generated = generate_responses(model, tokenizer, prompts, max_new_tokens, batch_size)
    finally:
        model.train(was_training)
    hits = [answers_match(text, reference) for text, (_, reference) in zip(generated, rendered, strict=True)]
    samples = [
        {"prompt": p, "generated": g, "reference": r} for (p, r), g in list(zip(rendered, generated, strict=True))[:3]
    ]
    return sum(hits) / len(hits), samples


def perplexity(mean_token_loss: float) -> float:
    return math.exp(mean_token_loss) if math.isfinite(mean_token_loss) and mean_token_loss < 700 else float("inf")
