"""Train K clients' LoRA adapters at once on one shared frozen base: one forward and backward per step.

Every client's examples of a step go through the shared base together; each adapted layer applies each
example's own client adapter (``fedlowrank.kernels.multi_lora``: stacked A (K, r, d) and B (K, k, r),
Triton on GPU, batched matrix products elsewhere), and the classifier head is per client too. The loss is
Σ_k mean_{i ∈ batch_k} L_i, so client k's gradient is exactly the gradient of its own mean batch loss —
what ``train_local`` computes for it alone. AdamW and SGD act elementwise, so one optimizer over the
stacked tensors is K independent optimizers; a client that has run all its steps is frozen (its slice is
restored after later steps). Each client keeps its own data order (its own loader and seed).

The model is left as it was (forwards restored, adapter untouched): the caller reads each client's end
state from the returned dictionaries.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from peft import PeftModel
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.utils.other import ModulesToSaveWrapper
from torch import nn
from torch.utils.data import DataLoader

from fedlowrank.config import TrainSettings
from fedlowrank.kernels import multi_lora
from fedlowrank.training import TrainResult, cycle_batches, make_optimizer, planned_steps

PAD_VALUES = {"input_ids": 0, "attention_mask": 0, "token_type_ids": 0}


@dataclass
class ClientJob:
    start_state: dict[str, torch.Tensor]  # the adapter this client starts from (peft state-dict keys)
    loader: DataLoader  # its own examples in its own order
    seed: int = 0


@dataclass
class _Stacked:
    """One adapted module's K-stacked trainable tensors and the state keys they came from."""

    module: nn.Module
    tensors: dict[str, torch.Tensor]  # state key -> (K, ...) tensor (a Parameter if it trains)


class _BatchContext:
    client_index: torch.Tensor | None = None


def _lora_layers(model: PeftModel) -> dict[str, LoraLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def _heads(model: PeftModel) -> dict[str, ModulesToSaveWrapper]:
    return {name: m for name, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)}


def _stack(jobs: list[ClientJob], key: str, requires_grad: bool, device: torch.device) -> torch.Tensor:
    stacked = torch.stack([job.start_state[key] for job in jobs]).to(device)
    return nn.Parameter(stacked, requires_grad=True) if requires_grad else stacked


def _pad_and_concat(batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate the clients' batches, padding token tensors to the longest sequence of the step."""
    length = max(b["input_ids"].shape[1] for b in batches)
    out: dict[str, list[torch.Tensor]] = {}
    for batch in batches:
        for key, value in batch.items():
            if value.dim() == 2 and key in PAD_VALUES and value.shape[1] < length:
                value = nn.functional.pad(value, (0, length - value.shape[1]), value=PAD_VALUES[key])
            out.setdefault(key, []).append(value)
    return {key: torch.cat(values) for key, values in out.items()}


@contextmanager
def _patched(model: PeftModel, stacks: dict[str, _Stacked], context: _BatchContext):
    """Route every LoRA layer and the head through the stacked per-client tensors while inside."""
    patched = []
    for name, stack in stacks.items():
        module = stack.module
        if isinstance(module, LoraLinear):
            a_key, b_key = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
            a_stack, b_stack = stack.tensors[a_key], stack.tensors[b_key]
            scaling = module.scaling["default"]
            dropout = module.lora_dropout["default"]
            base = module.base_layer

            def forward(x, *args, _a=a_stack, _b=b_stack, _s=scaling, _d=dropout, _base=base, **kwargs):
                result = _base(x, *args, **kwargs)
                lora = multi_lora(_d(x).to(_a.dtype), _a, _b, context.client_index, _s)
                return result + lora.to(result.dtype)

        else:  # the per-client classifier head
            w_key = next(k for k in stack.tensors if k.endswith(".weight"))
            b_key = next((k for k in stack.tensors if k.endswith(".bias")), None)
            weight, bias = stack.tensors[w_key], stack.tensors.get(b_key) if b_key else None

            def forward(x, *args, _w=weight, _bias=bias, **kwargs):
                index = context.client_index
                out = torch.einsum("nh,nch->nc", x, _w[index])
                return out + _bias[index] if _bias is not None else out

        module.forward = forward
        patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            module.__dict__.pop("forward", None)


def _build_stacks(model: PeftModel, jobs: list[ClientJob], device: torch.device) -> dict[str, _Stacked]:
    stacks: dict[str, _Stacked] = {}
    for name, module in _lora_layers(model).items():
        a_key, b_key = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
        stacks[name] = _Stacked(
            module,
            {
                a_key: _stack(jobs, a_key, module.lora_A["default"].weight.requires_grad, device),
                b_key: _stack(jobs, b_key, module.lora_B["default"].weight.requires_grad, device),
            },
        )
    for name, wrapper in _heads(model).items():
        head = wrapper.modules_to_save["default"]
        tensors = {}
        for leaf, param in head.named_parameters():
            key = f"{name}.{leaf}"
            if key in jobs[0].start_state:
                tensors[key] = _stack(jobs, key, param.requires_grad, device)
        if tensors:
            stacks[name] = _Stacked(wrapper, tensors)
    return stacks


def _clip_per_client_(params: list[nn.Parameter], max_norm: float) -> None:
    """clip_grad_norm_ for each client's slice separately (what train_local does per client)."""
    squares = sum(p.grad.reshape(p.shape[0], -1).pow(2).sum(dim=1) for p in params if p.grad is not None)
    factors = (max_norm / (squares.sqrt() + 1e-6)).clamp(max=1.0)
    for p in params:
        if p.grad is not None:
            p.grad.mul_(factors.view(-1, *([1] * (p.dim() - 1))))


def train_batched(
    model: PeftModel,
    jobs: list[ClientJob],
    settings: TrainSettings,
    optimizer_kind: str = "adamw",
) -> list[tuple[dict[str, torch.Tensor], TrainResult]]:
    """Train every job's adapter for its planned steps in shared forward/backward passes.

    Returns, per job, its end adapter state (the start state with its trained tensors replaced) and its
    ``TrainResult``. The trainable parts are those marked trainable on ``model`` (the same for every client).
    """
    if not jobs:
        return []
    device = next(model.parameters()).device
    stacks = _build_stacks(model, jobs, device)
    params = [t for stack in stacks.values() for t in stack.tensors.values() if isinstance(t, nn.Parameter)]
    optimizer = make_optimizer(params, settings, optimizer_kind)
    sizes = [len(job.loader.dataset) for job in jobs]
    if min(sizes) == 0:
        raise ValueError("a client has no training examples")
    steps = [planned_steps(settings, n) for n in sizes]
    iterators: list[Iterator[dict]] = []
    for job, count in zip(jobs, steps, strict=True):
        torch.manual_seed(job.seed)  # the loader's shuffling is seeded by its own generator
        iterators.append(iter(cycle_batches(job.loader, count)))
    losses = [0.0] * len(jobs)
    examples = [0] * len(jobs)
    context = _BatchContext()
    model.train()
    with _patched(model, stacks, context):
        for step in range(max(steps)):
            active = [k for k, count in enumerate(steps) if step < count]
            batches = [next(iterators[k]) for k in active]
            counts = [b["input_ids"].shape[0] for b in batches]
            batch = {k: v.to(device) for k, v in _pad_and_concat(batches).items()}
            labels = batch.pop("labels")
            context.client_index = torch.repeat_interleave(
                torch.tensor(active, device=device), torch.tensor(counts, device=device)
            )
            logits = model(**batch).logits
            per_example = nn.functional.cross_entropy(logits, labels, reduction="none")
            weights = torch.repeat_interleave(
                torch.tensor([1.0 / c for c in counts], device=device), torch.tensor(counts, device=device)
            )
            (per_example * weights).sum().backward()
            if settings.max_grad_norm > 0:
                _clip_per_client_(params, settings.max_grad_norm)
            finished = [k for k, count in enumerate(steps) if step >= count]
            frozen = [p.detach()[finished].clone() for p in params] if finished else []
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if finished:  # a client past its last step must not move (momentum would still push it)
                with torch.no_grad():
                    for p, saved in zip(params, frozen, strict=True):
                        p[finished] = saved
            sums = torch.zeros(len(jobs), device=device).index_add(0, context.client_index, per_example.detach())
            for k, c in zip(active, counts, strict=True):
                losses[k] += float(sums[k]) / c
                examples[k] += c
    results = []
    for k, job in enumerate(jobs):
        state = dict(job.start_state)
        for stack in stacks.values():
            for key, tensor in stack.tensors.items():
                state[key] = tensor.detach()[k].to("cpu", torch.float32).clone()
        result = TrainResult(
            loss=losses[k] / steps[k], num_examples=examples[k], num_steps=steps[k], dataset_size=sizes[k]
        )
        results.append((state, result))
    return results
