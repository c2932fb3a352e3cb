"""One command that proves the GPU path: ``python benchmarks/gpu_check.py`` (or ``make gpu-check``).

On one CUDA GPU, in under 8 minutes, each check prints one line (PASS / FAIL and its figures),
then the last line is one JSON object with every figure:

1. ``bf16_tracks_fp32`` — the one-GPU proxy (configs/exp/proxy_1gpu.yaml, a smaller batch) trains
   the same mock data from the same seed in bf16 and in fp32; the losses at the last step
   (200) agree within 2% relative.
2. ``grouped_gemm`` — the experts' grouped GEMM (``torch._grouped_mm``) equals the per-expert
   loop, forward and gradients, to bf16 tolerance, and is faster (M32's expert shape).
3. ``flash_sdpa`` — attention runs on a flash or cuDNN SDPA kernel at M32's head size (256),
   with LFA on: the layer's forward succeeds with only those backends allowed.
4. ``fused_adamw`` — the optimizer the trainer builds (apex FusedAdam when importable, else
   torch's fused AdamW) makes the same update as torch's reference AdamW.
5. ``muon`` — a Muon step of one ep-8 rank's share of an M32 expert bank (bf16 Newton–Schulz,
   the bank as one batch) equals the float64 step within bf16 tolerance; the iteration's TFLOP/s.
6. ``memory_vs_estimate`` — the peak memory of 2 proxy steps against megamoe.estimators.memory's
   estimate: within 15%.
7. ``mfu`` — MFU of an M32-shaped slice (hidden 2048, 16 heads × 256, 32 experts top-2, expert
   FFN 8192, seq 4096, bf16) with as many layers as fit the GPU and the recompute mode the
   estimator and planner advise; target ≥ 45% on H100 / H200.
8. ``document_attention`` — attention inside documents (``data.reset_attention_mask``) at M32's
   shape (16 heads × 256, 4096 tokens of ~4 documents, bf16): the flex-attention path equals SDPA
   under the dense mask, forward and gradients, and is not slower than torch's varlen
   (FlashAttention) kernel by more than 10% — the choice megamoe.nn.documents made; its time
   against plain causal flash attention is reported.

``--dry-run`` runs every check's code on the CPU at tiny shapes — the comparisons included, the
speed figures meaningless — so the script cannot rot: tests/benchmarks/test_gpu_check.py runs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from megamoe.config import compose
from megamoe.config.schema import as_object
from megamoe.estimators import balance
from megamoe.estimators.planner import Hardware, Layout, evaluate_layout
from megamoe.models import build_stage
from megamoe.nn.moe import ExpertBank
from megamoe.parallel.mesh import init_grid, shutdown
from megamoe.train.metrics import detect_peak_flops
from megamoe.train.muon import newton_schulz_dtype, newton_schulz_flops, orthogonalize
from megamoe.train.optim import build_optimizer, param_groups
from megamoe.train.peak_memory import cpu_peak_bytes
from megamoe.train.step import train_step
from megamoe.train.trainer import build_trainer


@dataclass(frozen=True)
class Sizes:
    """How big each check runs: the real thing on a GPU, a few seconds' worth on the CPU."""

    proxy: tuple[str, ...]  # overrides of the bf16-vs-fp32 and memory runs
    proxy_steps: int
    experts: tuple[int, int, int, int]  # (experts, tokens, hidden, ffn) of the grouped GEMM check
    m32_slice: tuple[str, ...]  # overrides of the MFU slice (its layers are chosen to fit)
    max_layers: int
    timed_steps: int


GPU = Sizes(
    proxy=("+exp=proxy_1gpu", "train.global_batch=8", "train.micro_batch=4", "train.warmup_steps=20"),
    proxy_steps=200,
    experts=(32, 16384, 2048, 8192),
    m32_slice=("+exp=m32_2000b", "parallel.pp=1", "parallel.ep=1", "parallel.schedule=1f1b",
               "parallel.virtual_stages=1", "train.micro_batch=1", "train.global_batch=8"),
    max_layers=24,
    timed_steps=5,
)
DRY = Sizes(
    proxy=("+exp=tiny", "train.global_batch=4", "train.micro_batch=2", "train.seq_len=32", "train.warmup_steps=2"),
    proxy_steps=20,
    experts=(4, 64, 32, 64),
    m32_slice=("+exp=tiny", "train.global_batch=4", "train.micro_batch=1", "train.seq_len=32"),
    max_layers=4,
    timed_steps=2,
)


@dataclass
class Check:
    name: str
    passed: bool
    summary: str
    figures: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'}  {self.name:<20} {self.summary}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device, repeats: int = 5) -> float:
    """Median seconds of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _proxy_losses(sizes: Sizes, precision: str) -> list[float]:
    cfg = compose([*sizes.proxy, "data=mock", f"train.steps={sizes.proxy_steps}", f"train.precision={precision}"])
    grid = init_grid(1, 1, timeout_s=600)
    try:
        trainer = build_trainer(cfg, grid)
        batches = iter(trainer.loader)
        return [train_step(trainer, next(batches), report_routing=False).loss for _ in range(sizes.proxy_steps)]
    finally:
        shutdown()


def check_bf16_tracks_fp32(sizes: Sizes, device: torch.device) -> Check:
    bf16, fp32 = _proxy_losses(sizes, "bf16"), _proxy_losses(sizes, "fp32")
    gap = abs(bf16[-1] - fp32[-1]) / abs(fp32[-1])
    return Check("bf16_tracks_fp32", gap <= 0.02,
                 f"step {len(bf16)}: bf16 loss {bf16[-1]:.4f}, fp32 {fp32[-1]:.4f}, {100 * gap:.2f}% apart (≤ 2%)",
                 {"bf16_loss": bf16[-1], "fp32_loss": fp32[-1], "relative_gap": gap, "steps": len(bf16)})


def check_grouped_gemm(sizes: Sizes, device: torch.device) -> Check:
    experts, tokens, hidden, ffn = sizes.experts
    counts = _counts(experts, tokens)
    banks = {mode: ExpertBank(experts, 0, hidden, ffn, mode).to(device) for mode in ("on", "off")}
    banks["on"].reset_parameters(0.02, 0, 0)
    banks["off"].load_state_dict(banks["on"].state_dict())
    x = torch.randn(tokens, hidden, device=device, generator=torch.Generator(device).manual_seed(0))

    def run(mode: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        bank, inputs = banks[mode], x.clone().requires_grad_()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = bank(inputs, counts)
        out.float().square().mean().backward()
        grads = [inputs.grad, bank.w1.grad, bank.w2.grad]
        bank.zero_grad(set_to_none=True)
        return out.float(), grads

    (out_g, grads_g), (out_l, grads_l) = run("on"), run("off")
    error = max(_relative_error(a, b) for a, b in zip([out_g, *grads_g], [out_l, *grads_l]))
    grouped_s, loop_s = _timed(lambda: run("on"), device), _timed(lambda: run("off"), device)
    speedup = loop_s / grouped_s
    passed = error <= 2e-2 and (device.type != "cuda" or speedup > 1)
    return Check("grouped_gemm", passed, f"max relative error {error:.1e} (≤ 2e-2, bf16); loop {1e3 * loop_s:.1f} ms, "
                 f"grouped {1e3 * grouped_s:.1f} ms: {speedup:.2f}× (> 1)",
                 {"max_relative_error": error, "loop_ms": 1e3 * loop_s, "grouped_ms": 1e3 * grouped_s,
                  "speedup": speedup})


def _counts(experts: int, tokens: int) -> list[int]:
    """Uneven tokens per expert that add up to ``tokens`` (one expert gets none)."""
    weights = torch.rand(experts, generator=torch.Generator().manual_seed(1))
    weights[1] = 0
    counts = (weights / weights.sum() * tokens).floor().long()
    counts[0] += tokens - counts.sum()
    return counts.tolist()


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def check_flash_sdpa(sizes: Sizes, device: torch.device) -> Check:
    cfg = compose([*sizes.m32_slice, "model.num_layers=1", "model.use_lfa=true"])
    layer = build_stage(cfg, range(1), pre_process=False, post_process=False).to(device)
    layer.reset_parameters(0)
    h = torch.randn(1, cfg.train.seq_len, cfg.model.hidden_size, device=device)
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION] if device.type == "cuda" else [SDPBackend.MATH]
    allowed = " / ".join(b.name.lower() for b in backends)
    try:
        with sdpa_kernel(backends), torch.autocast(device.type, dtype=torch.bfloat16), torch.no_grad():
            out = layer.hidden_states(h)
        ok, summary = bool(torch.isfinite(out).all()), f"runs with only {allowed} SDPA allowed"
    except RuntimeError as exc:
        ok, summary = False, f"no {allowed} kernel for head dim {cfg.model.head_dim}: {str(exc).splitlines()[0]}"
    return Check("flash_sdpa", ok, f"head dim {cfg.model.head_dim}, LFA on: {summary}",
                 {"head_dim": cfg.model.head_dim, "backends": [b.name for b in backends]})


def check_fused_adamw(sizes: Sizes, device: torch.device) -> Check:
    cfg, t = compose(["+exp=tiny"]), compose(["+exp=tiny"]).train
    model, reference = build_stage(cfg).to(device), build_stage(cfg).to(device)
    model.reset_parameters(0)
    reference.load_state_dict(model.state_dict())
    fused = build_optimizer(model, t, model.embedding_parameters())
    groups = param_groups(reference, t.weight_decay, t.decay_embeddings, reference.embedding_parameters())
    plain = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, foreach=False, fused=False)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p, r in zip(model.parameters(), reference.parameters()):
            p.grad = torch.randn(p.shape, generator=generator).to(device)
            r.grad = p.grad.clone()
        fused.step()
        plain.step()
    error = max(_relative_error(p, r) for p, r in zip(model.parameters(), reference.parameters()))
    return Check("fused_adamw", error <= 1e-5, f"{type(fused).__module__}.{type(fused).__name__} vs torch AdamW "
                 f"(for-loop): max relative difference {error:.1e} after 3 steps (≤ 1e-5)",
                 {"optimizer": type(fused).__name__, "max_relative_difference": error})


def check_muon(sizes: Sizes, device: torch.device) -> Check:
    """One Muon step of an expert bank (on a GPU, one ep-8 rank's share of an M32 layer: 4 experts,
    8 gate / up matrices of 8192 × 2048 and 4 down ones) — bf16 Newton–Schulz, the bank's matrices
    as one batch — against the same step in float64 matrix by matrix; and the iteration's rate."""
    experts, _, hidden, ffn = sizes.experts
    bank = ExpertBank(max(experts // 8, 1), 0, hidden, ffn).to(device)
    bank.reset_parameters(0.02, 0, 0)
    t = compose(["+exp=tiny", "train.optimizer=muon"]).train
    optimizer = build_optimizer(bank, t)
    generator = torch.Generator().manual_seed(0)
    for p in bank.parameters():
        p.grad = torch.randn(p.shape, generator=generator).to(device)
    before = [p.detach().double() for p in bank.parameters()]
    optimizer.step()  # the first step's update is NS of the gradient itself (Nesterov of a zero momentum)
    error = 0.0
    for p, w in zip(bank.parameters(), before):
        m = optimizer.matrices[p]
        exact = torch.stack([orthogonalize(x[None], t.muon.ns_steps)[0] for x in m.view(p.grad.double())])
        expected = w * (1 - t.lr * t.weight_decay) - t.lr * m.scale(t.muon.adjust_lr) * exact.reshape(p.shape)
        error = max(error, _relative_error(p.double() - w, expected - w))
    batch = optimizer.matrices[bank.w1].view(bank.w1.grad).to(newton_schulz_dtype(bank.w1))
    seconds = _timed(lambda: orthogonalize(batch, t.muon.ns_steps), device)
    rate = newton_schulz_flops([optimizer.matrices[bank.w1]], t.muon.ns_steps) / seconds
    return Check("muon", error <= 3e-2, f"{batch.dtype} Newton–Schulz of {batch.shape[0]} matrices "
                 f"{list(batch.shape[1:])} in one batch: relative error of the step {error:.1e} vs float64 (≤ 3e-2); "
                 f"{1e3 * seconds:.1f} ms, {rate / 1e12:.1f} TFLOP/s",
                 {"max_relative_error": error, "ms": 1e3 * seconds, "tflops": rate / 1e12})


def check_memory(sizes: Sizes, device: torch.device) -> Check:
    cfg = compose([*sizes.proxy, "data=mock", "train.steps=2", "train.precision=bf16"])
    estimate = balance.memory_per_gpu(cfg, 1)[1].total
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        _train_steps(cfg, 2)
        measured = torch.cuda.max_memory_allocated(device)
    else:
        with cpu_peak_bytes() as peak:
            _train_steps(cfg, 2)
        measured = peak.bytes
    gap = abs(estimate - measured) / measured
    return Check("memory_vs_estimate", gap <= 0.15, f"2 proxy steps: measured {measured / 2**30:.2f} GiB, estimate "
                 f"{estimate / 2**30:.2f} GiB, {100 * gap:.1f}% apart (≤ 15%)",
                 {"measured_gib": measured / 2**30, "estimate_gib": estimate / 2**30, "relative_gap": gap})


def _train_steps(cfg: Any, steps: int) -> list[float]:
    grid = init_grid(1, 1, timeout_s=600)
    try:
        trainer = build_trainer(cfg, grid)
        batches = iter(trainer.loader)
        return [train_step(trainer, next(batches), report_routing=False).loss for _ in range(steps)]
    finally:
        shutdown()


def _gpu(device: torch.device) -> Hardware:
    """The planner's description of this device (a CPU: a nominal one, for the dry run's code path)."""
    if device.type != "cuda":
        return Hardware("cpu", memory_gib=1.0, peak_tflops=0.1)
    props = torch.cuda.get_device_properties(device)
    peak = detect_peak_flops(device) or 989e12
    return Hardware(props.name, memory_gib=props.total_memory / 2**30, peak_tflops=peak / 1e12, gpus_per_node=1)


def advised_slice(sizes: Sizes, hw: Hardware) -> tuple[Any, str, int]:
    """The M32 slice to time: the (layers, recompute) that fit the GPU with the best predicted MFU."""
    base = as_object(compose([*sizes.m32_slice, "data=mock", "train.precision=bf16"]))
    best: Optional[tuple[float, Any, str, int]] = None
    for layers in range(sizes.max_layers, 0, -1):
        cfg = dataclasses.replace(base, model=dataclasses.replace(base.model, num_layers=layers))
        for recompute in ("none", "selective", "full"):
            plan = evaluate_layout(cfg, Layout(1, 1, 1, "1f1b", cfg.train.micro_batch, recompute, "even"), 1, hw)
            if hasattr(plan, "mfu") and (best is None or plan.mfu > best[0]):
                best = (plan.mfu, cfg, recompute, layers)
    if best is None:
        raise SystemExit("error: not even one M32 layer fits this GPU")
    _, cfg, recompute, layers = best
    return cfg, recompute, layers


def check_mfu(sizes: Sizes, device: torch.device) -> Check:
    from omegaconf import OmegaConf

    from megamoe.estimators.planner import model_flops_per_token

    hw = _gpu(device)
    plain, recompute, layers = advised_slice(sizes, hw)
    cfg = OmegaConf.merge(OmegaConf.structured(plain), {"train": {"activation_checkpointing": recompute,
                                                                    "steps": sizes.timed_steps + 2}})
    grid = init_grid(1, 1, timeout_s=600)
    try:
        trainer = build_trainer(cfg, grid)
        batches = iter(trainer.loader)
        for _ in range(2):  # warm-up: kernels chosen, caches filled
            train_step(trainer, next(batches), report_routing=False)
        _sync(device)
        start = time.perf_counter()
        for _ in range(sizes.timed_steps):
            train_step(trainer, next(batches), report_routing=False)
        _sync(device)
        step_s = (time.perf_counter() - start) / sizes.timed_steps
    finally:
        shutdown()
    tokens_per_s = cfg.train.global_batch * cfg.train.seq_len / step_s
    achieved = model_flops_per_token(cfg) * tokens_per_s / (hw.peak_tflops * 1e12)
    passed = device.type != "cuda" or achieved >= 0.45
    return Check("mfu", passed, f"M32 slice of {layers} layers, recompute {recompute}: {tokens_per_s:,.0f} tokens/s, "
                 f"MFU {100 * achieved:.1f}% of {hw.peak_tflops:g} TFLOP/s (≥ 45% on H100 / H200)",
                 {"layers": layers, "recompute": recompute, "step_s": step_s, "tokens_per_s": tokens_per_s,
                  "mfu": achieved, "peak_tflops": hw.peak_tflops})


def check_document_attention(sizes: Sizes, device: torch.device) -> Check:
    from megamoe.nn.documents import Documents, dense_mask

    cfg = compose(list(sizes.m32_slice))
    heads, head_dim, s = cfg.model.num_heads, cfg.model.head_dim, cfg.train.seq_len
    generator = torch.Generator().manual_seed(0)
    ends = torch.rand(1, s, generator=generator) < 4 / s  # ~4 documents per row, of random lengths
    ids = (ends.cumsum(1) - ends.long()).to(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = (torch.randn(1, heads, s, head_dim, generator=generator).to(device, dtype) for _ in range(3))
    documents, mask = Documents(ids), dense_mask(ids)  # flex on CUDA (the CPU dry run: the dense mask)

    def run(attend: Callable[..., torch.Tensor]) -> list[torch.Tensor]:
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        out = attend(*inputs)
        out.float().square().mean().backward()
        return [out, *(t.grad for t in inputs)]

    kernels = {"documents": lambda *qkv: documents.attention(*qkv, gqa=False),
               "causal": lambda *qkv: F.scaled_dot_product_attention(*qkv, is_causal=True)}
    if device.type == "cuda":
        kernels["varlen"] = _varlen_documents(ids)
    reference = run(lambda *qkv: F.scaled_dot_product_attention(*qkv, attn_mask=mask))
    error = max(_relative_error(a, b) for a, b in zip(run(kernels["documents"]), reference))
    ms = {name: 1e3 * _timed(lambda fn=fn: run(fn), device) for name, fn in kernels.items()}
    fastest = "varlen" not in ms or ms["documents"] <= 1.1 * ms["varlen"]
    versus = f", varlen {ms['varlen']:.2f} ms (flex ≤ 1.1 × varlen)" if "varlen" in ms else ""
    return Check("document_attention", error <= 2e-2 and fastest,
                 f"{int(ids.max()) + 1} documents in {s} tokens: max relative error {error:.1e} vs SDPA's dense mask "
                 f"(≤ 2e-2); forward + backward {ms['documents']:.2f} ms{versus}, plain causal {ms['causal']:.2f} ms",
                 {"documents": int(ids.max()) + 1, "max_relative_error": error,
                  **{f"{name}_ms": t for name, t in ms.items()}})


def _varlen_documents(ids: torch.Tensor) -> Callable[..., torch.Tensor]:
    """torch's varlen attention over the documents of one row (the alternative to flex)."""
    from torch.nn.attention.varlen import varlen_attn

    starts = torch.nonzero(torch.diff(ids[0], prepend=ids[0, :1] - 1)).flatten()
    cu = torch.cat([starts, starts.new_tensor([ids.shape[1]])]).to(torch.int32)
    longest = int(cu.diff().max())

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        packed = [t[0].transpose(0, 1).contiguous() for t in (q, k, v)]  # [s, heads, d]
        return varlen_attn(*packed, cu, cu, longest, longest, window_size=(-1, 0)).transpose(0, 1)[None]

    return attend


CHECKS = (check_bf16_tracks_fp32, check_grouped_gemm, check_flash_sdpa, check_fused_adamw, check_muon, check_memory,
          check_mfu, check_document_attention)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="every check on the CPU at tiny shapes")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA GPU here; run with --dry-run to exercise the checks on the CPU")
    device = torch.device("cuda" if not args.dry_run else "cpu")
    sizes = DRY if args.dry_run else GPU
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    print(f"gpu_check on {name}, torch {torch.__version__}", flush=True)
    started, checks = time.perf_counter(), []
    for check in CHECKS:
        result = check(sizes, device)
        checks.append(result)
        print(result.line(), flush=True)
    summary = {"device": name, "dry_run": args.dry_run, "seconds": round(time.perf_counter() - started, 1),
               "passed": all(c.passed for c in checks),
               "checks": {c.name: {"passed": c.passed, **c.figures} for c in checks}}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
