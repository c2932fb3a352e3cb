"""Which layout to rent: every valid (pp, dp, ep, virtual stages, schedule, micro-batch,
recompute, stage split) of a config on N GPUs, its memory per GPU and its predicted step time.

Memory is megamoe.estimators.memory's estimate for the fullest pipeline rank at an assumed expert
imbalance (megamoe.estimators.routing; 1 by default); a layout fits when it stays under
``(1 - reserve)`` of the GPU (the estimate leaves out the CUDA context, NCCL buffers and
fragmentation), and :func:`max_imbalance` says how much routing imbalance a layout still fits
at. The step time adds, with no overlap between them:

* **compute**: each pipeline rank's FLOPs per micro-batch (its stages' layers, head and loss,
  recompute included; megamoe.estimators.balance) ÷ the sustained throughput
  ``peak × efficiency``;
* **the pipeline's bubble**: a step runs ``m`` slots of the slowest rank's micro-batch time
  plus :func:`bubble_slots` idle ones (1F1B: pp − 1; interleaved 1F1B: (pp − 1) / v, Megatron's
  figures; the zero-bubble and V schedules' are smaller); ``m`` micro-batches per step;
* **expert all-to-all**: in each MoE layer, top-k copies of each token's hidden state (bf16) go
  to other ep ranks and come back, in the forward and the backward (and once more in a full
  recompute), over the ep group's link;
* **pipeline send / receive**: one hidden state per token across each stage boundary, forward
  and backward;
* **gradient all-reduce**: a ring all-reduce of the fp32 gradients, dense over dp and experts
  over edp, each over its group's link;
* **Newton–Schulz** (``train.optimizer=muon``): the slowest rank's orthogonalisations of its
  matrices' updates ÷ the sustained throughput (megamoe.estimators.optimizer); zero for AdamW.

A group stays inside a node when its ranks do (ranks are laid out pp-major, then edp, then ep:
ep groups are consecutive ranks, a dp group is dp consecutive ranks); otherwise it runs at the
inter-node bandwidth per GPU. Ignored: AdamW's update and other memory-bound kernels,
kernel launch and Python overheads, overlap of communication with compute (the gradient
all-reduce that parallel.overlap_grad_reduce hides behind the last backward counts in full), routing
imbalance in the time (balanced routing assumed), link contention between groups, and NCCL's hierarchical
algorithms. docs/benchmarks.md records how its predictions compare with measured steps.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from megamoe.config.choices import V_SCHEDULES, FfnType, Recompute, Schedule, StageBalance
from megamoe.config.schema import Config, MegaMoEConfig, as_object
from megamoe.errors import ConfigError
from megamoe.estimators import balance, flops, memory, optimizer
from megamoe.estimators.routing import ExpertLoads
from megamoe.models import validate_config
from megamoe.parallel import stages

BF16 = 2
FP32 = 4
RECOMPUTE = ("none", "selective", "full")
MICRO_BATCHES = (1, 2, 4, 8, 16)
MAX_VIRTUAL_STAGES = 4


@dataclass(frozen=True)
class Hardware:
    """One GPU and its links. Bandwidths are per GPU, one direction, in gigabits per second."""

    name: str
    memory_gib: float
    peak_tflops: float  # dense bf16
    gpus_per_node: int = 8
    intra_node_gbps: float = 3600.0  # NVLink 4: 450 GB/s each way
    inter_node_gbps: float = 400.0  # one 400 Gb/s NIC per GPU
    efficiency: float = 0.6  # the share of peak the matmuls sustain
    reserve: float = 0.1  # the share of memory kept free for what the estimate leaves out

    @property
    def usable_gib(self) -> float:
        return self.memory_gib * (1 - self.reserve)

    @property
    def sustained_flops(self) -> float:
        return self.peak_tflops * 1e12 * self.efficiency

    def bytes_per_s(self, inside_node: bool) -> float:
        return (self.intra_node_gbps if inside_node else self.inter_node_gbps) * 1e9 / 8


GPUS: dict[str, Hardware] = {  # NVIDIA's datasheets: SXM parts, HDR / NDR InfiniBand per GPU
    "a100-80gb": Hardware("a100-80gb", 80, 312, intra_node_gbps=2400, inter_node_gbps=200),
    "h100-80gb": Hardware("h100-80gb", 80, 989),
    "h200-141gb": Hardware("h200-141gb", 141e9 / 2**30, 989),
}


@dataclass(frozen=True)
class Layout:
    """The settings one candidate changes, under the config keys that select it."""

    pp: int
    ep: int
    virtual_stages: int
    schedule: str
    micro_batch: int
    recompute: str
    split: str  # "even" or "auto" (parallel.stage_balance)

    def overrides(self) -> dict[str, Any]:
        return {"parallel.pp": self.pp, "parallel.ep": self.ep, "parallel.virtual_stages": self.virtual_stages,
                "parallel.schedule": self.schedule, "parallel.stage_balance": self.split,
                "parallel.layers_per_stage": None, "train.micro_batch": self.micro_batch,
                "train.activation_checkpointing": self.recompute}

    def short(self) -> str:
        chunks = f" v={self.virtual_stages}" if self.virtual_stages > 1 else ""
        return (f"pp={self.pp}{chunks} ep={self.ep} mb={self.micro_batch} recompute={self.recompute} "
                f"split={self.split}")


@dataclass(frozen=True)
class StepTime:
    """Seconds of one optimizer step, by part (they add up to ``total``)."""

    compute: float
    bubble: float
    all_to_all: float
    send_recv: float
    grad_reduce: float
    newton_schulz: float = 0.0  # Muon's orthogonalisations in the optimizer step

    @property
    def total(self) -> float:
        return self.compute + self.bubble + self.all_to_all + self.send_recv + self.grad_reduce + self.newton_schulz


@dataclass(frozen=True)
class Plan:
    """A layout that fits, with what it costs."""

    layout: Layout
    dp: int
    memory_gib: float
    step: StepTime
    tokens_per_s: float
    mfu: float
    days: float
    gpu_hours: float
    stage_layers: tuple[int, ...]

    def summary(self) -> dict[str, Any]:
        """The JSON a script reads: the overrides that select the layout and its figures."""
        split = {"parallel.stage_balance": "even", "parallel.layers_per_stage": list(self.stage_layers)}
        return {"layout": self.layout.overrides() | split,
                "dp": self.dp, "memory_gib": round(self.memory_gib, 2), "step_s": round(self.step.total, 4),
                "tokens_per_s": round(self.tokens_per_s), "mfu": round(self.mfu, 4), "days": round(self.days, 2),
                "gpu_hours": round(self.gpu_hours)}


@dataclass
class Rejection:
    """A candidate that does not work, and why (``memory_gib`` when it was too big)."""

    layout: Layout
    reason: str
    memory_gib: Optional[float] = None


@dataclass
class PlanResult:
    plans: list[Plan] = field(default_factory=list)  # fastest first
    rejected: list[Rejection] = field(default_factory=list)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(cfg: Config | MegaMoEConfig, gpus: int) -> Iterator[Layout]:
    """Every combination the planner considers (validity is checked when it is evaluated)."""
    m = cfg.model
    for pp in _divisors(gpus):
        if pp > m.num_layers:
            break
        for ep in _divisors(gpus // pp):
            if cfg.moe.num_experts % ep or (m.ffn_type != FfnType.MOE and ep > 1):
                continue
            chunks = range(1, min(MAX_VIRTUAL_STAGES, m.num_layers // pp) + 1) if pp > 1 else [1]  # ≥ 1 layer each
            for v, mb, recompute in itertools.product(chunks, MICRO_BATCHES, RECOMPUTE):
                for schedule, split in itertools.product(schedules(v), ("even", "auto") if pp > 1 else ("even",)):
                    yield Layout(pp, ep, v, schedule, mb, recompute, split)


def schedules(virtual_stages: int) -> tuple[str, ...]:
    """The schedules that run ``virtual_stages`` chunks per rank: 1F1B for one; the looped
    interleaved ones for more; the V ones (ZB-V, DualPipeV) for exactly two."""
    if virtual_stages == 1:
        return (Schedule.ONE_F_ONE_B,)
    return (Schedule.INTERLEAVED_1F1B, Schedule.INTERLEAVED_ZERO_BUBBLE) + (V_SCHEDULES if virtual_stages == 2 else ())


def with_layout(cfg: Config | MegaMoEConfig, layout: Layout) -> MegaMoEConfig:
    """``cfg`` (as plain schema objects, which read fast) with the layout's keys set and validated
    (ConfigError for an impossible one). An auto split is computed once and set explicitly."""
    plain = as_object(cfg)
    parallel = dataclasses.replace(plain.parallel, pp=layout.pp, ep=layout.ep, virtual_stages=layout.virtual_stages,
                                   schedule=layout.schedule, stage_balance=layout.split, layers_per_stage=None)
    train = dataclasses.replace(plain.train, micro_batch=layout.micro_batch, activation_checkpointing=layout.recompute)
    candidate = dataclasses.replace(plain, parallel=parallel, train=train)
    validate_config(candidate)
    if layout.split == StageBalance.AUTO:
        split = dataclasses.replace(parallel, stage_balance="even", layers_per_stage=balance.balanced_split(candidate))
        candidate = dataclasses.replace(candidate, parallel=split)
    return candidate


def bubble_slots(schedule: str, pp: int, v: int, m: int) -> float:
    """The idle time of a step, in slots of one micro-batch's forward and backward on a rank.

    The makespan minus the busy time of torch's own action order for ``schedule`` (pp ranks, v
    chunks each, m micro-batches), run with equal chunk times for the forward, the input
    gradient and the weight gradient (the zero-bubble paper's T_F = T_B = T_W; a full backward
    is both) and free communication; tests/parallel/test_pipeline.py replays torch's lists to
    check every case. It is the papers' figure for 1F1B, (p − 1)(t_f + t_b), and interleaved
    1F1B, (p − 1)(t_f + t_b) / v (Narayanan et al., 2021), and for ZB-H1, (p − 1)(T_F + T_B − T_W)
    (Qi et al., 2024): one chunk forward per rank boundary. Torch's V orders (ZB-V, DualPipeV)
    leave only the start-up skew, (p − 1) chunk forwards: the ZB paper's zero bubble assumes an
    optimizer step that lets the next step start early, and ours synchronises (grad norm,
    clipping). With fewer micro-batches the pipeline idles more: below pp for the
    interleaved schedules (exact for zero bubble down to m = pp / 2, low below), below
    2·pp − 1 for ZB-V (torch pads its list to that many).
    """
    if pp == 1:
        return 0.0
    idle: dict[str, float] = {
        Schedule.ONE_F_ONE_B: pp - 1,
        Schedule.INTERLEAVED_1F1B: (pp - 1) / v + max(0, pp - m) * (v - 1) / v,
        Schedule.INTERLEAVED_ZERO_BUBBLE: (pp - 1) / (3 * v) + max(0, pp - m) / 3,
        Schedule.ZBV_ZERO_BUBBLE: max((pp - 1) / 6, (2 * pp - 1 - m) / 3),
        Schedule.DUALPIPEV: (pp - 1) / 6,
    }
    return idle[schedule]


def _ring_all_reduce_s(nbytes: float, ranks: int, bytes_per_s: float) -> float:
    return 2 * (ranks - 1) / ranks * nbytes / bytes_per_s if ranks > 1 else 0.0


def step_time(cfg: Config, lay: memory.GridShape, hw: Hardware, layers: list[int]) -> StepTime:
    """The predicted step of ``cfg`` on layout ``lay`` with stage split ``layers`` (see the module docstring)."""
    t, m, p = cfg.train, cfg.model, cfg.parallel
    tokens = t.micro_batch * t.seq_len
    micro_batches = t.global_batch // (t.micro_batch * lay.dp)
    gpn = hw.gpus_per_node
    rank_flops = stages.rank_totals(cfg, balance.stage_costs(cfg, layers))  # training FLOPs per token
    held = stages.rank_layer_indices(cfg, layers)
    rank_layers = [memory.layer_mix(cfg, indices) for indices in held]

    # dispatch + combine, forward / backward (/ again)
    passes = 6 if t.activation_checkpointing == Recompute.FULL else 4
    a2a_bytes = tokens * cfg.moe.top_k * m.hidden_size * BF16 * (lay.ep - 1) / lay.ep
    a2a_s = passes * a2a_bytes / hw.bytes_per_s(lay.ep <= gpn) if m.ffn_type == FfnType.MOE else 0.0
    boundary_s = 2 * tokens * m.hidden_size * BF16 / hw.bytes_per_s(lay.world_size <= gpn) if lay.pp > 1 else 0.0

    send_recv_s = p.virtual_stages * boundary_s  # every chunk of a rank receives and sends
    per_rank = [(f * tokens / hw.sustained_flops, n.moe * a2a_s) for f, n in zip(rank_flops, rank_layers)]
    compute_s, all_to_all_s = max(per_rank, key=sum)  # the slowest rank paces the pipeline
    slot = compute_s + all_to_all_s + send_recv_s
    fill = bubble_slots(p.schedule, lay.pp, p.virtual_stages, micro_batches)

    grad_s = 0.0
    for r in range(lay.pp):
        params = memory.stage_params(cfg, r, lay.ep, rank_layers[r])
        experts = params.layers.moe * memory.layer_params(cfg, lay.ep, moe_layer=True).experts
        dense_s = _ring_all_reduce_s(FP32 * (params.total - experts), lay.dp, hw.bytes_per_s(lay.dp <= gpn))
        expert_s = _ring_all_reduce_s(FP32 * experts, lay.dp // lay.ep, hw.bytes_per_s(lay.dp <= gpn))
        grad_s = max(grad_s, dense_s + expert_s)
    newton_schulz_s = max(optimizer.rank_newton_schulz_flops(cfg, r, lay.ep) for r in held) / hw.sustained_flops
    n = micro_batches
    return StepTime(n * compute_s, fill * slot, n * all_to_all_s, n * send_recv_s, grad_s, newton_schulz_s)


def model_flops_per_token(cfg: Config) -> float:
    """Training FLOPs per token without recompute (what MFU counts): 3 × (forward + attention scores)."""
    return 3 * (flops.fwd_flops_per_token(cfg) + flops.attention_flops_per_token(cfg, cfg.train.seq_len))


def evaluate_layout(cfg: Config, layout: Layout, gpus: int, hw: Hardware,
                    imbalance: float = 1.0) -> Plan | Rejection:
    """One candidate: a Plan if it is valid and fits at expert imbalance ``imbalance``, else why not."""
    try:
        candidate = with_layout(cfg, layout)
        lay, rank = balance.memory_per_gpu(candidate, gpus, imbalance)
    except ConfigError as exc:
        return Rejection(layout, f"not valid: {exc}")
    gib = rank.total / memory.GIB
    if gib > hw.usable_gib:
        return Rejection(layout, f"out of memory: {gib:.1f} GiB > {hw.usable_gib:.1f} GiB usable", gib)
    layers = balance.stage_layers(candidate)
    step = step_time(candidate, lay, hw, layers)
    t = candidate.train
    tokens_per_step = t.global_batch * t.seq_len
    tokens_per_s = tokens_per_step / step.total
    days = t.steps * step.total / 86400
    mfu = model_flops_per_token(candidate) * tokens_per_s / (gpus * hw.peak_tflops * 1e12)
    return Plan(layout, lay.dp, gib, step, tokens_per_s, mfu, days, days * 24 * gpus, tuple(layers))


def plan(cfg: Config, gpus: int, hw: Hardware, imbalance: float = 1.0) -> PlanResult:
    """Every candidate on ``gpus`` GPUs of kind ``hw``: the ones that fit at expert imbalance
    ``imbalance``, fastest first, and the rest."""
    result, plain = PlanResult(), as_object(cfg)
    for layout in layouts(plain, gpus):
        outcome = evaluate_layout(plain, layout, gpus, hw, imbalance)
        if isinstance(outcome, Plan):
            result.plans.append(outcome)
        else:
            result.rejected.append(outcome)
    result.plans.sort(key=lambda p: (p.step.total, p.memory_gib))
    return result


def max_imbalance(cfg: Config, layout: Layout, gpus: int, hw: Hardware,
                  resolution: float = 0.01) -> Optional[float]:
    """The largest expert imbalance (megamoe.estimators.routing) at which ``layout`` still fits,
    to ``resolution``; None for a model without routed experts. Memory grows with the
    imbalance, so a bisection finds it; the most there is (num_experts / top_k) when it always fits."""
    if cfg.model.ffn_type != FfnType.MOE:
        return None
    candidate = with_layout(cfg, layout)

    def fits(imbalance: float) -> bool:
        return balance.memory_per_gpu(candidate, gpus, imbalance)[1].total / memory.GIB <= hw.usable_gib

    low, high = 1.0, ExpertLoads.of(candidate.moe).max_imbalance
    if fits(high):
        return high
    while high - low > resolution:
        middle = (low + high) / 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return round(low, 2)
