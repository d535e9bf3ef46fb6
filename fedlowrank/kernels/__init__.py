"""Fused kernels for many clients' LoRA adapters on one device, each with a plain-PyTorch twin.

* :func:`multi_lora` — differentiable LoRA branch of K stacked adapters over a batch mixing clients
  (Triton on CUDA, reference elsewhere; see :mod:`.ops` for the ``backend`` rule).
* :func:`multi_lora_backward`, :func:`per_sample_lora_grads`, :func:`per_sample_grad_norms_sq` — the backward
  pieces, per-client and per-example (for DP clipping), with the same dispatch.
* :mod:`.reference` — the PyTorch twins (CPU fallback, test oracle), including the segmented (SGMV) forward
  :func:`reference.multi_lora_forward_segmented` on ``torch.nn.functional.grouped_mm``.
* :mod:`.triton_kernels` — the Triton kernels; imported lazily, ``TRITON_AVAILABLE`` says whether triton is there.
"""

from . import reference
from .ops import (
    Backend,
    MultiLoRAFunction,
    multi_lora,
    multi_lora_backward,
    per_sample_grad_norms_sq,
    per_sample_lora_grads,
    triton_available,
    uses_triton,
)
from .reference import multi_lora_forward_segmented, sort_by_client

__all__ = [
    "Backend",
    "MultiLoRAFunction",
    "multi_lora",
    "multi_lora_backward",
    "multi_lora_forward_segmented",
    "per_sample_grad_norms_sq",
    "per_sample_lora_grads",
    "reference",
    "sort_by_client",
    "triton_available",
    "uses_triton",
]
