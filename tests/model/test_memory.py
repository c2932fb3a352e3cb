"""The memory estimate against what autograd really saves, built stages, and a hand count."""

import weakref

import pytest
import torch
from omegaconf import DictConfig

from megamoe.config import ConfigError, compose
from megamoe.model import memory
from megamoe.model.flops import total_params
from megamoe.model.yuan import YuanModel
from megamoe.parallel.pipeline import build_stage_modules

VARIANTS = {
    "m32_block": [],
    "no_lfa": ["model.use_lfa=false"],
    "linear_router": ["moe.router=linear"],
    "noisy_router": ["moe.router=linear", "moe.noisy_gating=true"],
    "shared_experts": ["moe.num_shared_experts=2", "moe.shared_expert_ffn_hidden_size=32"],
    "dense_ffn": ["model.ffn_type=dense", "model.dense_ffn_hidden_size=96"],
    "untied_top3": ["model.tie_embeddings=false", "moe.top_k=3"],
    "aux_loss": ["moe.aux_loss_coeff=0.01"],
}


def tiny(*overrides: str) -> DictConfig:
    return compose(["+exp=tiny", *overrides])


def saved_by_forward(cfg: DictConfig, seq_len: int, bf16: bool) -> int:
    """Bytes of the distinct tensors autograd keeps for backward after one forward of the whole
    model, parameters excluded (the slow reference: what the accounting claims to count)."""
    torch.manual_seed(0)
    model = YuanModel(cfg)
    model.reset_parameters(cfg.seed)
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    tokens = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch, seq_len))
    saved: list[weakref.ref] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(weakref.ref(t))
        return t

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        output = model(tokens)  # keeps the graph, and so what backward needs, alive
    # Count the storages still held by the graph once it is built: a tensor saved by a branch that
    # died (and its address, which the allocator may reuse) must not count.
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in (ref() for ref in saved) if t is not None}
    del output
    return sum(nbytes for ptr, nbytes in storages.items() if ptr not in param_storages)


def forward_estimate(cfg: DictConfig, act: int) -> tuple[int, int]:
    """(bytes per token, constant bytes) the estimate says one whole-model forward keeps."""
    m = cfg.model
    per_token = (m.num_layers * memory.held_layer_bytes(cfg, act) + memory.stage_input_bytes(cfg, first_stage=True)
                 + memory.rms_norm_bytes(m.hidden_size) + act * m.hidden_size)  # final norm, head input
    if cfg.train.activation_checkpointing != "none":
        # checkpoint() keeps RoPE's cos / sin (no grad) by reference, outside autograd's saved tensors
        per_token -= memory.FP32 * 2 * memory.rotary_dim(cfg)
    lay = memory.layout(cfg)
    rank = memory.rank_memory(cfg, lay, 0)
    copies = memory.weight_copies(memory.layer_params(cfg, 1), act)
    recomputed = {"none": 0, "selective": copies.attention_cached + copies.attention_per_forward,
                  "full": copies.layer}[cfg.train.activation_checkpointing]
    return per_token, int(rank.weight_copies) - recomputed


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize(
    ("variant", "recompute"),
    [(v, "none") for v in VARIANTS] + [("m32_block", "selective"), ("m32_block", "full")],
)
def test_saved_tensors_match_the_accounting(variant: str, recompute: str, precision: str) -> None:
    """Per token (the slope over two sequence lengths) and constant (weight copies) parts."""
    cfg = tiny(*VARIANTS[variant], f"train.activation_checkpointing={recompute}", f"train.precision={precision}")
    bf16 = precision == "bf16"
    short, long = 32, 64
    tokens_short, tokens_long = cfg.train.micro_batch * short, cfg.train.micro_batch * long
    measured_short, measured_long = saved_by_forward(cfg, short, bf16), saved_by_forward(cfg, long, bf16)
    per_token = (measured_long - measured_short) / (tokens_long - tokens_short)
    constant = measured_long - per_token * tokens_long

    expected_per_token, expected_constant = forward_estimate(cfg, memory.BF16 if bf16 else memory.FP32)
    assert per_token == expected_per_token
    # a Switch aux loss in use keeps a [num_experts] fp32 mean and a scalar per MoE layer (too small to model)
    # outside full recompute; with coefficient 0 its branch is dropped and keeps nothing
    aux_kept = cfg.model.ffn_type == "moe" and recompute != "full" and cfg.moe.aux_loss_coeff > 0
    aux = cfg.model.num_layers * memory.FP32 * (cfg.moe.num_experts + 1) * aux_kept
    assert constant == expected_constant + aux


def test_tiny_by_hand() -> None:
    """tiny (bf16 on a GPU, no recompute, one GPU): every part counted by hand."""
    lay, rank = memory.memory_per_gpu(tiny())
    assert (lay.world_size, lay.pp, lay.dp, lay.ep, rank.pp_rank, rank.in_flight) == (1, 1, 1, 1, 0, 1.0)
    params = 924_864  # tests/launch/test_model_stats.py counts it
    assert (rank.weights, rank.gradients, rank.optimizer) == (4 * params, 4 * params, 8 * params)
    # per layer: q/k/v/o 4·64·64 cached once (2 B); per forward: LFA kernels 8192 (2 B), 8 experts of
    # 3·64·128 (2 B), the attention router's fp32 q/k/v concatenation 3·8·64 (4 B); the tied head 512·64 (2 B)
    per_layer = 2 * 16_384 + 2 * 8_192 + 2 * 8 * 24_576 + 4 * 1_536
    assert rank.weight_copies == 4 * per_layer + 2 * 512 * 64
    # bytes per token, H 64, heads·head_dim 64, 4 heads, 8 experts top-2 of ffn 128, bf16 (2 B):
    # attention: input norm 4·(2·64 + 1), normed input to conv1 and v_proj 2·2·64, conv1 shift 2·64,
    # conv2 input and shift 2·2·32, filter norm 4·(2·64 + 1), filtered to q_proj, k_proj 2·2·64,
    # SDPA q/k/v/out 4·2·64 + logsumexp 4·4, o_proj input 2·64
    attention = 516 + 256 + 128 + 128 + 516 + 256 + 512 + 16 + 128
    # FFN: norm 516, router input 4·64 + q/k/v/out/lse 4·5·8, softmax 4·8, ids 8·2, weights 4·2,
    # permutation 2·8·2, per assignment (×2) input 2·64 + SwiGLU 2·4·128, combine 2·(2·2·64 + 2), z-loss 4
    moe = 516 + 256 + 160 + 32 + 16 + 8 + 32 + 2 * (128 + 1024) + 2 * (256 + 2) + 4
    assert (attention, moe) == (2456, 3844)
    layer = attention + moe
    rope_and_ids = 4 * 2 * 8 + 8  # cos / sin of rotary dim 8, token ids
    head = 516 + 2 * 64 + (2 + 8) * 512  # final norm, head input, logits + fp32 log-probs and their grad
    tokens = 2 * 64
    assert rank.activations == tokens * (4 * layer + rope_and_ids + layer + head)


def test_recompute_shrinks_what_layers_hold() -> None:
    h = 64
    none, selective, full = (memory.held_layer_bytes(tiny(f"train.activation_checkpointing={mode}"), memory.BF16)
                             for mode in ("none", "selective", "full"))
    assert full == 4 * h  # the fp32 layer input
    assert selective == none - 2456 + (516 + 4 * h)  # the attention block shrinks to its norm and normed input
    assert full < selective < none


class ExpertSlice:
    """Just enough of a TokenExchange to build the experts of one ep rank (meta device, no traffic)."""

    def __init__(self, num_experts: int, ep: int, ep_rank: int) -> None:
        self.num_local_experts = num_experts // ep
        self.first_expert = ep_rank * self.num_local_experts


@pytest.mark.parametrize("overrides",
                         [[], ["model.tie_embeddings=false"], ["model.use_lfa=false", "moe.router=linear"]])
@pytest.mark.parametrize(("pp", "ep"), [(1, 1), (2, 1), (4, 2), (2, 8)])
def test_stage_parameters_match_built_stages(pp: int, ep: int, overrides: list[str]) -> None:
    cfg = tiny(*overrides, f"parallel.pp={pp}", f"parallel.ep={ep}")
    for rank in range(pp):
        with torch.device("meta"):
            modules = build_stage_modules(cfg, rank, ExpertSlice(cfg.moe.num_experts, ep, 0))
        built = sum(p.numel() for m in modules for p in m.parameters())
        assert memory.stage_params(cfg, rank, ep).total == built, f"pp rank {rank}"


def test_pipeline_and_expert_parallelism_divide_parameter_memory() -> None:
    cfg = compose(["+exp=m32_2000b", "parallel.pp=1"])
    vocab_matrix = cfg.model.vocab_size * cfg.model.hidden_size
    layer = memory.layer_params(cfg, ep=1)
    whole = memory.stage_params(cfg, 0, 1).total
    assert whole == total_params(cfg)
    # pp = 8: the stages add up to the model plus the last stage's copy of the tied embedding
    cfg8 = compose(["+exp=m32_2000b"])
    stages = [memory.stage_params(cfg8, r, 1).total for r in range(8)]
    assert sum(stages) == whole + vocab_matrix
    assert stages[3] == 3 * (layer.dense + layer.experts)
    # ep = 4 keeps a quarter of each layer's experts
    cfg_ep = compose(["+exp=m32_2000b", "parallel.ep=4"])
    assert memory.stage_params(cfg8, 3, 1).total - memory.stage_params(cfg_ep, 3, 4).total == 3 * layer.experts * 3 // 4


def test_1f1b_first_stage_holds_pp_microbatches() -> None:
    cfg = tiny("parallel.pp=4", "train.global_batch=64")  # 32 micro-batches
    assert [memory.microbatches_in_flight(cfg, r, 32) for r in range(4)] == [4, 3, 2, 1]
    assert memory.microbatches_in_flight(cfg, 0, 2) == 2  # never more than the step has
    lay = memory.layout(cfg, world_size=4)
    first, middle = memory.rank_memory(cfg, lay, 0), memory.rank_memory(cfg, lay, 1)
    tokens, held = 2 * 64, memory.held_layer_bytes(cfg, memory.BF16)  # one layer per stage
    assert first.activations - middle.activations == tokens * (4 * (held + memory.stage_input_bytes(cfg, True))
                                                               - 3 * (held + memory.stage_input_bytes(cfg, False)))
    # interleaved, 2 chunks per rank: Megatron's factor 1 + (pp - 1) / (pp · v) over 1F1B on rank 0
    inter = tiny("parallel.pp=2", "parallel.schedule=interleaved_1f1b", "parallel.virtual_stages=2")
    assert memory.microbatches_in_flight(inter, 0, 32) == 2 * (1 + 1 / 4)


def test_world_size_sets_data_parallelism_and_must_fit_the_layout() -> None:
    cfg = tiny("parallel.pp=2", "parallel.ep=2")
    assert memory.layout(cfg) == memory.Layout(world_size=4, pp=2, dp=2, ep=2)
    assert memory.layout(cfg, 8).dp == 4
    with pytest.raises(ConfigError, match="parallel.pp"):
        memory.layout(cfg, 3)
