"""Attention inside documents (megamoe.nn.documents, ``data.reset_attention_mask``).

Every document of a packed row computes what it computes alone — logits, token losses and
parameter gradients, in fp32 — for both families (Yuan with LFA, Qwen-MoE with grouped-query
attention), with and without activation recompute; the flex-attention BlockMask we build equals
torch's own construction and gives SDPA's dense-mask result; and the CUDA path runs a whole
model forward on fake CUDA tensors (shapes, dtypes and devices of everything it builds).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from megamoe.config import compose
from megamoe.data.loader import document_ids, position_ids
from megamoe.models import build_stage
from megamoe.nn import documents as documents_module
from megamoe.nn.documents import Documents, block_mask, dense_mask
from megamoe.nn.kv_cache import KVCache
from tests.fake_cuda import CudaShims
from tests.models.helpers import random_model

EOD = 256  # ByteTokenizer's, inside the tiny vocabulary
SEQ = 48
BLOCK_TENSORS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks", "q_indices",
                 "full_q_num_blocks", "full_q_indices")


def packed_rows() -> torch.Tensor:
    """Two rows of random tokens cut into documents: one-token documents (an eod after an eod),
    one ending at the row's last token, and a row that is a single document."""
    tokens = torch.randint(0, EOD, (3, SEQ), generator=torch.Generator().manual_seed(0))
    tokens[0, [4, 5, 19, 33, SEQ - 1]] = EOD
    tokens[1, [0, 26]] = EOD
    return tokens


def ids_of(tokens: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(document_ids(tokens.numpy(), EOD))


def documents_alone(tokens: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """(row, positions) of every document of every row."""
    ids = ids_of(tokens)
    return [(row, (ids[row] == d).nonzero().flatten()) for row in range(len(tokens)) for d in ids[row].unique()]


@pytest.mark.parametrize(("family", "recompute", "reset_positions"), [
    ("yuan", "none", False), ("yuan", "full", True), ("yuan", "selective", False), ("qwen_moe", "none", True)])
def test_each_document_computes_what_it_computes_alone(family: str, recompute: str, reset_positions: bool) -> None:
    exp = {"yuan": "+exp=tiny", "qwen_moe": "+exp=qwen_moe_tiny"}[family]
    # the load-balancing loss is a statistic of the micro-batch's tokens, not of a document: off here
    model = random_model(compose([exp, f"train.activation_checkpointing={recompute}", "moe.aux_loss_coeff=0"]))
    tokens = packed_rows()
    labels = torch.roll(tokens, -1, dims=1)
    positions = torch.from_numpy(position_ids(tokens.numpy(), EOD if reset_positions else None))

    logits = model(tokens, positions, document_ids=ids_of(tokens))
    losses = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape)
    losses.sum().backward()
    packed_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    alone_logits, alone_losses = torch.empty_like(logits), torch.empty_like(losses)
    for row, where in documents_alone(tokens):
        out = model(tokens[row, where][None])[0]
        loss = F.cross_entropy(out, labels[row, where], reduction="none")
        loss.sum().backward()
        alone_logits[row, where], alone_losses[row, where] = out.detach(), loss.detach()
    torch.testing.assert_close(logits.detach(), alone_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(losses.detach(), alone_losses, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():  # as a whole: single elements of a ~0 gradient carry fp32 noise
        assert float((packed_grads[name] - p.grad).norm() / p.grad.norm()) < 1e-5, name
    with torch.no_grad():  # the documents matter: the plain causal pass sees across them
        assert not torch.allclose(model(tokens, positions), alone_logits, atol=1e-3)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # eager: the reference
@pytest.mark.parametrize(("length", "block"), [(256, 32), (200, 32), (300, 128), (64, 128)])
def test_block_mask_equals_torchs_construction_and_the_dense_mask(length: int, block: int) -> None:
    """Our BlockMask (built at block granularity) against torch's create_block_mask (built by
    evaluating the mask at every position): the same partial and full blocks, in the same order,
    both directions; flex attention under it equals SDPA under the dense mask (forward, CPU)."""
    generator = torch.Generator().manual_seed(length)
    eod = torch.rand(3, length, generator=generator) < 0.03
    eod[0, :3] = True  # one-token documents at the row's start
    eod[1] = False  # a row that is one document
    ids = torch.from_numpy(document_ids(eod.numpy(), True))
    ours = block_mask(ids, block)

    def document_causal(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return (ids[b, q] == ids[b, kv]) & (q >= kv)

    reference = create_block_mask(document_causal, 3, None, length, length, device="cpu", BLOCK_SIZE=block)
    assert torch.equal(ours.to_dense(), reference.to_dense())
    for counts, indices in zip(BLOCK_TENSORS[::2], BLOCK_TENSORS[1::2]):
        n = getattr(reference, counts)
        assert torch.equal(getattr(ours, counts), n), counts
        for where in np.ndindex(*n.shape):  # past the count, the order of the unused slots is free
            assert torch.equal(getattr(ours, indices)[where][:n[where]], getattr(reference, indices)[where][:n[where]])
    q = torch.randn(3, 4, length, 16, generator=generator)
    k, v = torch.randn(2, 3, 2, length, 16, generator=generator)
    with torch.no_grad():
        flex = flex_attention(q, k, v, block_mask=ours, enable_gqa=True)
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(ids), enable_gqa=True)
    torch.testing.assert_close(flex, dense, rtol=1e-5, atol=1e-5)


def test_previous_token_is_zero_at_each_document_start() -> None:
    ids = torch.tensor([[0, 0, 1, 2, 2, 2]])
    x = torch.arange(1.0, 7.0)[None, :, None]
    assert Documents(ids).previous(x).flatten().tolist() == [0, 1, 0, 0, 4, 5]


def test_the_cuda_path_builds_on_fake_cuda_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole forward on (fake) CUDA takes the flex path: the BlockMask, LFA's shifted inputs and
    every layer's attention inputs on the device, in the shapes the kernel takes. (The kernel
    itself cannot run on fake CUDA tensors; it is checked against SDPA on the CPU above.)"""
    calls = []

    def kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask, enable_gqa: bool
               ) -> torch.Tensor:
        blocks = [getattr(block_mask, name) for name in BLOCK_TENSORS]
        calls.append(([tuple(t.shape) for t in (q, k, v)], block_mask.shape, enable_gqa,
                      {t.device for t in (q, k, v, *blocks)}, {t.dtype for t in blocks}))
        return torch.empty_like(q)

    monkeypatch.setattr(documents_module, "_compiled_flex", kernel)
    cfg = compose(["+exp=tiny", "model.ffn_type=dense", "model.dense_ffn_hidden_size=64"])  # Yuan, LFA on
    model = build_stage(cfg).requires_grad_(False)  # (the experts' dispatch has data-dependent shapes)
    cuda = torch.device("cuda:0")
    with FakeTensorMode(allow_non_fake_inputs=True), CudaShims(), torch.no_grad():
        model = model.to(cuda)
        tokens = torch.zeros(2, 256, dtype=torch.long, device=cuda)
        logits = model(tokens, document_ids=torch.zeros_like(tokens))
    assert logits.shape == (2, 256, cfg.model.vocab_size) and logits.device == cuda
    qkv = [(2, cfg.model.num_heads, 256, cfg.model.head_dim)] * 3
    assert calls == [(qkv, (2, 1, 256, 256), False, {cuda}, {torch.int32})] * cfg.model.num_layers


def test_decoding_with_a_cache_takes_no_documents() -> None:
    model = build_stage(compose(["+exp=tiny"]))
    with pytest.raises(ValueError, match="one document per row"):
        model(torch.zeros(1, 4, dtype=torch.long), cache=KVCache(), document_ids=torch.zeros(1, 4, dtype=torch.long))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # eager: the reference
def test_compiled_attention_takes_each_micro_batchs_documents_without_recompiling(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """train.compile=block: the compiled attention block equals eager under new documents every
    call, on one graph; and compiled flex takes a new BlockMask (a new mask_mod closure) every
    call without recompiling — what the CUDA path relies on (flex compiles on the CPU for forward)."""
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    torch._dynamo.reset()
    model = random_model(compose(["+exp=tiny"]))
    attn = model.layers["0"].attn
    compiled = torch.compile(attn)
    rope = model.rotary(torch.arange(SEQ).expand(3, -1))
    for seed in range(3):
        x = torch.randn(3, SEQ, 64, generator=torch.Generator().manual_seed(seed))
        tokens = packed_rows().roll(seed, dims=1)
        documents = Documents(ids_of(tokens))
        torch.testing.assert_close(compiled(x, rope, documents=documents), attn(x, rope, documents=documents))
    flex = torch.compile(flex_attention)
    with torch.no_grad():
        for seed in range(3):
            q = torch.randn(3, 4, SEQ, 16, generator=torch.Generator().manual_seed(seed))
            mask = block_mask(ids_of(packed_rows().roll(seed, dims=1)), 16)
            torch.testing.assert_close(flex(q, q, q, block_mask=mask), flex_attention(q, q, q, block_mask=mask))
