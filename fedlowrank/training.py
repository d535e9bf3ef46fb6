"""The local training loop and evaluation, shared by Flower clients and centralized training.

``train_local`` runs one client's (or the centralized run's) optimizer steps on a model whose trainable
parameters are exactly what should learn. The per-step body is ``training_step`` so that an engine
training several clients at once can reuse it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fedlowrank.config import GaLoreSettings, TrainSettings
from fedlowrank.instructions import IGNORE_INDEX

if TYPE_CHECKING:  # fedlowrank.data needs datasets, which a bare GPU machine lacks
    from fedlowrank.data import Loader

# What each per-token input of a text batch is padded with (token labels: the index the loss skips).
PAD_VALUES = {"input_ids": 0, "attention_mask": 0, "token_type_ids": 0, "labels": IGNORE_INDEX}


@dataclass
class TrainResult:
    loss: float  # mean training loss over the steps taken
    num_examples: int  # examples processed (counting repeats over epochs)
    num_steps: int
    dataset_size: int


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    macro_f1: float
    num_examples: int
    top_class_share: float = float("nan")  # share of the predictions that fall in the most-predicted class
    label_entropy: float = float("nan")  # H of the labels scored: the loss of the best constant prediction
    # Causal LMs: loss and accuracy are per response token; perplexity = exp(loss); exact match when generated
    perplexity: float | None = None
    exact_match: float | None = None

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        if self.perplexity is not None:
            scores = {f"{prefix}loss": self.loss, f"{prefix}accuracy": self.accuracy}
            scores[f"{prefix}perplexity"] = self.perplexity
            if self.exact_match is not None:
                scores[f"{prefix}exact_match"] = self.exact_match
            return scores
        return {
            f"{prefix}loss": self.loss,
            f"{prefix}accuracy": self.accuracy,
            f"{prefix}f1": self.macro_f1,
            f"{prefix}top_class_share": self.top_class_share,
            f"{prefix}label_entropy": self.label_entropy,
        }


def make_optimizer(
    params: list[torch.nn.Parameter],
    settings: TrainSettings,
    kind: str,
    *,
    model: torch.nn.Module | None = None,
    galore: GaLoreSettings | None = None,
    seed: int = 0,
    fused: bool = False,
) -> torch.optim.Optimizer:
    """The optimizer for ``params``. ``kind = "galore"`` also needs ``model`` (parameter names decide what
    is projected) and the ``[galore]`` settings (defaults when None). ``fused``: AdamW's fused kernel (one
    pass over each tensor; the same update to within float rounding), for large stacked tensors."""
    if not params:
        raise ValueError("no trainable parameters: nothing to optimize")
    if kind == "galore":
        if model is None:
            raise ValueError("optimizer 'galore' needs the model to choose which weights to project")
        from fedlowrank.galore_setup import make_galore_optimizer

        return make_galore_optimizer(model, params, settings, galore or GaLoreSettings(), seed)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay, fused=fused or None)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    raise ValueError(f"unknown optimizer {kind!r}")


def planned_steps(settings: TrainSettings, dataset_size: int) -> int:
    if settings.local_steps > 0:
        return settings.local_steps
    steps_per_epoch = math.ceil(dataset_size / settings.batch_size)
    return max(1, math.ceil(settings.local_epochs * steps_per_epoch))


def cycle_batches(loader: Loader, steps: int) -> Iterator[dict]:
    """Yield exactly ``steps`` batches, reshuffling at each pass over the data."""
    taken = 0
    while taken < steps:
        for batch in loader:
            yield batch
            taken += 1
            if taken == steps:
                return


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each example's loss (B,): cross-entropy of its class (labels (B,)), or the sum of its token losses
    over the tokens whose label is not -100 (labels (B, T): a causal LM's next-token targets).

    The one definition every trainer uses (plain, DP-SGD, the batched engine): the summed token loss is
    what DP-SGD clips per example, so the non-private paths minimise the same objective."""
    if labels.dim() == 1:
        return torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    from fedlowrank.instructions import token_losses

    return token_losses(logits, labels).sum(dim=1)


def batch_losses(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """``per_example_loss`` of every example in ``batch`` (the model sees everything but the labels)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return per_example_loss(model(**inputs).logits, batch["labels"])


def batch_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """The mean over the batch's examples of ``per_example_loss``."""
    return batch_losses(model, batch).mean()


def training_step(
    model: torch.nn.Module,
    batch: dict,
    optimizer: torch.optim.Optimizer,
    trainable: list[torch.nn.Parameter],
    max_grad_norm: float = 0.0,
) -> float:
    loss = batch_loss(model, batch)
    loss.backward()
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def length_chunks(lengths: torch.Tensor, max_tokens: int) -> list[torch.Tensor]:
    """Example indices, longest first, in groups whose padded size (count × longest) stays within
    ``max_tokens`` (0: one group). Short sequences then are not padded to the batch's longest one."""
    order = torch.argsort(lengths, descending=True, stable=True)
    if max_tokens <= 0:
        return [order]
    groups, start = [], 0
    while start < len(order):
        longest = max(int(lengths[order[start]]), 1)
        size = max(1, max_tokens // longest)
        groups.append(order[start : start + size])
        start += size
    return groups


def split_by_length(batch: dict[str, torch.Tensor], max_tokens: int) -> Iterator[tuple[torch.Tensor, dict]]:
    """A padded batch as length-sorted sub-batches of at most ``max_tokens`` padded tokens, each trimmed to
    its own longest sequence; yields (indices into ``batch``, sub-batch). Padding a 1,024-question TREC batch
    to its longest question made a DP-SGD round 3.4x slower than these pieces do on a CPU. Only right-padded
    text is trimmed (left padding, as for generation, and images are sliced by rows only)."""
    mask = batch.get("attention_mask")
    rows = next(iter(batch.values())).shape[0]
    right_padded = mask is not None and bool(
        (mask.cumsum(dim=1) == mask.sum(dim=1, keepdim=True)).logical_or(mask == 1).all()
    )
    if right_padded:
        lengths = mask.sum(dim=1)
    elif "input_ids" in batch:  # left padding (or none): every row keeps the full width
        lengths = torch.full((rows,), batch["input_ids"].shape[1])
    else:  # images: every example costs the same
        lengths = torch.ones(rows, dtype=torch.long)
    for chunk in length_chunks(lengths, max_tokens):
        if not right_padded:
            yield chunk, {key: value[chunk] for key, value in batch.items()}
            continue
        width = int(lengths[chunk].max())
        yield (
            chunk,
            {
                key: value[chunk, :width] if key in PAD_VALUES and value.dim() == 2 else value[chunk]
                for key, value in batch.items()
            },
        )


def count_examples(batch: dict) -> int:
    """Examples in a batch of any modality: the labels' length (else the first tensor's leading side)."""
    counted = batch["labels"] if "labels" in batch else next(iter(batch.values()))
    return int(counted.shape[0])


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train_local(
    model: torch.nn.Module,
    loader: Loader,
    settings: TrainSettings,
    optimizer_kind: str = "adamw",
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
    *,
    galore: GaLoreSettings | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> TrainResult:
    """Train ``model``'s trainable parameters on ``loader`` for the configured steps or epochs.

    A fresh optimizer per call (the federated setting: one call per round), unless ``optimizer`` is given
    (fed-galore installs the round's projectors first). Deterministic given ``seed``.
    """
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    trainable = [p for p in model.parameters() if p.requires_grad]
    if optimizer is None:
        optimizer = make_optimizer(trainable, settings, optimizer_kind, model=model, galore=galore, seed=seed)
    dataset_size = len(loader.dataset)
    if dataset_size == 0:
        raise ValueError("cannot train on an empty dataset")
    steps = planned_steps(settings, dataset_size)
    model.train()
    total_loss, examples = 0.0, 0
    for step, batch in enumerate(cycle_batches(loader, steps)):
        batch = _to_device(batch, device)
        loss = training_step(model, batch, optimizer, trainable, settings.max_grad_norm)
        total_loss += loss
        examples += count_examples(batch)
        if on_step is not None:
            on_step(step, loss)
    return TrainResult(loss=total_loss / steps, num_examples=examples, num_steps=steps, dataset_size=dataset_size)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Loader, num_labels: int) -> EvalResult:
    """Loss, accuracy and macro-F1 of a sequence classifier over ``loader``."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_loss, count = 0.0, 0
    confusion = torch.zeros(num_labels, num_labels, dtype=torch.long)
    for batch in loader:
        batch = _to_device(batch, device)
        outputs = model(**batch)
        n = int(batch["labels"].shape[0])
        total_loss += float(outputs.loss) * n
        count += n
        predictions = outputs.logits.argmax(dim=-1).cpu()
        labels = batch["labels"].cpu()
        confusion += torch.bincount(labels * num_labels + predictions, minlength=num_labels**2).view(
            num_labels, num_labels
        )
    model.train(was_training)
    if count == 0:
        return EvalResult(loss=float("nan"), accuracy=float("nan"), macro_f1=float("nan"), num_examples=0)
    return EvalResult(
        loss=total_loss / count,
        accuracy=float(confusion.diag().sum()) / count,
        macro_f1=macro_f1(confusion),
        num_examples=count,
        top_class_share=float(confusion.sum(dim=0).max()) / count,
        label_entropy=label_entropy(confusion.sum(dim=1)),
    )


def label_entropy(counts: torch.Tensor) -> float:
    """Entropy (nats) of a label histogram: the cross-entropy of the best prediction that ignores the input."""
    shares = counts.double() / counts.sum()
    shares = shares[shares > 0]
    return float(-(shares * shares.log()).sum())


def macro_f1(confusion: torch.Tensor) -> float:
    """Mean F1 over the classes present in labels or predictions (rows: true, columns: predicted)."""
    confusion = confusion.double()
    true_positive = confusion.diag()
    predicted = confusion.sum(dim=0)
    actual = confusion.sum(dim=1)
    present = (predicted + actual) > 0
    f1 = 2 * true_positive / (predicted + actual).clamp(min=1)
    return float(f1[present].mean()) if present.any() else float("nan")
