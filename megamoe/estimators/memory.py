"""GPU memory per rank of a training run, estimated from the config before anything launches.

Accounting, per GPU, for the pipeline rank that needs the most:

* **Model states, 16 B per parameter the rank holds** with AdamW. We keep fp32 parameters and run
  bf16 under autocast, so: fp32 weights 4 + fp32 gradients 4 + AdamW m 4 + v 4. (Megatron-Core's
  mixed precision instead stores bf16 weights 2 + fp32 main grads 4 + fp32 master weights 4 +
  m 4 + v 4 = 18 B.) The optimizer's part follows ``train.optimizer`` and
  ``train.optimizer_state_dtype`` (:func:`optimizer_state_bytes`): Muon keeps one momentum per
  hidden matrix's element (12 B per parameter in fp32, 10 B in bf16) while the vocabulary
  matrices, norms and biases keep AdamW's two moments; bf16 state halves either. A rank holds
  its stages' layers and, of each MoE layer, num_experts / ep experts. There is no ZeRO, so data
  parallelism shards nothing.
* **Which layers**: a rank's estimate depends on how many of its layers are MoE and how many
  dense (:class:`LayerMix`; ``moe.layer_freq`` mixes them): each kind has its own parameters,
  weight copies and saved activations, and the working sets below are those of the largest
  kind the rank holds.
* **bf16 weight copies** (:func:`weight_copy_bytes`). The expert banks' copies are made once
  per step and shared by its micro-batches (megamoe.nn.casts). Autocast caches the casts
  of the attention projections and the shared / dense FFN for its region: the whole step in a
  pipeline, one micro-batch's forward with pp = 1. The LFA kernels (views) are cast in every
  forward and the Attention Router concatenates its fp32 q/k/v weights once per forward: one
  copy per micro-batch in flight. A recomputed block makes its copies again in the backward
  pass, one layer at a time, unless a longer-lived cache still holds them.
* **Activations**: the bytes each layer saves for backward per token (the terms below follow
  megamoe.nn's code paths, and tests/estimators/test_memory.py checks them against the tensors
  autograd actually saves on CPU), times the tokens of a micro-batch, times the micro-batches
  in flight on the rank (1F1B: rank r holds pp − r; :func:`microbatches_in_flight`); on
  the last stage also the head's input and the loss's per-token scalars
  (:func:`head_held_bytes`); in a pipeline, the buffers torch's PipelineStage allocates for
  every micro-batch of the step (:func:`pipeline_buffer_bytes`). Plus the larger of two
  working sets: one layer's backward pass — its activations again, a conservative bound for
  the recomputed activations and their gradients, or, when larger, its widest weight's
  gradient on the way to ``.grad`` (:func:`weight_gradient_bytes`) — or the chunked loss's (one chunk of
  logits, the head weight's bf16 copy and fp32 gradient: :func:`loss_working_bytes`; no
  micro-batch's logits are ever whole), which runs before the layers' backward passes.

tests/estimators/test_memory.py also runs stages of a tiny model the way 1F1B runs them and checks
the estimate against the peak of the bytes the CPU allocator really handed out.

Routing is an assumption (megamoe.estimators.routing): the busiest expert's load ÷ the mean,
``imbalance`` (1 by default: every expert-parallel rank receives its average k·tokens); the rank
holding the busiest expert receives :func:`busiest_rank_share` × that, and its experts' rows
grow with it. Not counted: the CUDA context, NCCL and gradient-bucket buffers and allocator
fragmentation (together often 2–5 GiB): keep ~10% of the GPU free. launch/dry_run.py measures
the real step of every pipeline rank on fake tensors against this estimate (docs/dry_run.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Iterable, Optional

import torch

from megamoe.config.choices import FfnType, Optimizer, Recompute, Router, RouterOrder, Schedule, StateDtype
from megamoe.config.layers import moe_layer_flags
from megamoe.config.schema import Config, rotary_dim
from megamoe.config.validate import validate_layout
from megamoe.estimators.flops import layer_breakdown
from megamoe.estimators.routing import ExpertLoads
from megamoe.models import family_of
from megamoe.nn.casts import autocast_dtype
from megamoe.nn.loss import chunk_tokens
from megamoe.parallel.stages import rank_ends

GIB = 2**30
FP32, BF16, INT64 = 4, 2, 8
# one optimizer-state element (train.optimizer_state_dtype)
STATE_BYTES = {StateDtype.FP32: FP32, StateDtype.BF16: BF16}
FFN_ROWS = ("router", "shared_experts", "dense_ffn")  # a layer's parameters besides its attention block


@dataclass(frozen=True)
class GridShape:
    """How many processes run the config and how they are arranged (world = pp × dp, ep | dp)."""

    world_size: int
    pp: int
    dp: int
    ep: int


def grid_shape(cfg: Config, world_size: Optional[int] = None) -> GridShape:
    """The grid of ``world_size`` GPUs; by default the smallest the config allows (dp = ep)."""
    p = cfg.parallel
    world = p.pp * p.ep if world_size is None else world_size
    return GridShape(world, p.pp, validate_layout(cfg, world), p.ep)


def is_bf16(cfg: Config) -> bool:
    """Does a GPU run of ``cfg`` compute in bf16 (train.precision auto or bf16)?"""
    return autocast_dtype(cfg.train.precision, "cuda") == torch.bfloat16


# ---- which layers ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerMix:
    """The decoder layers a pipeline rank holds, by FFN kind."""

    moe: int
    dense: int

    @property
    def total(self) -> int:
        return self.moe + self.dense

    def kinds(self) -> tuple[bool, ...]:
        """The kinds it holds (True: MoE), for the working sets of one layer of each."""
        return tuple(kind for kind, count in ((True, self.moe), (False, self.dense)) if count)

    def count(self, moe_layer: bool) -> int:
        return self.moe if moe_layer else self.dense


def layer_mix(cfg: Config, layers: Iterable[int]) -> LayerMix:
    """How many of the global layers ``layers`` are MoE and how many dense (``moe.layer_freq``)."""
    flags, indices = moe_layer_flags(cfg.model, cfg.moe), list(layers)
    moe = sum(flags[i] for i in indices)
    return LayerMix(moe, len(indices) - moe)


def model_kind(cfg: Config, moe_layer: Optional[bool]) -> bool:
    """``moe_layer``, or by default the kind model.ffn_type names (every layer of a model that does not mix them)."""
    return cfg.model.ffn_type == FfnType.MOE if moe_layer is None else moe_layer


# ---- parameters ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerParams:
    """One decoder layer's parameters as seen by one expert-parallel rank."""

    dense: int  # everything but the routed experts: attention block, router, shared/dense FFN, norms
    experts: int  # the num_experts / ep routed experts this rank holds
    attention_matmul: int  # matmul weights cast once per step (autocast's cache), e.g. q/k/v/o
    attention_per_forward: int  # cast again in every forward (used through views: Yuan's LFA kernels)
    ffn_matmul: int  # shared experts or the dense FFN: cast once per step
    attention_router: int  # the Attention Router's q/k/v maps: concatenated in fp32 in every forward


def layer_params(cfg: Config, ep: int, moe_layer: Optional[bool] = None) -> LayerParams:
    """One MoE or dense layer's parameters (``moe_layer``; by default model.ffn_type's kind)."""
    m = cfg.model
    moe_layer = model_kind(cfg, moe_layer)
    family = family_of(cfg)
    attention = family.attention_parts(m)
    rows = {row: part.total for row, part in layer_breakdown(cfg, moe_layer).items()}
    per_forward = family.attention_cast_per_forward(m)
    return LayerParams(
        dense=(sum(part.total for part in attention.values()) + sum(rows[row] for row in FFN_ROWS)
               + rows["norms"]),  # input / post-attention norms
        experts=rows["experts"] // ep,
        attention_matmul=sum(part.matmul for part in attention.values()) - per_forward,
        attention_per_forward=per_forward,
        ffn_matmul=rows["shared_experts"] + rows["dense_ffn"],
        attention_router=rows["router"] if cfg.moe.router == Router.ATTENTION else 0,
    )


@dataclass(frozen=True)
class WeightCopies:
    """Bytes of one layer's weight copies, for the attention and the FFN block: ``cached`` ones
    live as long as autocast's cache, ``per_forward`` ones once per micro-batch in flight;
    the routed experts' once per step (megamoe.nn.casts.shared_casts)."""

    attention_cached: int
    attention_per_forward: int
    ffn_cached: int
    ffn_per_forward: int
    experts: int


def weight_copies(layer: LayerParams, act: int) -> WeightCopies:
    cast = BF16 if act == BF16 else 0  # fp32 training casts nothing
    return WeightCopies(
        attention_cached=cast * layer.attention_matmul,
        attention_per_forward=cast * layer.attention_per_forward,
        ffn_cached=cast * layer.ffn_matmul,
        ffn_per_forward=FP32 * layer.attention_router,
        experts=cast * layer.experts,
    )


def recomputed_blocks(cfg: Config) -> tuple[str, ...]:
    """The blocks whose forward the backward pass runs again, by train.activation_checkpointing."""
    return {"none": (), "selective": ("attention",), "full": ("attention", "ffn")}[cfg.train.activation_checkpointing]


def weight_copy_bytes(cfg: Config, grid: GridShape, layers: LayerMix, in_flight: float) -> float:
    """Bytes of the weight copies of a rank holding ``layers`` at its peak (module docstring).

    A block's autocast-cached copies outlive its recompute in a pipeline, whose schedule runs in
    one autocast region; with pp = 1 the backward pass (and so the recompute) runs outside it.
    A recompute makes one layer's copies at a time: the working set of the largest kind held.
    """
    held, working = 0.0, 0.0
    for kind in layers.kinds():
        count = layers.count(kind)
        copies = weight_copies(layer_params(cfg, grid.ep, kind), BF16 if is_bf16(cfg) else FP32)
        held, layer_working = held + count * copies.experts, 0.0
        blocks = {"attention": (copies.attention_cached, copies.attention_per_forward),
                  "ffn": (copies.ffn_cached, copies.ffn_per_forward)}
        for block, (cached, per_forward) in blocks.items():
            if block not in recomputed_blocks(cfg):
                held += count * (cached + in_flight * per_forward)
            elif grid.pp > 1:
                held, layer_working = held + count * cached, layer_working + per_forward
            else:
                layer_working += cached + per_forward
        working = max(working, layer_working)
    return held + working


@dataclass(frozen=True)
class StageParams:
    """What one pipeline rank stores: its layers, plus the embedding and / or head and final norm."""

    layers: LayerMix
    total: int
    holds_embedding: bool
    holds_head: bool  # final norm, head and loss (the last stage)
    adamw_only: int  # what Muon leaves to AdamW: the vocabulary matrices, norms and biases


def stage_params(cfg: Config, pp_rank: int, ep: int, layers: LayerMix) -> StageParams:
    """Parameters of pipeline rank ``pp_rank`` holding the decoder layers ``layers`` over all its stages."""
    m, p = cfg.model, cfg.parallel
    first, last = rank_ends(cfg, pp_rank)  # both on rank 0 of a V schedule
    vocab_matrix = m.vocab_size * m.hidden_size
    single_stage = p.pp * p.virtual_stages == 1
    owns_head = last and not (m.tie_embeddings and single_stage)  # a tied model split in stages keeps a head copy
    decoder = sum(layers.count(kind) * (params.dense + params.experts)
                  for kind in layers.kinds() for params in [layer_params(cfg, ep, kind)])
    vectors = sum(layers.count(kind) * layer_vector_params(cfg, kind) for kind in layers.kinds())
    vocab = (first + owns_head) * vocab_matrix
    total = decoder + vocab + last * m.hidden_size  # + the final norm
    return StageParams(layers, total, first, last, adamw_only=vocab + vectors + last * m.hidden_size)


def layer_vector_params(cfg: Config, moe_layer: bool) -> int:
    """One layer's parameters of fewer than two dimensions (norms, biases): those a matrix
    optimizer leaves to AdamW. Within a family's attention rows, what is not a matmul weight."""
    rows = layer_breakdown(cfg, moe_layer)
    attention = family_of(cfg).attention_parts(cfg.model)
    return rows["norms"].total + sum(part.total - part.matmul for part in attention.values())


def optimizer_state_bytes(cfg: Config, stage: StageParams) -> float:
    """The optimizer state of one rank's parameters: AdamW's m and v for each, or, with Muon, one
    momentum for each hidden-matrix element and AdamW's two for the rest, in the state's dtype."""
    element = STATE_BYTES[StateDtype(cfg.train.optimizer_state_dtype)]
    if cfg.train.optimizer == Optimizer.MUON:
        return element * (stage.total + stage.adamw_only)
    return 2 * element * stage.total


# ---- activations -----------------------------------------------------------------------------


def matmul_input_bytes(elements: int, consumers: int, act: int) -> int:
    """Bytes an fp32 tensor costs as the input of ``consumers`` matmuls: in fp32 they share the
    one saved tensor; under bf16 autocast each saves its own bf16 cast."""
    return FP32 * elements if act == FP32 else BF16 * elements * consumers


def rms_norm_bytes(hidden: int) -> int:
    """RMSNorm over the fp32 residual stream saves its input, the normalised input and 1/rms
    (torch's kernel; apex's fused one on CUDA keeps one fp32 [tokens, H] less: we count high)."""
    return FP32 * (2 * hidden + 1)


def sdpa_bytes(heads: int, kv_heads: int, head_dim: int, act: int) -> int:
    """Saved per token by causal SDPA (megamoe.nn.attention) and the output projection after it:
    q and the output at heads·head_dim, k and v at kv_heads·head_dim (grouped-query attention
    saves them unrepeated), the fp32 logsumexp per head, and o_proj's input (the heads re-laid
    out as one [tokens, heads·head_dim] copy)."""
    return act * (3 * heads + 2 * kv_heads) * head_dim + FP32 * heads


def _swiglu_bytes(rows: int, ffn: int, act: int) -> int:
    """A SwiGLU saves w1's output [gate | up], silu(gate) and silu(gate)·up for each of its rows."""
    return rows * act * 4 * ffn


def ffn_bytes(cfg: Config, act: int, moe_layer: Optional[bool] = None, share: float = 1.0) -> float:
    """Saved per token by the FFN block: its norm, then the MoE layer or the dense SwiGLU
    (``moe_layer``; by default model.ffn_type's kind); the experts' rows on the rank that
    receives ``share`` × a balanced routing's (:func:`busiest_rank_share`)."""
    m, moe = cfg.model, cfg.moe
    h = m.hidden_size
    if not model_kind(cfg, moe_layer):
        return rms_norm_bytes(h) + act * h + _swiglu_bytes(1, m.dense_ffn_hidden_size, act)
    e, k = moe.num_experts, moe.top_k
    router = FP32 * h  # the fp32 router's input (the normed tokens)
    if moe.router == Router.ATTENTION:
        router += FP32 * 5 * e  # q/k/v logits, the expert-attention output and its logsumexp
    else:
        router += FP32 * (3 if moe.noisy_gating else 1) * e  # logits (noisy: + the noise logits' softplus, the noise)
    if moe.router_order == RouterOrder.TOPK_SOFTMAX:
        weights = FP32 * k  # the softmax over the k chosen logits
    else:  # gathering the probabilities keeps only the ids; renormalising keeps the k and their sum
        weights = FP32 * (k + 1) if moe.norm_topk_prob else 0
    selection = FP32 * e + INT64 * k + weights  # softmax over experts, chosen ids, combine weights
    permutation = 2 * INT64 * k  # source-token indices of the sorted assignments
    experts = share * (k * act * h + _swiglu_bytes(k, moe.ffn_hidden_size, act))  # each row received, its SwiGLU
    combine = k * (2 * act * h + act)  # expert outputs, weighted outputs, weights
    z_loss = FP32  # logsumexp of the logits
    shared = 0
    if moe.num_shared_experts:
        shared_ffn = moe.num_shared_experts * (moe.shared_expert_ffn_hidden_size or moe.ffn_hidden_size)
        cast = BF16 * h if act == BF16 else 0  # fp32 shares the router's input
        shared = cast + _swiglu_bytes(1, shared_ffn, act)
        if moe.shared_expert_gate:  # its own cast of the input, sigmoid(g·x), and the output it scales
            shared += cast + act * (h + 1)
    return rms_norm_bytes(h) + router + selection + permutation + experts + combine + z_loss + shared


def layer_bytes(cfg: Config, act: int, moe_layer: Optional[bool] = None, share: float = 1.0) -> float:
    """Everything one MoE or dense decoder layer saves per token without recompute."""
    return family_of(cfg).attention_bytes(cfg.model, act) + ffn_bytes(cfg, act, moe_layer, share)


def held_layer_bytes(cfg: Config, act: int, moe_layer: Optional[bool] = None, share: float = 1.0) -> float:
    """What a layer keeps per token between its forward and backward, by train.activation_checkpointing.

    full: only the layer's input (the fp32 residual stream). selective: the attention block
    keeps its input norm and the normed input it recomputes from; the FFN block keeps all.
    """
    h = cfg.model.hidden_size
    mode = cfg.train.activation_checkpointing
    if mode == Recompute.FULL:
        return FP32 * h
    if mode == Recompute.SELECTIVE:
        return rms_norm_bytes(h) + FP32 * h + ffn_bytes(cfg, act, moe_layer, share)
    return layer_bytes(cfg, act, moe_layer, share)


def stage_input_bytes(cfg: Config, first_stage: bool) -> int:
    """Per token and micro-batch, once per stage: RoPE cos / sin (fp32), and the token ids on the first stage."""
    return FP32 * 2 * rotary_dim(cfg.model) + INT64 * first_stage


def head_held_bytes(cfg: Config) -> int:
    """Per token, held on the last stage from the head's forward to its backward: the final
    norm, its fp32 output (the loss's input) and the loss's scalars (label, log-sum-exp, mask)."""
    h = cfg.model.hidden_size
    return rms_norm_bytes(h) + FP32 * h + INT64 + 2 * FP32


def loss_working_bytes(cfg: Config, act: int, tokens: int) -> int:
    """The chunked loss's transient bytes (megamoe.nn.loss) at its larger pass, with C·V the
    elements of one chunk's logits and V·H the head's. Forward: the weight's bf16 copy, the fp32
    logits and log-sum-exp's temporary (8·C·V). Backward: the bf16 copy, the fp32 gradient
    accumulator, each chunk's bf16 product into it, the hidden states' gradient, the fp32
    softmax and its bf16 cast. (On CPU, adding the bf16 product to the fp32 accumulator makes
    an fp32 copy of it, 4·V·H more; CUDA casts on the fly.)"""
    m = cfg.model
    cast = BF16 if act == BF16 else 0
    chunk = min(chunk_tokens(m.vocab_size), tokens) * m.vocab_size
    weight = m.vocab_size * m.hidden_size
    forward = cast * weight + 2 * FP32 * chunk
    backward = (2 * cast + FP32) * weight + FP32 * tokens * m.hidden_size + (FP32 + cast) * chunk
    return max(forward, backward)


def weight_gradient_bytes(cfg: Config, ep: int, act: int, moe_layer: Optional[bool] = None) -> int:
    """What a layer's backward holds of one weight's gradient before it reaches ``.grad``: under
    bf16 the gradient of the weight's bf16 copy and that gradient cast to fp32 (2 + 4 B per
    parameter; megamoe.nn.casts), in fp32 the fp32 gradient (4 B). The largest weight of a layer
    is the FFN's first matrix: the routed experts' w1 on this rank (num_experts / ep of
    [2·ffn, hidden]), or the dense or shared FFN's (``moe_layer``: the layer's kind, by default
    model.ffn_type's). (The dry run measured it: 6 GiB at M32's 32 experts on one rank.)"""
    m, moe = cfg.model, cfg.moe
    if not model_kind(cfg, moe_layer):
        widest = 2 * m.dense_ffn_hidden_size * m.hidden_size
    else:
        shared = moe.num_shared_experts * (moe.shared_expert_ffn_hidden_size or moe.ffn_hidden_size)
        widest = max(moe.num_experts // ep * 2 * moe.ffn_hidden_size, 2 * shared) * m.hidden_size
    return ((BF16 if act == BF16 else 0) + FP32) * widest


def pipeline_buffer_bytes(cfg: Config, pp_rank: int, in_flight: float, num_microbatches: int) -> float:
    """Per token of a micro-batch, what pipelining adds on rank ``pp_rank`` (0 without a pipeline).

    torch's PipelineStage allocates, once for the run, a receive buffer per micro-batch of the
    step for each stage input but the first stage's (hidden states fp32, position ids), and one
    for the gradient of each output but the last stage's. An in-flight micro-batch's input sits
    in one of those buffers, which the held activations count already (its first layer saves
    it): taken off here. Its output (fp32 hidden states) is held until its backward: added.
    """
    pp, v, h = cfg.parallel.pp, cfg.parallel.virtual_stages, cfg.model.hidden_size
    if pp == 1:
        return 0.0
    first, last = rank_ends(cfg, pp_rank)
    buffers = num_microbatches * ((v - first) * (FP32 * h + INT64) + (v - last) * FP32 * h)
    return buffers + in_flight * FP32 * h * (first - last)


def microbatches_in_flight(cfg: Config, pp_rank: int, num_microbatches: int) -> float:
    """Micro-batches whose activations rank ``pp_rank`` holds at its peak, in units of all its layers.

    Counted in the order torch's schedules run the passes, a chunk (one stage's layers, 1 / v of
    the rank's) held from its forward to its weight gradient: a split backward keeps the whole
    graph until then. With m micro-batches, rank r, and torch's rounds of p = m // max(1, m // pp):

    * 1F1B: rank r runs pp − r forwards before its first backward: min(pp − r, m);
    * interleaved 1F1B: its warm-up, (v − 1)·p + 2·(pp − 1 − r) chunks, and one more, at most
      m·v; on rank 0 with p = pp, Megatron's factor 1 + (pp − 1)/(pp·v) over 1F1B;
    * interleaved zero bubble (ZB1P: ZB-H1 for v = 1): (v − 1)·p + pp chunks on every rank, at
      most m·v: rank r runs r fewer warm-up forwards and delays its weight passes by r;
    * ZB-V: min(2·pp, m + r + 1, 2·m) chunks, pp micro-batches once m ≥ 2·pp − 1 (the ZB paper's p·M_B);
    * DualPipeV: 2·pp + 1 chunks (DualPipe's PP + 1, PP = 2·pp stages).

    tests/parallel/test_pipeline.py checks each count against the action lists torch builds.
    Without a pipeline, micro-batches run one after another.
    """
    pp, v, m, r = cfg.parallel.pp, cfg.parallel.virtual_stages, num_microbatches, pp_rank
    if pp == 1:
        return 1.0
    per_round = m // max(1, m // pp)
    in_flight: dict[str, int] = {
        Schedule.ONE_F_ONE_B: min(pp - r, m),
        Schedule.INTERLEAVED_1F1B: min((v - 1) * per_round + 2 * (pp - 1 - r) + 1, m * v),
        Schedule.INTERLEAVED_ZERO_BUBBLE: min((v - 1) * per_round + pp, m * v),
        Schedule.ZBV_ZERO_BUBBLE: min(2 * pp, m + r + 1, 2 * m),
        Schedule.DUALPIPEV: 2 * pp + 1,
    }
    return in_flight[cfg.parallel.schedule] / v


# ---- the estimate ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RankMemory:
    """Bytes on one GPU of pipeline rank ``pp_rank``, by part."""

    pp_rank: int
    in_flight: float
    weights: float
    gradients: float
    optimizer: float
    weight_copies: float
    activations: float

    PARTS: ClassVar[tuple[str, ...]] = ("weights", "gradients", "optimizer", "weight_copies", "activations")

    @property
    def total(self) -> float:
        return sum(getattr(self, part) for part in self.PARTS)

    def gib(self) -> dict[str, float]:
        """The parts and the total in GiB, for the JSON line."""
        parts = {part: getattr(self, part) / GIB for part in self.PARTS}
        return {**parts, "total": self.total / GIB}


def busiest_rank_share(cfg: Config, ep: int, imbalance: float) -> float:
    """Rows the expert-parallel rank with the busiest expert receives ÷ a balanced routing's, for
    a micro-batch of the config (1 without routed experts)."""
    if cfg.model.ffn_type != FfnType.MOE:
        return 1.0
    tokens = cfg.train.micro_batch * cfg.train.seq_len
    return ExpertLoads.of(cfg.moe, imbalance).busiest_rank_share(ep, tokens)


def rank_memory(cfg: Config, grid: GridShape, pp_rank: int, layers: LayerMix,
                imbalance: float = 1.0) -> RankMemory:
    """The estimate for pipeline rank ``pp_rank`` holding the decoder layers ``layers`` (the
    config's split: megamoe.estimators.balance.rank_memory) under expert imbalance ``imbalance``;
    the module docstring gives the accounting."""
    act = BF16 if is_bf16(cfg) else FP32
    t = cfg.train
    tokens = t.micro_batch * t.seq_len
    share = busiest_rank_share(cfg, grid.ep, imbalance)
    stage = stage_params(cfg, pp_rank, grid.ep, layers)
    num_microbatches = t.global_batch // (t.micro_batch * grid.dp)
    in_flight = microbatches_in_flight(cfg, pp_rank, num_microbatches)
    layers_held = sum(layers.count(kind) * held_layer_bytes(cfg, act, kind, share) for kind in layers.kinds())
    held = (in_flight * (layers_held + stage_input_bytes(cfg, stage.holds_embedding))
            + pipeline_buffer_bytes(cfg, pp_rank, in_flight, num_microbatches)
            + stage.holds_head * head_held_bytes(cfg))
    # at work: one layer's backward (of the largest kind held), or the loss (which runs before the layers' backward)
    backward = max((max(tokens * layer_bytes(cfg, act, kind, share), weight_gradient_bytes(cfg, grid.ep, act, kind))
                    for kind in layers.kinds()), default=0)
    working = max(backward, stage.holds_head * loss_working_bytes(cfg, act, tokens))
    return RankMemory(
        pp_rank, in_flight,
        weights=FP32 * stage.total, gradients=FP32 * stage.total, optimizer=optimizer_state_bytes(cfg, stage),
        weight_copies=weight_copy_bytes(cfg, grid, stage.layers, in_flight),
        activations=tokens * held + working,
    )
