"""Layout invariance: every (dp, pp, ep) layout trains exactly like one process.

Same seed, same global batch: per-step losses and the updated weights (gathered under their
global names, expert slices put back at their global expert index) must equal the
single-process run to relative 1e-5.

Every pipeline schedule runs: 1F1B, interleaved 1F1B, and the zero-bubble ones, which split each
backward into an input pass and a later weight pass (interleaved zero bubble; ZB-V and
DualPipeV, whose V layout puts the first and the last stage, the two ends of the tied
embedding, on rank 0). Uneven pipeline splits (parallel.layers_per_stage) run with 1F1B,
interleaved 1F1B and ZB-V; each run also reports the layers every stage built, checked against
the config's split. After training, every layout evaluates (forward only) to the same loss.

Features that change the MoE step with the layout in play — capacity mode (token dropping), the
aux-free bias (updated from the dp-summed expert counts), expert-choice routing (each ep rank
picks among its own micro-batch's tokens, then exchanges) and dense layers between MoE ones
(``moe.layer_freq``: a pipeline stage without experts beside one with them, under expert
parallelism) — run in a few layouts against one process with the same overrides; the bias
buffers are compared with the weights. Attention
inside documents (``data.reset_attention_mask``, on a small real corpus whose rows hold several
documents) runs through every kind of schedule: the stages pass the document ids along.

The weight comparison runs with float64 parameters (the router and the loss stay fp32, as
always). In fp32, reduction-order noise (~1e-7) occasionally flips a near-tie in top-k routing
or an Adam update of a near-zero gradient, and five steps amplify that into single weights
that differ by ~1e-4: real, but chaos rather than a layout bug. float64 removes that noise
source without hiding one: a wrong gradient scale, a missing all-reduce or a misplaced expert
still shows as an O(1) difference. The fp32 per-step losses are checked too.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

from megamoe.config import compose
from megamoe.models import validate_config
from megamoe.estimators import balance
from megamoe.parallel import stages
from megamoe.parallel.expert import expert_range
from megamoe.parallel.mesh import init_grid
from megamoe.train.step import validation_loss, train_step
from megamoe.train.trainer import build_trainer
from tests.data.helpers import blend_overrides
from tests.dist.launcher import run_distributed

STEPS = 5
BASE = ["+exp=tiny", "train.global_batch=8", "train.micro_batch=1", "train.seq_len=32", "train.lr=3e-3",
        "train.warmup_steps=1", "moe.aux_loss_coeff=0.01", "moe.z_loss_coeff=0.001"]


def train_layout(rank: int, world_size: int, args: tuple[list[str], torch.dtype]) -> dict[str, Any]:
    """Worker: train STEPS steps; return the losses and this rank's weights under global names."""
    overrides, dtype = args
    torch.set_default_dtype(dtype)
    cfg = compose([*BASE, *overrides])
    validate_config(cfg, world_size)
    grid = init_grid(cfg.parallel.pp, cfg.parallel.ep, timeout_s=60)
    trainer = build_trainer(cfg, grid)
    batches = iter(trainer.loader)
    steps = [train_step(trainer, next(batches)) for _ in range(STEPS)]
    eval_losses = list(validation_loss(trainer).values())
    experts = expert_range(cfg.moe.num_experts, grid.ep, grid.ep_rank)
    weights = {}
    for module in trainer.modules:
        for name, tensor in [*module.model.named_parameters(), *module.model.named_buffers()]:  # buffers: expert bias
            weights[name] = (tensor.detach().clone(), experts.start if ".mlp.experts." in name else None)
    dropped = sum(int(layer.last_stats.dropped) for layer in trainer.router_stats.layers.values())
    torch.distributed.destroy_process_group()
    return {"losses": [s.loss for s in steps], "grad_norms": [s.grad_norm for s in steps], "weights": weights,
            "eval_losses": eval_losses,
            "dropped": dropped, "pp_rank": grid.pp_rank,
            "layers": [[int(i) for i in module.model.layers] for module in trainer.modules]}


def merged_weights(results: list[dict[str, Any]], num_experts: int) -> dict[str, torch.Tensor]:
    """One full set of weights from all ranks; checks that dp replicas agree."""
    merged: dict[str, torch.Tensor] = {}
    for result in results:
        for name, (tensor, first_expert) in result["weights"].items():
            if first_expert is not None:
                full = merged.setdefault(name, torch.full((num_experts, *tensor.shape[1:]), float("nan"), dtype=tensor.dtype))
                slot = full[first_expert:first_expert + tensor.shape[0]]
                if not torch.isnan(slot).all():
                    torch.testing.assert_close(slot, tensor, rtol=0, atol=0, msg=f"expert replicas differ: {name}")
                slot.copy_(tensor)
            elif name in merged:
                torch.testing.assert_close(merged[name], tensor, rtol=0, atol=0, msg=f"replicas differ: {name}")
            else:
                merged[name] = tensor
    return merged


def _run(world_size: int, overrides: list[str], dtype: torch.dtype) -> list[dict[str, Any]]:
    return run_distributed(train_layout, world_size, (overrides, dtype), timeout_s=300, init_process_group=False)


@pytest.fixture(scope="module")
def features(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], list[str]]:
    """Each feature's overrides; the document ones name a small real corpus, written on first use."""
    corpus: list[str] = []

    def overrides(feature: str) -> list[str]:
        if feature not in DOCUMENT_FEATURES:
            return FEATURES[feature]
        if not corpus:
            corpus.extend(blend_overrides(tmp_path_factory.mktemp("documents")))
        return [*corpus, *FEATURES[feature]]

    return overrides


@pytest.fixture(scope="module")
def references(features: Callable[[str], list[str]]) -> Callable[[str], dict[str, Any]]:
    """The single-process run of each feature, made on first use and shared by its layouts."""
    cache: dict[str, dict[str, Any]] = {}

    def reference(feature: str) -> dict[str, Any]:
        if feature not in cache:
            (result,) = _run(1, features(feature), torch.float64)
            cache[feature] = {**result, "weights": merged_weights([result], 8)}
        return cache[feature]

    return reference


def _assert_same(results: list[dict[str, Any]], reference: dict[str, Any], key: str) -> None:
    """Every rank reports the world-reduced value, so every rank must match the reference."""
    for result in results:
        torch.testing.assert_close(torch.tensor(result[key]), torch.tensor(reference[key]), rtol=1e-5, atol=0)


ZBV = ["parallel.schedule=zbv_zero_bubble", "parallel.virtual_stages=2"]
DUALPIPEV = ["parallel.schedule=dualpipev", "parallel.virtual_stages=2"]
LAYOUTS = {
    "dp2": (2, []),
    "dp2_ep2": (2, ["parallel.ep=2"]),
    "pp2": (2, ["parallel.pp=2"]),
    "dp2_pp2_ep2": (4, ["parallel.pp=2", "parallel.ep=2"]),
    "dp4_ep4": (4, ["parallel.ep=4"]),
    "pp2_interleaved": (2, ["parallel.pp=2", "parallel.schedule=interleaved_1f1b", "parallel.virtual_stages=2"]),
    "pp2_uneven": (2, ["parallel.pp=2", "parallel.layers_per_stage=[3,1]"]),
    "pp1_virtual": (1, ["parallel.schedule=interleaved_1f1b", "parallel.virtual_stages=2"]),  # both tied ends here
    "pp2_interleaved_zero_bubble": (2, ["parallel.pp=2", "parallel.schedule=interleaved_zero_bubble",
                                        "parallel.virtual_stages=2"]),
    "pp2_zbv": (2, ["parallel.pp=2", *ZBV]),
    "pp2_dualpipev": (2, ["parallel.pp=2", *DUALPIPEV]),
    "dp2_pp2_ep2_dualpipev": (4, ["parallel.pp=2", "parallel.ep=2", *DUALPIPEV]),
}
# Interleaved stages can be uneven only with more layers than stages: 6 layers on pp 2 × 2 chunks,
# rank 0 holding 4 of them (stages 0 and 2; ZB-V's V: stages 0 and 3, 2 layers), rank 1 two (ZB-V: 4).
SIX_LAYER_LAYOUTS = {
    "pp2_interleaved_uneven": (2, ["parallel.pp=2", "parallel.schedule=interleaved_1f1b", "parallel.virtual_stages=2",
                                   "parallel.layers_per_stage=[1,1,3,1]"]),
    "pp2_zbv_uneven": (2, ["parallel.pp=2", *ZBV, "parallel.layers_per_stage=[1,1,3,1]"]),
}


# Overrides that change the MoE step or the model, and the layouts each is compared in ("" = none: every layout).
EXPERT_CHOICE = ["moe.router_mode=expert_choice", "moe.aux_loss_coeff=0"]  # its Switch loss is constant
FEATURES = {"": [], "capacity": ["moe.capacity_factor=1.0"], "aux_free_bias": ["moe.aux_free_bias=true"],
            "expert_choice": EXPERT_CHOICE, "expert_choice_linear": [*EXPERT_CHOICE, "moe.router=linear"],
            "6_layers": ["model.num_layers=6"], "full_recompute": ["train.activation_checkpointing=full"],
            "documents": ["data.reset_attention_mask=true"],
            # dense first layers (moe.layer_freq): pp = 2 gives stage 0 no expert at all, stage 1 one MoE layer
            "mixed": ["moe.layer_freq=[0,0,1,0]", "model.dense_ffn_hidden_size=96", "moe.aux_free_bias=true"],
            "muon": ["train.optimizer=muon"],
            "muon_bf16_state": ["train.optimizer=muon", "train.optimizer_state_dtype=bf16"]}
DOCUMENT_FEATURES = {"documents"}  # trained on a real corpus (the fixture `features` adds it)
# One representative per class runs by default — the 3-D layout (dp × pp × ep, 1F1B), a
# zero-bubble interleaved schedule, a V schedule with an uneven split; CI's slow set
# (`make test-slow`) runs every other layout and every feature (capacity, expert choice, aux-free
# bias, recompute, mixed dense / MoE layers, Muon, documents) against its single-process run.
DEFAULT = {("dp2_pp2_ep2", ""), ("pp2_interleaved_zero_bubble", ""), ("pp2_zbv_uneven", "6_layers")}
ALL_CASES = [(layout, "") for layout in sorted(LAYOUTS)] + [
    ("dp2_ep2", "capacity"), ("dp2", "aux_free_bias"), ("dp2_ep2", "aux_free_bias"), ("dp2_ep2", "expert_choice"),
    ("dp2_ep2", "expert_choice_linear"),
    ("pp2_zbv", "full_recompute"),  # recompute inside a split backward
    ("dp2_pp2_ep2", "mixed"),
    ("dp2_pp2_ep2", "muon"),  # Muon's per-matrix update sees whole matrices whatever the layout
    ("pp2_dualpipev", "muon"), ("dp4_ep4", "muon_bf16_state")] + [
    (layout, "6_layers") for layout in sorted(SIX_LAYER_LAYOUTS)] + [
    # attention inside documents: the stage protocol's hardest case is a V schedule, whose split
    # backward and forward-only evaluation pass the document ids too
    (layout, "documents") for layout in ("pp2_zbv", "pp2", "pp1_virtual", "pp2_interleaved_zero_bubble",
                                         "dp2_pp2_ep2_dualpipev")]
CASES = [case if case in DEFAULT else pytest.param(*case, marks=pytest.mark.slow) for case in ALL_CASES]


@pytest.mark.parametrize(("layout", "feature"), CASES,
                         ids=["+".join(filter(None, getattr(case, "values", case))) for case in CASES])
def test_layout_matches_single_process(layout: str, feature: str, references: Callable[[str], dict[str, Any]],
                                       features: Callable[[str], list[str]]) -> None:
    world_size, overrides = {**LAYOUTS, **SIX_LAYER_LAYOUTS}[layout]
    reference = references(feature)
    if feature == "capacity":  # the last micro-batch alone dropped some assignments
        assert reference["dropped"] > 0
    if feature == "mixed":  # dense SwiGLUs where moe.layer_freq has 0s, experts (and their bias) where 1
        assert {"layers.0.mlp.w1.weight", "layers.2.mlp.experts.w1", "layers.2.mlp.expert_bias"} <= set(
            reference["weights"]) and "layers.3.mlp.router.query.weight" not in reference["weights"]
    results = _run(world_size, [*overrides, *features(feature)], torch.float64)
    cfg = compose([*BASE, *overrides, *FEATURES[feature]])
    ranges = stages.layer_ranges(balance.stage_layers(cfg))
    for result in results:  # each stage built the layers the config's split gives it
        assert result["layers"] == [list(ranges[s]) for s in stages.stage_indices(cfg, result["pp_rank"])]
    _assert_same(results, reference, "losses")
    _assert_same(results, reference, "grad_norms")  # Adam hides a wrong gradient scale; the norm does not
    _assert_same(results, reference, "eval_losses")
    weights = merged_weights(results, 8)
    tied_copy = weights.pop("lm_head.weight", None)
    if tied_copy is not None:  # the last stage's copy of the tied embedding stays in sync
        torch.testing.assert_close(tied_copy, weights["embed.weight"], rtol=0, atol=0)
    assert sorted(weights) == sorted(reference["weights"])
    # Adam divides by sqrt(v): where a gradient is ~0, reduction-order noise moves single elements
    # by ~1e-6, so each tensor is compared as a whole, relative to its norm.
    for name, tensor in weights.items():
        ref = reference["weights"][name]
        relative = float((tensor - ref).norm() / ref.norm())
        assert relative <= 1e-5, f"{name}: relative difference {relative:.2e} (max abs {float((tensor - ref).abs().max()):.2e})"


def test_fp32_losses_match_single_process() -> None:
    (single,) = _run(1, [], torch.float32)
    _assert_same(_run(4, LAYOUTS["dp2_pp2_ep2"][1], torch.float32), single, "losses")


@pytest.mark.parametrize("layout", ["dp2_ep2", pytest.param("dp2_pp2_ep2", marks=pytest.mark.slow),
                                    pytest.param("dp2_pp2_ep2_dualpipev", marks=pytest.mark.slow)])
def test_overlapped_grad_reduce_is_bit_identical(layout: str) -> None:
    """parallel.overlap_grad_reduce launches the same buckets with the same bytes, only earlier:
    fp32 losses, grad norms and weights equal the non-overlapped run bit for bit (at dp = 2 a
    two-term sum is the same in any order, so this holds whatever the collective's algorithm).
    Covers pp = 1 (buckets go from hooks during the last micro-batch's backward), 1F1B (the same
    hooks inside the schedule's last backward) and DualPipeV (the zero-bubble weight pass adds to
    .grad itself: buckets go at the schedule's REDUCE_GRAD)."""
    world_size, overrides = LAYOUTS[layout]
    runs = [_run(world_size, [*overrides, f"parallel.overlap_grad_reduce={on}"], torch.float32) for on in (True, False)]
    for overlapped, plain in zip(*runs):
        assert overlapped["losses"] == plain["losses"] and overlapped["grad_norms"] == plain["grad_norms"]
        for name, (tensor, _) in overlapped["weights"].items():
            assert torch.equal(tensor, plain["weights"][name][0]), name
