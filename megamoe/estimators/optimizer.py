"""The optimizer step's compute: Muon's Newton–Schulz FLOPs per pipeline rank.

AdamW's step is elementwise (memory-bound, a few ms at M32's sizes), left out like the other
memory-bound kernels. Muon's is not: every step it orthogonalises each hidden matrix's update
with ``train.muon.ns_steps`` Newton–Schulz iterations of large matmuls
(megamoe.train.muon.newton_schulz_flops), and without optimizer sharding every data-parallel
replica does so for the matrices it holds: its stages' layers and, of each MoE layer, the
num_experts / ep experts of its expert-parallel rank. The counts come from the model itself,
built on the meta device, with the optimizer's own rule for what Muon updates
(megamoe.train.optim.muon_matrices), so they follow any family and ``moe.layer_freq``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megamoe.config.choices import Optimizer
from megamoe.config.schema import Config
from megamoe.models import build_stage
from megamoe.nn.moe.experts import expert_parameters
from megamoe.train.muon import newton_schulz_flops
from megamoe.train.optim import muon_matrices


@dataclass(frozen=True)
class LayerNewtonSchulz:
    """One decoder layer's Newton–Schulz FLOPs per step."""

    shared: int  # on the matrices every expert-parallel rank holds (attention, router, dense / shared FFN)
    experts: int  # on all its routed experts: an expert-parallel rank does 1 / ep of them


_CACHE: dict[str, tuple[LayerNewtonSchulz, ...]] = {}  # by the config sections the counts depend on


def newton_schulz_per_layer(cfg: Config) -> tuple[LayerNewtonSchulz, ...]:
    """Each decoder layer's Newton–Schulz FLOPs per step under ``cfg``'s optimizer (zeros for AdamW)."""
    if cfg.train.optimizer != Optimizer.MUON:
        return (LayerNewtonSchulz(0, 0),) * cfg.model.num_layers
    key = repr((cfg.model, cfg.moe, cfg.train.muon.ns_steps))
    if key not in _CACHE:
        with torch.device("meta"):
            model = build_stage(cfg)
        matrices = muon_matrices(model, model.embedding_parameters())
        experts = {id(p) for p in expert_parameters(model)}
        counts = [[0, 0] for _ in range(cfg.model.num_layers)]
        for name, param in model.named_parameters():
            if param in matrices:
                layer = int(name.split(".")[1])  # Muon's matrices all sit in "layers.<i>."
                counts[layer][id(param) in experts] += newton_schulz_flops([matrices[param]], cfg.train.muon.ns_steps)
        _CACHE[key] = tuple(LayerNewtonSchulz(shared, routed) for shared, routed in counts)
    return _CACHE[key]


def rank_newton_schulz_flops(cfg: Config, layers: list[int], ep: int) -> float:
    """Newton–Schulz FLOPs per step of a rank holding the global decoder ``layers`` at expert parallelism ``ep``."""
    per_layer = newton_schulz_per_layer(cfg)
    return sum(per_layer[i].shared + per_layer[i].experts / ep for i in layers)
