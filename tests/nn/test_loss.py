"""The chunked loss against the plain one on full logits: same loss and gradients, no logits kept."""

from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from megamoe.config import compose
from megamoe.estimators import memory
from megamoe.nn import loss as loss_module
from megamoe.nn.loss import CHUNK_LOGITS_BYTES, IGNORE_INDEX, chunk_tokens, chunked_lm_loss, lm_loss
from megamoe.nn.moe.layer import MoEAuxLossBackward
from megamoe.parallel.pipeline import build_stage_modules
from megamoe.train.peak_memory import cpu_peak_bytes

TOKENS, HIDDEN, VOCAB = 37, 16, 50


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-6, name: str = "") -> None:
    """|actual − expected| ≤ rel · max|expected|, elementwise."""
    error = (actual - expected).abs().max()
    assert error <= rel * expected.abs().max(), f"{name}: {error} > {rel} · {expected.abs().max()}"


def problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [T, H], weight [V, H], labels with ignored positions, a loss mask that drops others."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(TOKENS, HIDDEN, generator=g).requires_grad_()
    weight = (0.5 * torch.randn(VOCAB, HIDDEN, generator=g)).requires_grad_()
    labels = torch.randint(0, VOCAB, (TOKENS,), generator=g)
    labels[[3, 10, 36]] = IGNORE_INDEX
    mask = (torch.rand(TOKENS, generator=g) > 0.3).long()
    return hidden, weight, labels, mask


def loss_and_grads(loss_fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> list[torch.Tensor]:
    """The loss, its gradient with respect to the hidden states and to the head weight."""
    hidden, weight, *_ = inputs
    loss = loss_fn(*inputs)
    return [loss, *torch.autograd.grad(loss, (hidden, weight))]


def plain(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return lm_loss(F.linear(hidden, weight), labels, mask)


@pytest.mark.parametrize("chunk", [1, 5, TOKENS, 100])  # ragged last chunk, one chunk, longer than the input
def test_loss_and_gradients_equal_the_plain_path(chunk: int) -> None:
    inputs = problem()
    expected = loss_and_grads(plain, *inputs)
    actual = loss_and_grads(lambda *a: chunked_lm_loss(*a, chunk=chunk), *inputs)
    for a, e in zip(actual, expected, strict=True):  # loss, grad of hidden, grad of the head weight
        assert_rel(a, e)


def test_bf16_autocast_computes_the_logits_in_bf16_like_the_plain_path() -> None:
    """Same loss and grad of hidden; the head gradient within bf16 rounding (the plain path rounds
    the whole token sum to bf16 once, the chunked one each chunk's part, summed in fp32)."""
    inputs = problem()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = loss_and_grads(plain, *inputs)
        actual = loss_and_grads(lambda *a: chunked_lm_loss(*a, chunk=5), *inputs)
    fp32_loss = plain(*inputs)
    assert abs(fp32_loss - expected[0]) > 100 * 1e-6 * expected[0]  # so the next line tells bf16 from fp32 logits
    assert_rel(actual[0], expected[0])
    assert_rel(actual[1], expected[1])
    assert_rel(actual[2], expected[2], rel=1e-2)


def test_forward_keeps_no_logits() -> None:
    hidden, weight, labels, mask = problem()
    shapes = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunked_lm_loss(hidden, weight, labels, mask, chunk=5)
    assert [s for s in shapes if VOCAB in s] == [(VOCAB, HIDDEN)]  # the weight itself; no [tokens, vocab]
    # the hidden states; per token the labels, the log-sum-exp and the mask; the mean's denominator
    assert sorted(s for s in shapes if s != (VOCAB, HIDDEN)) == [(), (TOKENS,), (TOKENS,), (TOKENS,), (TOKENS, HIDDEN)]


@pytest.mark.parametrize(("tie", "pp"), [(True, 1), (False, 1), (True, 2)])  # head: embedding, lm_head, tied copy
def test_a_stage_loss_trains_its_model_like_the_plain_loss_on_its_logits(tie: bool, pp: int) -> None:
    """StageModule.loss (the pipeline's loss_fn and the pp = 1 loop's) against lm_loss on
    the decoder's logits: the loss and every parameter's gradient, MoE aux losses on."""
    cfg = compose(["+exp=tiny", f"model.tie_embeddings={str(tie).lower()}", f"parallel.pp={pp}",
                   "moe.aux_loss_coeff=0.01", "moe.z_loss_coeff=0.001"])
    stage = build_stage_modules(cfg, pp_rank=pp - 1)[-1]
    stage.model.reset_parameters(cfg.seed)
    MoEAuxLossBackward.set_loss_scale(1.0)
    g = torch.Generator().manual_seed(0)
    x = (torch.randint(0, cfg.model.vocab_size, (2, 16), generator=g) if pp == 1
         else torch.randn(2, 16, cfg.model.hidden_size, generator=g))
    positions = torch.arange(16).expand(2, -1)
    labels = torch.randint(0, cfg.model.vocab_size, (2, 16), generator=g)
    labels[0, :5] = IGNORE_INDEX
    results = []
    for loss_fn in (lambda: stage.loss(stage(x, positions), labels),
                    lambda: lm_loss(stage.model(x, positions), labels, labels != IGNORE_INDEX)):
        loss = loss_fn()
        grads = torch.autograd.grad(loss, list(stage.parameters()))
        results.append([loss, *grads])
    for (name, _), chunked, reference in zip([("loss", None), *stage.named_parameters()], *results, strict=True):
        assert_rel(chunked, reference, name=name)


def test_memory_holds_one_chunk_of_logits_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 peaks of forward and backward over four chunks: what memory.loss_working_bytes
    counts (one chunk's logits and temporaries, the head's gradient), far below the plain path."""
    tokens, hidden_size, vocab = 512, 64, 8192
    monkeypatch.setattr(loss_module, "CHUNK_LOGITS_BYTES", 4 * vocab * tokens // 4)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, generator=g).requires_grad_()
    weight = torch.randn(vocab, hidden_size, generator=g).requires_grad_()
    labels, mask = torch.randint(0, vocab, (tokens,), generator=g), torch.ones(tokens)
    peaks = {}
    for name, loss_fn in (("chunked", chunked_lm_loss), ("plain", plain)):
        with cpu_peak_bytes() as forward:
            loss = loss_fn(hidden, weight, labels, mask)
        with cpu_peak_bytes() as backward:
            loss.backward()
        peaks[name] = max(forward.bytes, backward.bytes)
    cfg = OmegaConf.create({"model": {"vocab_size": vocab, "hidden_size": hidden_size}})
    assert peaks["chunked"] == pytest.approx(memory.loss_working_bytes(cfg, memory.FP32, tokens), rel=0.02)
    assert peaks["chunked"] < 0.3 * peaks["plain"]


def test_the_chunk_follows_the_logits_budget() -> None:
    m32 = compose(["+exp=m32_2000b"]).model.vocab_size
    assert chunk_tokens(m32) == 496
    assert 4 * m32 * 496 <= CHUNK_LOGITS_BYTES < 4 * m32 * 497
    assert chunk_tokens(512) == CHUNK_LOGITS_BYTES // 2048
