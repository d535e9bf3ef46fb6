"""Fused per-sample gradients for LoRA factors (and any trainable ``nn.Linear``, e.g. the head).

For a linear map y = x Wᵀ (+ b) applied to sample i's tokens X_i (T × d_in) with output gradient G_i
(T × d_out), the per-sample gradient is ∇W_i = G_iᵀ X_i: one batched matrix product over the batch.
For a LoRA layer this gives ∇B_i = U_iᵀ H_i and ∇A_i = V_iᵀ X_i (privacy.md §5).

``FusedPerSampleGrads`` swaps the forward of every trainable ``nn.Linear`` for an autograd function
that, in the one backward pass, returns the input gradient and writes the per-sample weight gradients
to ``param.grad_sample`` — skipping autograd's summed weight gradient, hooks and activation lists.
The result plugs into Opacus' ``DPOptimizer`` (which reads ``grad_sample``, clips, noises, accounts)
or into ``clip_and_noise_`` here (standalone).
"""

from __future__ import annotations

import torch
from torch import nn

from fedlowrank.privacy.clipping import clipped_sums, noisy_mean_


class _PerSampleLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, module: nn.Linear):
        ctx.save_for_backward(x, weight)
        ctx.module = module
        return nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        module = ctx.module
        grad_x = grad_out @ weight if ctx.needs_input_grad[0] else None
        if module.weight.requires_grad:
            # (N, ..., out) × (N, ..., in) -> (N, out, in); sequence dims are summed inside the bmm
            g = grad_out.reshape(grad_out.shape[0], -1, grad_out.shape[-1])
            a = x.reshape(x.shape[0], -1, x.shape[-1])
            _accumulate(module.weight, torch.bmm(g.transpose(1, 2), a))
        if module.bias is not None and module.bias.requires_grad:
            _accumulate(module.bias, grad_out.reshape(grad_out.shape[0], -1, grad_out.shape[-1]).sum(dim=1))
        return grad_x, None, None, None


def _accumulate(param: torch.Tensor, grad_sample: torch.Tensor) -> None:
    existing = getattr(param, "grad_sample", None)
    param.grad_sample = grad_sample if existing is None else existing + grad_sample


def _fused_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled():
        return nn.functional.linear(x, module.weight, module.bias)
    return _PerSampleLinear.apply(x, module.weight, module.bias, module)


class FusedPerSampleGrads:
    """Context for a model: per-sample grads of its trainable parameters, all of which must sit in Linears.

    Use as ``with FusedPerSampleGrads(model) as engine: ...``; on exit the modules are restored and the
    ``grad_sample`` attributes removed, so the model can be wrapped again next round.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modules: list[nn.Linear] = []
        covered: set[int] = set()
        for name, module in model.named_modules():
            direct = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if not direct:
                continue
            if type(module) is not nn.Linear:
                raise ValueError(
                    f"fused DP path supports trainable nn.Linear layers only; {name!r} is a "
                    f"{type(module).__name__} (use dp.engine = 'hooks')"
                )
            self.modules.append(module)
            covered.update(id(p) for p in direct)
        missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
        if missing:
            raise ValueError(f"trainable parameters outside Linear layers: {missing[:3]}")
        if not self.modules:
            raise ValueError("no trainable parameters: nothing to privatise")

    @property
    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for m in self.modules for p in m.parameters(recurse=False) if p.requires_grad]

    def __enter__(self) -> FusedPerSampleGrads:
        for module in self.modules:
            module.forward = _fused_forward.__get__(module)  # instance attribute: state_dict keys unchanged
        return self

    def __exit__(self, *exc: object) -> None:
        for module in self.modules:
            module.__dict__.pop("forward", None)
        for p in self.parameters:
            for attr in ("grad_sample", "summed_grad"):
                if hasattr(p, attr):
                    delattr(p, attr)


def clip_and_noise_(
    params: list[torch.Tensor],
    max_grad_norm: float,
    noise_multiplier: float,
    expected_batch_size: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Standalone DP-SGD gradient: p.grad = (Σ_i c_i ∇_i + N(0, σ²C²)) / E[b]; returns the per-sample norms.

    One client's case of ``fedlowrank.privacy.clipping`` (the batched engine's clip-and-noise). Works on an empty
    batch (noise only).
    """
    count = params[0].grad_sample.shape[0]
    owner = torch.zeros(count, dtype=torch.long, device=params[0].device)
    clip = torch.tensor([max_grad_norm], device=params[0].device)
    sums, norms = clipped_sums([p.grad_sample for p in params], owner, clip, 1)
    for p, total in zip(params, sums, strict=True):
        summed = total[0]
        noisy_mean_(summed, noise_multiplier * max_grad_norm, expected_batch_size, generator)
        p.grad = summed.view_as(p).to(p.dtype)
        p.grad_sample = None
    return norms


def empty_grad_samples(params: list[torch.Tensor]) -> None:
    """Zero-sample gradients: an empty Poisson batch still takes its (noise-only) step."""
    for p in params:
        p.grad_sample = p.new_zeros((0, *p.shape))


__all__ = [
    "FusedPerSampleGrads",
    "clip_and_noise_",
    "empty_grad_samples",
]
