"""A method written outside the package, to show (and test) that adding a method is one file.

FedAvg with server momentum on B (Hsu et al., 2019, applied to one factor): A is averaged as in FedIT; B moves
by a momentum-smoothed version of its averaged change,

    v ← β v + (B̄ − B),   B ← B + η v,

so with β = 0 and η = 1 it is FedIT exactly. Use it with ``--set method-modules=tests/plugins/fedavgm_b.py
--set strategy=fedavgm-b``; its options are ``method.fedavgm-b.momentum`` and ``method.fedavgm-b.server-lr``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedlowrank.factors import LayerFactors
from fedlowrank.lowrank import weighted_average
from strategies.method import MethodOptions, MethodSpec, RoundInput, ServerUpdate, option, register_method


@dataclass(frozen=True)
class FedAvgMOptions(MethodOptions):
    momentum: float = option(0.9, "server momentum β on B's averaged change", minimum=0)
    server_lr: float = option(1.0, "server learning rate η", minimum=0)

    def validate(self, method: str) -> None:
        super().validate(method)
        if self.momentum >= 1:
            from fedlowrank.config import ConfigError

            raise ConfigError(
                f"method.{method}.momentum must be < 1 (a momentum of 1 never forgets), got {self.momentum}"
            )


@register_method("fedavgm-b", spec=MethodSpec(), options=FedAvgMOptions)
def server_update(inputs: RoundInput, options: FedAvgMOptions = FedAvgMOptions()) -> ServerUpdate:
    factors, velocity = {}, {}
    for layer, previous in inputs.previous.items():
        a_bar = weighted_average([client[layer].A for client in inputs.clients], inputs.weights)
        b_bar = weighted_average([client[layer].B for client in inputs.clients], inputs.weights)
        before = inputs.state.get(layer, torch.zeros_like(previous.B, dtype=torch.float64))
        velocity[layer] = options.momentum * before + (b_bar.double() - previous.B.double())
        factors[layer] = LayerFactors(
            A=a_bar, B=(previous.B.double() + options.server_lr * velocity[layer]).to(b_bar.dtype)
        )
    return ServerUpdate(factors=factors, state=velocity)
