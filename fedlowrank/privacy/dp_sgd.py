"""DP-SGD on whatever a model trains (LoRA A and/or B, the head) — one client's local round.

The recipe of privacy.md §6 with Opacus 1.6 objects composed directly, so that the sampling rate the
accountant sees is exactly the one the sampler uses:
- Poisson sampling at q = b / n_k (``PoissonBatches``); an empty batch still takes its noise-only step;
- per-sample gradients from Opacus' hooks (``engine="hooks"``) or the fused LoRA path (``"fused"``);
- Opacus ``DPOptimizer`` clips (flat, C), adds N(0, σ²C²) and divides by the *expected* batch size;
- logical batches larger than ``max_physical_batch_size`` are split by Opacus' ``BatchMemoryManager``,
  so memory stays bounded without changing the mechanism;
- the client's ``PrivacyAccountant`` (restored from its persistent state) is stepped once per noisy step.
Hooks are removed at the end of every round (adding them twice fails in round 2) and the adapters are
checked to have moved (the silent no-update hazard, opacus #820).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedlowrank.config import TrainSettings
from fedlowrank.privacy.accounting import ClientDPPlan, PrivacyAccountant, ensure_within_budget
from fedlowrank.privacy.fused import FusedPerSampleGrads, empty_grad_samples
from fedlowrank.training import batch_losses, make_optimizer, split_by_length

ENGINES = ("hooks", "fused")


@dataclass
class DPTrainResult:
    loss: float  # mean per-example training loss over the non-empty batches
    num_examples: int  # examples processed (Poisson batches, repeats counted)
    num_steps: int  # noisy optimizer steps (each accounted)
    dataset_size: int
    empty_batches: int
    epsilon: float  # cumulative, after this round
    noise_multiplier: float
    sample_rate: float


class PoissonBatches:
    """``steps`` Poisson batches: every example joins each batch independently with probability q."""

    def __init__(self, dataset_size: int, sample_rate: float, steps: int, generator: torch.Generator) -> None:
        self.dataset_size, self.sample_rate, self.steps, self.generator = dataset_size, sample_rate, steps, generator

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            mask = torch.rand(self.dataset_size, generator=self.generator) < self.sample_rate
            yield mask.nonzero().flatten().tolist()

    def __len__(self) -> int:
        return self.steps


def per_example_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ_i L_i (not the mean: dividing by the realised batch size would leak it, and the per-sample
    gradients must be those of each example's own loss)."""
    return batch_losses(model, batch).sum()


def _backward_in_chunks(
    model: nn.Module, batch: dict[str, torch.Tensor], params: list[torch.Tensor], device: torch.device, max_tokens: int
) -> float:
    """Per-example gradients of one logical batch, computed piece by piece (``split_by_length``) and joined:
    the optimizer's clipping and noise then see the whole batch at once. Returns Σ_i L_i. A batch within
    ``max_tokens`` runs whole, in its own row order (reordering would draw other dropout masks)."""
    pieces: dict[int, list[torch.Tensor]] = {id(p): [] for p in params}
    total = 0.0
    padded = batch["input_ids"].numel() if "input_ids" in batch else 0
    whole = max_tokens <= 0 or padded <= max_tokens
    for _, part in [(None, batch)] if whole else split_by_length(batch, max_tokens):
        loss = per_example_loss_sum(model, {k: v.to(device) for k, v in part.items()})
        with warnings.catch_warnings():  # Opacus' full-backward-hook notice on the first layer
            warnings.simplefilter("ignore", UserWarning)
            loss.backward()
        total += float(loss.detach())
        for p in params:
            sample = getattr(p, "grad_sample", None)
            if sample is None:
                raise ValueError(
                    f"a trainable parameter of shape {tuple(p.shape)} got no per-example gradient: it is not used "
                    "in the forward pass, so DP-SGD cannot clip it; freeze it (requires_grad = False)"
                )
            pieces[id(p)].extend(sample if isinstance(sample, list) else [sample])
            p.grad_sample = None
    for p in params:
        p.grad_sample = torch.cat(pieces[id(p)]) if len(pieces[id(p)]) > 1 else pieces[id(p)][0]
    return total


def _attach_per_sample_engine(model: nn.Module, engine: str):
    if engine == "fused":
        return FusedPerSampleGrads(model).__enter__()
    if engine == "hooks":
        from opacus.grad_sample import GradSampleHooks

        return GradSampleHooks(model, batch_first=True, loss_reduction="sum")
    raise ValueError(f"dp.engine must be one of {ENGINES}, got {engine!r}")


def _detach_per_sample_engine(handle, engine: str) -> None:
    if engine == "fused":
        handle.__exit__(None, None, None)
    else:
        handle.cleanup()


def train_private(
    model: nn.Module,
    dataset: Dataset,
    collate: Callable[[list], dict[str, torch.Tensor]],
    settings: TrainSettings,
    plan: ClientDPPlan,
    accountant: PrivacyAccountant,
    *,
    max_grad_norm: float,
    engine: str = "hooks",
    max_physical_batch_size: int = 0,
    max_tokens: int = 0,
    optimizer_kind: str = "sgd",
    seed: int = 0,
    check_budget: bool = True,
) -> DPTrainResult:
    """One round of DP-SGD for one client. Raises ``PrivacyBudgetExceeded`` *before* training if the
    round's steps would take ``accountant`` past ``plan.target_epsilon``; nothing is changed then.

    ``max_tokens`` > 0 runs each Poisson batch through the model in length-sorted pieces of at most that many
    padded tokens (the same per-example gradients, clipped and noised once per logical batch)."""
    from opacus.optimizers import DPOptimizer

    dataset_size = len(dataset)
    if dataset_size == 0:
        raise ValueError("cannot train on an empty dataset")
    sigma, q, steps = plan.noise_multiplier, plan.sample_rate, plan.steps_per_round
    if check_budget:
        ensure_within_budget(accountant, plan)
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    handle = _attach_per_sample_engine(model, engine)
    optimizer = DPOptimizer(
        make_optimizer(params, settings, optimizer_kind),
        noise_multiplier=sigma,
        max_grad_norm=max_grad_norm,
        expected_batch_size=plan.expected_batch_size,
        loss_reduction="mean",  # divide the noisy sum by the expected (not realised) batch size
        generator=torch.Generator(device=device).manual_seed(seed + 1),
    )
    optimizer.expected_batch_size = plan.expected_batch_size  # Opacus truncates nothing; keep the float
    optimizer.attach_step_hook(accountant.optimizer_hook(sigma, q))
    loader = DataLoader(
        dataset,
        batch_sampler=PoissonBatches(dataset_size, q, steps, generator),
        collate_fn=lambda rows: collate(rows) if rows else None,  # None: an empty Poisson batch
    )
    model.train()  # Opacus hooks record activations only in train mode
    total_loss, examples, empty = 0.0, 0, 0
    try:
        with contextlib.ExitStack() as stack:
            if max_physical_batch_size > 0:  # Opacus splits logical batches and defers the step to the last part
                loader = stack.enter_context(
                    BatchMemoryManager(
                        data_loader=loader, max_physical_batch_size=max_physical_batch_size, optimizer=optimizer
                    )
                )
            for batch in loader:
                if batch is None:
                    empty += 1
                    empty_grad_samples(params)
                else:
                    loss = _backward_in_chunks(model, batch, params, device, max_tokens)
                    total_loss += float(loss)
                    examples += int(batch["labels"].shape[0])
                optimizer.step()  # a noisy, accounted step (deferred while a split logical batch goes on)
                optimizer.zero_grad(set_to_none=True)
    finally:
        optimizer.zero_grad(set_to_none=True)
        _detach_per_sample_engine(handle, engine)
        _clear_dp_attributes(params)  # leave plain parameters behind for the next round / evaluation
    moved = max(float((p.detach() - b).abs().max()) for p, b in zip(params, before, strict=True))
    if moved == 0.0:
        raise RuntimeError(
            "DP-SGD finished but the trainable weights are bit-identical to before (opacus #820 hazard: "
            "move the model to its device before attaching adapters)"
        )
    return DPTrainResult(
        loss=total_loss / max(examples, 1),
        num_examples=examples,
        num_steps=steps,
        dataset_size=dataset_size,
        empty_batches=empty,
        epsilon=accountant.epsilon(plan.delta),
        noise_multiplier=sigma,
        sample_rate=q,
    )


def private_gradients(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    engine: str,
    max_grad_norm: float,
    noise_multiplier: float,
    expected_batch_size: float,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """The DP-SGD gradient of one batch — Σ_i clip(∇L_i) + N(0, σ²C²), divided by E[b] — per trainable
    parameter, through Opacus' DPOptimizer (model left unchanged). For tests and benchmarks."""
    from opacus.optimizers import DPOptimizer

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    handle = _attach_per_sample_engine(model, engine)
    optimizer = DPOptimizer(
        torch.optim.SGD(params, lr=0.0),
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
        generator=torch.Generator().manual_seed(seed),
    )
    try:
        model.train()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            per_example_loss_sum(model, batch).backward()
        optimizer.step()
        return {n: p.grad.detach().clone() for n, p in named}
    finally:
        optimizer.zero_grad(set_to_none=True)
        _detach_per_sample_engine(handle, engine)
        _clear_dp_attributes(params)


def _clear_dp_attributes(params: list[torch.Tensor]) -> None:
    for p in params:
        for attr in ("grad_sample", "summed_grad", "_processed"):
            if hasattr(p, attr):
                delattr(p, attr)


__all__ = ["DPTrainResult", "ENGINES", "PoissonBatches", "per_example_loss_sum", "private_gradients", "train_private"]
