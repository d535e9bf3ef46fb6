"""Train K clients' LoRA adapters at once on one shared frozen base: one forward and backward per step.

Every client's examples of a step go through the shared base together; each adapted layer applies each
example's own client adapter (``fedlowrank.kernels.multi_lora``: stacked A (K, r, d) and B (K, k, r),
Triton on GPU, batched matrix products elsewhere), and the classifier head is per client too. AdamW and
SGD act elementwise, so one optimizer over the stacked tensors is K independent optimizers; a client that
has run all its steps leaves the stacks (its rows and their optimizer state are cut out), so the steps that
only the clients with more data take cost what those clients need. Each client keeps its own data order
(its own loader and seed, or its own Poisson sampler under DP).

Two ways to turn a step's shared backward into K clients' gradients, chosen per run:
- plain: the loss is Σ_k mean_{i ∈ batch_k} L_i, so client k's gradient is exactly the gradient of its own
  mean batch loss — what ``train_local`` computes for it alone (then optional per-client norm clipping);
- private (DP-SGD, every job has a ``PrivateJob``): the backward writes per-example gradients of each
  client's own adapter (``kernels.per_sample_lora_grads``) to ``grad_sample``; each example is clipped
  to its client's C, the clipped gradients are summed per client, each client adds its own Gaussian noise
  N(0, σ_k²C_k²) from its own generator and divides by its expected batch size — Opacus' DPOptimizer
  arithmetic, in the same parameter order, so a seeded client gets the update ``train_private`` gives it.
  Each client draws Poisson batches at its own q (an empty batch still takes its noise-only step), and its
  accountant is stepped for every noisy step.

The model is left as it was (forwards restored, adapter untouched): the caller reads each client's end
state from the returned dictionaries. Jobs' start states live wherever the caller keeps them (CPU); only
the wave being trained is stacked on the device, and results come back on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from peft import PeftModel
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.utils.other import ModulesToSaveWrapper
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.data import Dataset

from fedlowrank.config import TrainSettings
from fedlowrank.kernels import multi_lora, per_sample_lora_grads, uses_triton
from fedlowrank.privacy.accounting import ClientDPPlan, PrivacyAccountant, ensure_within_budget
from fedlowrank.privacy.clipping import clipped_sums, noisy_mean_
from fedlowrank.privacy.dp_sgd import DPTrainResult, PoissonBatches
from fedlowrank.training import (
    PAD_VALUES,
    TrainResult,
    count_examples,
    cycle_batches,
    make_optimizer,
    per_example_loss,
    planned_steps,
    split_by_length,
)

if TYPE_CHECKING:  # fedlowrank.data needs datasets, which a bare GPU machine lacks
    from fedlowrank.data import Loader


@dataclass
class PlainData:
    """A client's examples in its own order (its own seeded loader): plain training."""

    loader: Loader


@dataclass
class PrivateData:
    """What DP-SGD needs for one client: its examples, its σ plan, its accountant and clipping norm."""

    dataset: Dataset
    collate: Callable[[list], dict[str, torch.Tensor]]
    plan: ClientDPPlan
    accountant: PrivacyAccountant  # stepped in place, once per noisy step
    max_grad_norm: float


@dataclass
class ClientJob:
    start_state: dict[str, torch.Tensor]  # the adapter this client starts from (peft state-dict keys)
    data: PlainData | PrivateData
    seed: int = 0


@dataclass
class _Stacked:
    """One adapted module's K-stacked trainable tensors and the state keys they came from."""

    module: nn.Module
    tensors: dict[str, torch.Tensor]  # state key -> (K, ...) tensor (a Parameter if it trains)


class _Rows:
    """Which job each stacked row holds, while it trains. A job whose steps are done leaves: its end tensors
    are set aside and every stack and optimizer state keeps only the rows still training (AdamW's and SGD's
    state is elementwise, so a cut-out row goes on exactly as before)."""

    def __init__(self, stacks: dict[str, _Stacked], optimizer: torch.optim.Optimizer, count: int) -> None:
        self.stacks, self.optimizer = stacks, optimizer
        self.jobs = list(range(count))  # row -> job
        self.ended: list[dict[str, torch.Tensor]] = [{} for _ in range(count)]  # job -> its end tensors

    @property
    def params(self) -> list[nn.Parameter]:
        return [t for stack in self.stacks.values() for t in stack.tensors.values() if isinstance(t, nn.Parameter)]

    def release(self, done: Callable[[int], bool]) -> None:
        """Set aside the end tensors of the jobs ``done`` says are done and cut their rows out."""
        finished = [done(k) for k in self.jobs]
        if not any(finished):
            return
        leaving = [r for r, gone in enumerate(finished) if gone]
        index = torch.tensor(leaving, device=next(iter(self.params)).device)
        for stack in self.stacks.values():
            for key, tensor in stack.tensors.items():
                # the leaving rows (all of them: the tensor itself, no longer trained) on the CPU, handed out as
                # per-row views (their states are copied again whenever kept: records and files hold bytes)
                leavers = tensor.detach() if len(leaving) == len(finished) else tensor.detach().index_select(0, index)
                rows = leavers.to("cpu", torch.float32).unbind(0)
                for r, row in zip(leaving, rows, strict=True):
                    self.ended[self.jobs[r]][key] = row
        staying = [r for r, gone in enumerate(finished) if not gone]
        if staying:
            self._keep(staying)
        self.jobs = [self.jobs[r] for r in staying]

    def _keep(self, staying: list[int]) -> None:
        count = len(self.jobs)
        index = torch.tensor(staying, device=next(iter(self.params)).device)
        replaced: dict[int, nn.Parameter] = {}
        for stack in self.stacks.values():
            for key, tensor in stack.tensors.items():
                kept = tensor.detach().index_select(0, index)
                if isinstance(tensor, nn.Parameter):
                    kept = nn.Parameter(kept)
                    state = self.optimizer.state.pop(tensor, None)
                    if state:  # per-row moments and buffers; scalars (AdamW's shared step count) as they are
                        self.optimizer.state[kept] = {
                            name: value.index_select(0, index)
                            if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == count
                            else value
                            for name, value in state.items()
                        }
                    replaced[id(tensor)] = kept
                stack.tensors[key] = kept
        for group in self.optimizer.param_groups:
            group["params"] = [replaced[id(p)] for p in group["params"]]


class _BatchContext:
    client_index: torch.Tensor | None = None
    per_sample: bool = False  # DP: backward writes per-example gradients to ``grad_sample``


def _lora_layers(model: PeftModel) -> dict[str, LoraLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def _heads(model: PeftModel) -> dict[str, ModulesToSaveWrapper]:
    return {name: m for name, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)}


def _stack(jobs: list[ClientJob], key: str, requires_grad: bool, device: torch.device) -> torch.Tensor:
    stacked = torch.stack([job.start_state[key] for job in jobs]).to(device)
    return nn.Parameter(stacked, requires_grad=True) if requires_grad else stacked


def _pad_and_concat(batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate the clients' batches, padding token tensors to the longest sequence of the step: each batch is
    copied once into its rows of the step's tensors (padding each one, then concatenating, copied every token
    twice: 17 against 11 ms a step of 512 one-batch clients on a CPU)."""
    counts = [next(iter(batch.values())).shape[0] for batch in batches]
    length = max(batch["input_ids"].shape[1] for batch in batches)
    total = sum(counts)
    out = {
        key: first.new_full((total, length), PAD_VALUES[key])
        if first.dim() == 2 and key in PAD_VALUES
        else first.new_empty((total, *first.shape[1:]))
        for key, first in batches[0].items()
    }
    start = 0
    for batch, count in zip(batches, counts, strict=True):
        end = start + count
        for key, value in batch.items():
            if value.dim() == 2 and key in PAD_VALUES:
                out[key][start:end, : value.shape[1]] = value
            else:
                out[key][start:end] = value
        start = end
    return out


def _add_grad_sample(param: torch.Tensor, grad_sample: torch.Tensor) -> None:
    existing = getattr(param, "grad_sample", None)
    param.grad_sample = grad_sample if existing is None else existing + grad_sample


class _PerSampleMultiLoRA(torch.autograd.Function):
    """``s · B_c (A_c x_n)`` whose backward returns ∂/∂x and writes per-example ∇A_n, ∇B_n to ``grad_sample``
    (the summed gradient is never formed: DP-SGD clips before summing)."""

    @staticmethod
    def forward(ctx, x, A, B, client_index, scale):
        idx = client_index.long()
        h = torch.bmm(x, A.index_select(0, idx).transpose(1, 2))
        ctx.save_for_backward(x, A, B, client_index, h)
        ctx.scale, ctx.a_param, ctx.b_param = float(scale), A, B
        return torch.bmm(h, B.index_select(0, idx).transpose(1, 2)) * scale

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, A, B, client_index, h = ctx.saved_tensors
        idx, scale = client_index.long(), ctx.scale
        v = torch.bmm(grad_out, B.index_select(0, idx)) * scale  # g_n B_c, shared by ∂x and ∇A_n
        grad_x = torch.bmm(v, A.index_select(0, idx)) if ctx.needs_input_grad[0] else None
        if uses_triton("auto", x, A, B, grad_out, rank=A.shape[1]):
            grad_a, grad_b = per_sample_lora_grads(x, A, B, client_index, scale, grad_out)
        else:
            grad_a, grad_b = torch.bmm(v.transpose(1, 2), x), torch.bmm(grad_out.transpose(1, 2), h) * scale
        if ctx.needs_input_grad[1]:
            _add_grad_sample(ctx.a_param, grad_a)
        if ctx.needs_input_grad[2]:
            _add_grad_sample(ctx.b_param, grad_b)
        return grad_x, None, None, None, None


class _PerSampleHead(torch.autograd.Function):
    """Per-client linear head ``W_c h_n + b_c`` with per-example ∇W_n = g_n h_nᵀ, ∇b_n = g_n."""

    @staticmethod
    def forward(ctx, x, weight, bias, client_index):
        idx = client_index.long()
        ctx.save_for_backward(x, weight, client_index)
        ctx.weight, ctx.bias = weight, bias
        out = torch.einsum("nh,nch->nc", x, weight.index_select(0, idx))
        return out + bias.index_select(0, idx) if bias is not None else out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight, client_index = ctx.saved_tensors
        grad_x = torch.einsum("nc,nch->nh", grad_out, weight.index_select(0, client_index.long()))
        if ctx.needs_input_grad[1]:
            _add_grad_sample(ctx.weight, torch.einsum("nc,nh->nch", grad_out, x))
        if ctx.bias is not None and ctx.needs_input_grad[2]:
            _add_grad_sample(ctx.bias, grad_out.clone())
        return grad_x, None, None, None


@contextmanager
def _patched(model: PeftModel, stacks: dict[str, _Stacked], context: _BatchContext):
    """Route every LoRA layer and the head through the stacked per-client tensors while inside."""
    patched = []
    for name, stack in stacks.items():
        module = stack.module
        if isinstance(module, LoraLinear):
            a_key, b_key = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
            scaling = module.scaling["default"]
            dropout = module.lora_dropout["default"]
            base = module.base_layer

            def forward(x, *args, _t=stack.tensors, _ka=a_key, _kb=b_key, _s=scaling, _d=dropout, _base=base, **kw):
                result = _base(x, *args, **kw)
                _a, _b = _t[_ka], _t[_kb]  # read per call: finished clients' rows leave the stacks
                x_in = _d(x).to(_a.dtype)
                if context.per_sample and torch.is_grad_enabled():
                    flat = x_in if x_in.dim() == 3 else x_in.unsqueeze(1)
                    lora = _PerSampleMultiLoRA.apply(flat, _a, _b, context.client_index, _s)
                    lora = lora if x_in.dim() == 3 else lora.squeeze(1)
                else:
                    lora = multi_lora(x_in, _a, _b, context.client_index, _s, accumulate=True)
                return result + lora.to(result.dtype)

        else:  # the per-client classifier head
            w_key = next(k for k in stack.tensors if k.endswith(".weight"))
            b_key = next((k for k in stack.tensors if k.endswith(".bias")), None)

            def forward(x, *args, _t=stack.tensors, _kw=w_key, _kb=b_key, **kwargs):
                _w, _bias = _t[_kw], _t[_kb] if _kb else None
                index = context.client_index
                if context.per_sample and torch.is_grad_enabled():
                    return _PerSampleHead.apply(x, _w, _bias, index)
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


class _PlainClients:
    """Plain training: the loss is Σ_k mean_{i ∈ batch_k} L_i, so client k's gradient is exactly that of its own
    mean batch loss (what ``train_local`` computes for it alone), then optional per-client norm clipping."""

    per_sample = False

    def __init__(self, jobs: list[ClientJob], settings: TrainSettings) -> None:
        self.loaders = [job.data.loader for job in jobs]  # type: ignore[union-attr]
        self.sizes = [len(loader.dataset) for loader in self.loaders]
        if min(self.sizes) == 0:
            raise ValueError("a client has no training examples")
        self.steps = [planned_steps(settings, n) for n in self.sizes]
        self.max_grad_norm = settings.max_grad_norm
        self.shared = _shared_rows(self.loaders)

    def batches(self, k: int, seed: int) -> Iterator[dict | list[int] | None]:
        # shuffled by the loader's own generator; as rows of the shared split where every client has one
        loader = self.loaders[k].rows() if self.shared is not None else self.loaders[k]  # type: ignore[union-attr]
        return iter(cycle_batches(loader, self.steps[k]))

    def collate(self, batches: list) -> tuple[dict[str, torch.Tensor], list[int]]:
        """The step's batch of the clients' batches, and each one's examples."""
        if self.shared is not None:  # rows of one split: one gather for every client
            return self.shared.rows_batch([row for rows in batches for row in rows]), [len(rows) for rows in batches]
        return _pad_and_concat(batches), [count_examples(batch) for batch in batches]

    def loss_weights(self, counts: list[int]) -> torch.Tensor:
        return 1.0 / torch.tensor(counts).repeat_interleave(torch.tensor(counts)).float()

    def loss_divisor(self, count: int) -> int:
        return count

    def gradients_(self, params: list[nn.Parameter], row_index: torch.Tensor, jobs: list[int]) -> None:
        """clip_grad_norm_ for each client's slice separately (what train_local does per client)."""
        if self.max_grad_norm <= 0:
            return
        squares = sum(p.grad.reshape(p.shape[0], -1).pow(2).sum(dim=1) for p in params if p.grad is not None)
        factors = (self.max_grad_norm / (squares.sqrt() + 1e-6)).clamp(max=1.0)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(factors.view(-1, *([1] * (p.dim() - 1))))

    def finish(self) -> None:
        pass

    def result(self, k: int, loss: float, examples: int, moved: Callable[[], bool]) -> TrainResult:
        return TrainResult(
            loss=loss / self.steps[k], num_examples=examples, num_steps=self.steps[k], dataset_size=self.sizes[k]
        )


class _PrivateClients:
    """DP-SGD: the backward writes per-example gradients of each client's own adapter; each client clips them to
    its C, sums them, adds its own noise from its own generator and divides by its expected batch size (Opacus'
    DPOptimizer arithmetic, in the same parameter order). Each draws its own Poisson batches."""

    per_sample = True

    def __init__(self, jobs: list[ClientJob], device: torch.device) -> None:
        self.jobs: list[PrivateData] = [job.data for job in jobs]  # type: ignore[misc]
        for private in self.jobs:
            ensure_within_budget(private.accountant, private.plan)
            if len(private.dataset) == 0:
                raise ValueError("cannot train on an empty dataset")
        # the same generators train_private seeds: sampling from ``seed``, noise from ``seed + 1``
        self.noise_generators = [torch.Generator(device=device).manual_seed(job.seed + 1) for job in jobs]
        self.clip = torch.tensor([p.max_grad_norm for p in self.jobs], device=device)
        self.sizes = [len(p.dataset) for p in self.jobs]
        self.steps = [p.plan.steps_per_round for p in self.jobs]
        self.empty = [0] * len(jobs)

    def collate(self, batches: list) -> tuple[dict[str, torch.Tensor], list[int]]:
        return _pad_and_concat(batches), [count_examples(batch) for batch in batches]

    def batches(self, k: int, seed: int) -> Iterator[dict | None]:
        private = self.jobs[k]
        sampler = PoissonBatches(
            len(private.dataset),
            private.plan.sample_rate,
            private.plan.steps_per_round,
            torch.Generator().manual_seed(seed),
        )
        for indices in sampler:
            if not indices:
                self.empty[k] += 1
                yield None
            else:
                yield private.collate(_items(private.dataset, indices))

    def loss_weights(self, counts: list[int]) -> torch.Tensor:
        return torch.ones(sum(counts))  # Σ_n L_n: per-example gradients, clipped before any sum

    def loss_divisor(self, count: int) -> int:
        return 1

    def gradients_(self, params: list[nn.Parameter], row_index: torch.Tensor, jobs: list[int]) -> None:
        """p.grad[r] = (Σ_{n ∈ batch_k} clip_{C_k}(∇_n) + N(0, σ_k²C_k²)) / E[b_k], row r holding job k."""
        count = row_index.shape[0]
        samples = [
            p.grad_sample if getattr(p, "grad_sample", None) is not None else p.new_zeros((count, *p.shape[1:]))
            for p in params
        ]
        clip = self.clip[torch.tensor(jobs, device=self.clip.device)]
        grads, _norms = clipped_sums(samples, row_index, clip, len(jobs))
        for p in params:
            p.grad_sample = None
        for r, k in enumerate(jobs):  # noise in the optimizer's parameter order, from the client's own generator
            plan, clip_k = self.jobs[k].plan, self.jobs[k].max_grad_norm
            for grad in grads:
                noisy_mean_(grad[r], plan.noise_multiplier * clip_k, plan.expected_batch_size, self.noise_generators[k])
        for p, grad in zip(params, grads, strict=True):
            p.grad = grad

    def finish(self) -> None:
        for private in self.jobs:
            private.accountant.step(
                private.plan.noise_multiplier, private.plan.sample_rate, private.plan.steps_per_round
            )

    def result(self, k: int, loss: float, examples: int, moved: Callable[[], bool]) -> DPTrainResult:
        if not moved():  # the silent no-update hazard of DP training (opacus #820): a noisy step always moves them
            raise RuntimeError("DP-SGD finished but a client's trainable weights are bit-identical to its start")
        plan, accountant = self.jobs[k].plan, self.jobs[k].accountant
        return DPTrainResult(
            loss=loss / max(examples, 1),
            num_examples=examples,
            num_steps=self.steps[k],
            dataset_size=self.sizes[k],
            empty_batches=self.empty[k],
            epsilon=accountant.epsilon(plan.delta),
            noise_multiplier=plan.noise_multiplier,
            sample_rate=plan.sample_rate,
        )


def _shared_rows(loaders: list) -> object | None:
    """The split every loader draws from when each is a ``RowBatches`` over a subset of one ``PaddedRows``
    (clients cut from the training set collated once, ``Workspace``): a step then gathers all its clients' rows
    in one pass (``rows_batch``) instead of a batch per client padded and concatenated: 7-11 against 29-46 ms a
    step of 512 one-batch clients on a 2-core CPU, the same tensors."""
    datasets = [getattr(loader, "dataset", None) for loader in loaders]
    first = datasets[0]
    shared = all(
        callable(getattr(loader, "rows", None)) and getattr(data, "ids", None) is not None
        and data.tensors is first.tensors  # type: ignore[union-attr]
        for loader, data in zip(loaders, datasets, strict=True)
    )  # fmt: skip
    return first if shared else None


def _items(dataset: Dataset, indices: list[int]) -> list:
    """The items at ``indices``, in one call where the dataset has one (as ``DataLoader`` fetches a batch)."""
    getitems = getattr(dataset, "__getitems__", None)
    return getitems(indices) if getitems is not None else [dataset[i] for i in indices]


def _client_group(jobs: list[ClientJob], settings: TrainSettings, device: torch.device):
    kinds = {type(job.data) for job in jobs}
    if len(kinds) != 1:
        raise ValueError("a wave must be all DP-SGD jobs or none")
    return _PrivateClients(jobs, device) if kinds == {PrivateData} else _PlainClients(jobs, settings)


def _forward_backward(
    model: PeftModel,
    batch: dict[str, torch.Tensor],
    owner: torch.Tensor,
    scale: torch.Tensor,
    per_sample_params: list[nn.Parameter],
    context: _BatchContext,
    device: torch.device,
    max_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backpropagate Σ_n scale_n L_n over the step's examples, in length-sorted chunks; returns the per-example
    losses and owning clients in the order processed (per-sample gradients, if any, are in that order too)."""
    losses, owners, samples = [], [], {id(p): [] for p in per_sample_params}
    for chunk, inputs in split_by_length(batch, max_tokens):
        inputs = {key: value.to(device) for key, value in inputs.items()}
        labels = inputs.pop("labels")
        context.client_index = owner[chunk].to(device)
        per_example = per_example_loss(model(**inputs).logits, labels)
        (per_example * scale[chunk].to(device)).sum().backward()
        for p in per_sample_params:  # per-example gradients of this chunk, kept in processing order
            samples[id(p)].append(p.grad_sample)
            p.grad_sample = None
        losses.append(per_example.detach())
        owners.append(context.client_index)
    for p in per_sample_params:
        p.grad_sample = torch.cat(samples[id(p)]) if samples[id(p)][0] is not None else None
    return torch.cat(losses), torch.cat(owners)


def train_batched(
    model: PeftModel,
    jobs: list[ClientJob],
    settings: TrainSettings,
    optimizer_kind: str = "adamw",
    max_tokens: int = 0,
) -> list[tuple[dict[str, torch.Tensor], TrainResult | DPTrainResult]]:
    """Train every job's adapter for its planned steps in shared forward/backward passes.

    Returns, per job, its end adapter state (the start state with its trained tensors replaced, on the CPU)
    and its ``TrainResult`` (``DPTrainResult`` for private jobs, whose accountants are stepped in place).
    The trainable parts are those marked trainable on ``model`` (the same for every client). A step's examples
    go through the model longest first in chunks of at most ``max_tokens`` padded tokens (0: all at once),
    each chunk padded only to its own longest example: less padding, and bounded activation memory. Private jobs
    are checked against their budgets first: ``PrivacyBudgetExceeded`` is raised before anything trains.
    """
    if not jobs:
        return []
    device = next(model.parameters()).device
    clients = _client_group(jobs, settings, device)
    stacks = _build_stacks(model, jobs, device)
    params = [t for stack in stacks.values() for t in stack.tensors.values() if isinstance(t, nn.Parameter)]
    if not params:
        raise ValueError("no trainable parameters: nothing to optimize")
    # AdamW's fused kernel: the stacks hold K clients' rows, and the step per tensor ran 4.6x faster fused (512
    # clients, 2-core CPU); elementwise like the others, so each row is still its own client's AdamW
    optimizer = make_optimizer(params, settings, optimizer_kind, fused=True)
    rows = _Rows(stacks, optimizer, len(jobs))
    iterators = [clients.batches(k, job.seed) for k, job in enumerate(jobs)]
    torch.manual_seed(jobs[0].seed)  # dropout masks (they depend on the wave's composition anyway)
    losses, examples = [0.0] * len(jobs), [0] * len(jobs)
    context = _BatchContext()
    context.per_sample = clients.per_sample
    model.train()
    with _patched(model, stacks, context):
        for step in range(max(clients.steps)):
            rows.release(lambda k, step=step: step >= clients.steps[k])  # a client past its last step leaves
            _step(model, clients, iterators, rows, context, device, max_tokens, losses, examples)
    rows.release(lambda k: True)
    clients.finish()
    trained = [key for stack in stacks.values() for key, t in stack.tensors.items() if isinstance(t, nn.Parameter)]
    results = []
    for k, job in enumerate(jobs):
        state = {**job.start_state, **rows.ended[k]}

        def moved(state=state, start=job.start_state) -> bool:  # asked only where it matters (DP-SGD)
            return not all(torch.equal(state[key], start[key].to(state[key].dtype)) for key in trained)

        results.append((state, clients.result(k, losses[k], examples[k], moved)))
    return results


def _step(model, clients, iterators, rows: _Rows, context, device, max_tokens, losses, examples) -> None:
    """One optimizer step of every client still training (each holds one row of the stacks)."""
    drawn = [(r, next(iterators[k])) for r, k in enumerate(rows.jobs)]
    present = [(r, b) for r, b in drawn if b is not None]  # DP: empty Poisson batches drop out here
    params = rows.params
    context.client_index = torch.zeros(0, dtype=torch.long, device=device)
    if present:
        owners = [r for r, _ in present]
        batch, counts = clients.collate([b for _, b in present])
        owner = torch.repeat_interleave(torch.tensor(owners), torch.tensor(counts))
        per_sample_params = params if clients.per_sample else []
        per_example, context.client_index = _forward_backward(
            model, batch, owner, clients.loss_weights(counts), per_sample_params, context, device, max_tokens
        )
        sums = torch.zeros(len(rows.jobs), device=device).index_add(0, context.client_index, per_example).tolist()
        for r, c in zip(owners, counts, strict=True):
            losses[rows.jobs[r]] += sums[r] / clients.loss_divisor(c)
            examples[rows.jobs[r]] += c
    clients.gradients_(params, context.client_index, rows.jobs)
    rows.optimizer.step()
    rows.optimizer.zero_grad(set_to_none=True)
