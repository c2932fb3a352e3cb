"""One rank of a large job on fake tensors: the process group, the answers to data-dependent ops,
and M32's CUDA path (one layer and the loss on fake CUDA tensors) checked without a GPU."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from megamoe.compat import TorchDispatchMode
from megamoe.config import compose
from megamoe.config.schema import as_object, rotary_dim
from megamoe.dryrun.fake import FakeStepMode, fake_process_group
from megamoe.dryrun.routing import AssumedLocalExchange
from megamoe.estimators.routing import ExpertLoads
from megamoe.models import family_of
from megamoe.nn.decoder import DecoderLayer
from megamoe.nn.loss import chunked_lm_loss
from megamoe.nn.moe.dispatcher import permute
from megamoe.nn.moe.router import select_experts
from megamoe.nn.rope import RotaryEmbedding
from tests.dist.launcher import run_distributed
from tests.fake_cuda import CudaShims, cuda_autocast


def test_one_process_is_any_rank_of_a_large_world() -> None:
    with fake_process_group(256, 77):
        assert (dist.get_rank(), dist.get_world_size()) == (77, 256)
        group, _ = dist.new_subgroups_by_enumeration([list(range(r, r + 8)) for r in range(0, 256, 8)])
        with FakeStepMode():
            x = torch.empty(4, 8)
            dist.all_reduce(x, group=group)  # nobody else is there: answered at once
            dist.all_to_all_single(torch.empty_like(x), x, group=group)
    assert not dist.is_initialized()


def test_host_reads_are_answered() -> None:
    """A finite loss, torch's pipeline vote for static shapes, an index valid in any world."""
    with FakeStepMode():
        loss, vote, index = torch.empty(()), torch.empty(1, dtype=torch.int32), torch.empty((), dtype=torch.int64)
        assert (float(loss), vote.item(), int(index)) == (1.0, 1, 0)


def test_routing_counts_and_a_capacity_limit_take_the_assumed_loads() -> None:
    """The router's bincount is a fake [num_experts]; a capacity-limited permute keeps as many
    rows as the assumed loads do (here 2 × the mean on expert 0, capacity 1.25 × the mean)."""
    moe = compose(["+exp=tiny", "moe.capacity_factor=1.25"]).moe
    loads = ExpertLoads.of(moe, 2.0)
    tokens = 64
    with FakeStepMode(loads):
        routing = select_experts(torch.empty(tokens, moe.num_experts), moe.top_k, moe.router_order)
        assert routing.tokens_per_expert.shape == (moe.num_experts,)
        rows, _ = permute(torch.empty(tokens, 32), routing, capacity=20)
    assert loads.rows(tokens) == [20] + [14] * 5 + [13] * 2  # expert 0's 32 rows cut to the capacity
    assert rows.shape == (20 + 5 * 14 + 2 * 13, 32)


def test_other_data_dependent_shapes_still_raise() -> None:
    with FakeStepMode(), pytest.raises(Exception, match="nonzero"):
        torch.empty(8).nonzero()


class _Calls(TorchFunctionMode):
    """The scaled-dot-product-attention calls: their q/k/v dtypes and devices, and is_causal."""

    def __init__(self) -> None:
        super().__init__()
        self.sdpa: list[tuple[Any, ...]] = []

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            self.sdpa.append(tuple((t.dtype, t.device.type) for t in args[:3]) + (kwargs.get("is_causal", False),))
        return func(*args, **kwargs)


class _Ops(TorchDispatchMode):
    """Every aten op: its name, and the (dtype, device, shape) of its tensor inputs and outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, list, list]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        meta = lambda tree: [(t.dtype, t.device.type, tuple(t.shape))  # noqa: E731
                             for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]
        self.ops.append((str(func.overloadpacket), meta((args, kwargs)), meta(out)))
        return out


def m32_layer_and_loss_on_fake_cuda(rank: int, world_size: int, tokens: int) -> dict[str, Any]:
    """(In a fresh process: autograd on fake CUDA, a view of a parameter that needs a gradient
    included, aborts a CPU-only build.) One M32 decoder layer —
    LFA attention, the Attention Router, 32 experts top-2 — and the chunked loss over M32's
    vocabulary, forward under CUDA bf16 autocast on fake CUDA tensors."""
    cfg = compose(["+exp=m32_2000b"])
    loads = ExpertLoads.of(cfg.moe)
    calls, ops = _Calls(), _Ops()
    with FakeStepMode(loads), torch.device("cuda"), CudaShims(), torch.no_grad():
        layer = DecoderLayer(as_object(cfg.model), as_object(cfg.moe), family_of(cfg).attention, 0, True, False,
                             AssumedLocalExchange(loads.rows(tokens))).requires_grad_(False)
        rope = RotaryEmbedding(rotary_dim(cfg.model), cfg.model.rotary_base)(torch.arange(tokens).expand(1, -1))
        hidden = torch.empty(1, tokens, cfg.model.hidden_size)
        head = torch.empty(cfg.model.vocab_size, cfg.model.hidden_size)
        labels = torch.zeros(1, tokens, dtype=torch.int64)
        with calls, ops, cuda_autocast():
            out = layer(hidden, rope)
            loss = chunked_lm_loss(out, head, labels, labels >= 0)
    return {"out": (out.dtype, out.device.type, tuple(out.shape)), "loss": (loss.dtype, loss.device.type),
            "sdpa": calls.sdpa, "ops": ops.ops}


@pytest.fixture(scope="module")
def m32_forward() -> dict[str, Any]:
    return run_distributed(m32_layer_and_loss_on_fake_cuda, 1, 4096, timeout_s=300, init_process_group=False)[0]


def test_m32_forward_runs_on_the_device_in_bf16_with_an_fp32_residual_stream_and_loss(m32_forward: dict) -> None:
    assert m32_forward["out"] == (torch.float32, "cuda", (1, 4096, 2048))
    assert m32_forward["loss"] == (torch.float32, "cuda")
    for name, inputs, outputs in m32_forward["ops"]:
        devices = {device for _, device, _ in inputs + outputs}
        if "cpu" in devices:  # only a host list (the experts' split sizes) on its way to the device
            assert name in ("aten.lift_fresh", "aten._to_copy", "prim.device"), (name, inputs, outputs)
            assert name != "aten._to_copy" or outputs[0][1] == "cuda"


def test_m32_experts_run_as_bf16_grouped_gemms_with_int32_offsets(m32_forward: dict) -> None:
    gemms = [(inputs, outputs) for name, inputs, outputs in m32_forward["ops"] if name == "aten._grouped_mm"]
    assert [out for _, (out,) in gemms] == [(torch.bfloat16, "cuda", (8192, 16384)),  # w1 of 32 experts, 256 rows each
                                            (torch.bfloat16, "cuda", (8192, 2048))]
    for inputs, _ in gemms:
        (a, b, offs) = inputs
        assert a[:2] == b[:2] == (torch.bfloat16, "cuda") and offs == (torch.int32, "cuda", (32,))


def test_m32_attention_is_causal_bf16_and_the_router_fp32(m32_forward: dict) -> None:
    attention, router = m32_forward["sdpa"]
    assert attention == ((torch.bfloat16, "cuda"),) * 3 + (True,)
    assert router == ((torch.float32, "cuda"),) * 3 + (False,)
    router_logits = [outputs for name, _, outputs in m32_forward["ops"] if outputs == [(torch.float32, "cuda",
                                                                                      (4096, 96))]]
    assert router_logits  # q, k and v of the 32 experts in one fp32 matmul


def test_m32_loss_computes_bf16_logits_a_chunk_at_a_time(m32_forward: dict) -> None:
    logits = [outputs[0] for name, _, outputs in m32_forward["ops"]
              if name == "aten.mm" and outputs[0][2][-1] == 135_040]
    assert {shape[0] for _, _, shape in logits} == {496, 4096 - 8 * 496}  # 8 chunks of 496 tokens, then the rest
    assert {dtype for dtype, _, _ in logits} == {torch.bfloat16}
