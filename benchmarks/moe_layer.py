"""Forward+backward time of one MoE layer against a dense FFN and a naive MoE, in the same run.

Default sizes are issue 3's: 32 experts, top-2, hidden 512, expert ffn 1024, 8192 tokens,
Attention Router, fp32 on CPU. Baselines, timed in the same process:

- dense: a SwiGLU FFN with ffn = top_k × expert ffn (2048), i.e. the MoE's active expert FLOPs;
- naive: the MoE by its definition — every expert runs on every token and its output is
  masked by the token's gate weight for it (0 when not chosen);
- index loop: the common per-expert ``where(mask)`` gather / ``index_add`` loop (HF style),
  for reference.

The naive and index-loop variants reuse the layer's router and expert weights, and their
outputs are checked against the layer's before timing. Prints a table, the ratios, and as its
last line one JSON object (``moe_vs_dense``, ``naive_vs_moe``, ...).

    python benchmarks/moe_layer.py                                   # CPU, fp32
    python benchmarks/moe_layer.py --device cuda --dtype bf16        # GPU, bf16 autocast
    python benchmarks/moe_layer.py --tokens 256 --warmup 0 --iters 1 # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import time
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from tqdm import tqdm

from megamoe.cli import exit_on_user_error
from megamoe.config.schema import MoEConfig
from megamoe.errors import UserError
from megamoe.nn.ffn import SwiGLU, swiglu
from megamoe.nn.moe import MoELayer
from megamoe.nn.moe.router import select_experts

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=1024, help="expert ffn hidden size")
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--router", choices=("attention", "linear"), default="attention")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                   help="bf16 = autocast with fp32 weights (the training setup)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch CPU threads; set it to the cores that are free")
    p.add_argument("--skip-naive", action="store_true", help="skip the (slow) naive masked loop")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def naive_masked_moe(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, masked by the token's gate weight for that expert."""
    routing = select_experts(layer.router(x), layer.moe.top_k, layer.moe.router_order, layer.moe.norm_topk_prob)
    out = torch.zeros_like(x)
    for e, (w1, w2) in enumerate(zip(layer.experts.w1.unbind(0), layer.experts.w2.unbind(0))):
        gate = (routing.weights * (routing.experts == e)).sum(dim=-1, keepdim=True)
        out = out + gate.to(x.dtype) * F.linear(swiglu(F.linear(x, w1)), w2)
    return out


def index_loop_moe(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """The common per-expert loop: find the expert's (token, slot) pairs, gather, run, add back."""
    routing = select_experts(layer.router(x), layer.moe.top_k, layer.moe.router_order, layer.moe.norm_topk_prob)
    out = torch.zeros_like(x)
    for e, (w1, w2) in enumerate(zip(layer.experts.w1.unbind(0), layer.experts.w2.unbind(0))):
        token, slot = torch.where(routing.experts == e)
        y = F.linear(swiglu(F.linear(x[token], w1)), w2) * routing.weights[token, slot, None].to(x.dtype)
        out = out.index_add(0, token, y)
    return out


@contextlib.contextmanager
def compute_precision(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    with torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32):
        yield


def time_fwd_bwd(name: str, fn: Callable[[torch.Tensor], torch.Tensor], params: list[torch.nn.Parameter],
                 x: torch.Tensor, grad: torch.Tensor, args: argparse.Namespace, dtype: torch.dtype) -> float:
    """Median seconds of one forward+backward (gradients cleared between runs, not timed)."""
    times = []
    for i in tqdm(range(args.warmup + args.iters), desc=f"{name:>10}", leave=False):
        for p in params:
            p.grad = None
        x.grad = None
        if x.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with compute_precision(x.device, dtype):
            y = fn(x)
        y.backward(grad.to(y.dtype))
        if x.is_cuda:
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def check_baselines(layer: MoELayer, baselines: dict[str, Callable[[MoELayer, torch.Tensor], torch.Tensor]],
                    x: torch.Tensor, dtype: torch.dtype) -> None:
    """Refuse to time a baseline that does not compute what the layer computes."""
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    with compute_precision(x.device, dtype):
        reference = layer(x)
        for name, fn in baselines.items():
            err = ((fn(layer, x) - reference).abs().max() / reference.abs().max()).item()
            if err > tol:
                raise SystemExit(f"{name} disagrees with MoELayer (relative error {err:.2e} > {tol}); not timing it")


@exit_on_user_error
def main() -> None:
    args = parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: no CUDA device is visible; use --device cpu")
    if args.iters < 1 or args.tokens < 1:
        raise UserError("--iters and --tokens must be >= 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]

    moe_cfg = MoEConfig(num_experts=args.experts, top_k=args.top_k, ffn_hidden_size=args.ffn, router=args.router)
    layer = MoELayer(args.hidden, moe_cfg, layer_index=0)
    layer.reset_parameters(0.02, args.seed)
    dense = SwiGLU(args.hidden, args.top_k * args.ffn)
    dense.reset_parameters(0.02, args.seed, "dense")
    layer.to(device), dense.to(device)
    x = torch.randn(args.tokens, args.hidden, device=device, requires_grad=True)
    grad = torch.randn(args.tokens, args.hidden, device=device)

    moe_params = list(layer.parameters())
    baselines = {"index loop": index_loop_moe} | ({} if args.skip_naive else {"naive": naive_masked_moe})
    check_baselines(layer, baselines, x, dtype)
    cases: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], list[torch.nn.Parameter]]] = {
        "dense": (dense, list(dense.parameters())),
        "moe": (layer, moe_params),
        **{name: (functools.partial(fn, layer), moe_params) for name, fn in baselines.items()},
    }
    seconds = {name: time_fwd_bwd(name, fn, params, x, grad, args, dtype) for name, (fn, params) in cases.items()}

    print(f"MoE layer fwd+bwd: {args.tokens} tokens, hidden {args.hidden}, {args.experts} experts top-{args.top_k}, "
          f"expert ffn {args.ffn}, {args.router} router, {args.dtype} on {device} ({args.threads} threads)")
    print(f"{'variant':<12}{'ms':>10}{'tokens/s':>12}{'÷ moe':>8}")
    for name, s in seconds.items():
        print(f"{name:<12}{s * 1e3:>10.1f}{args.tokens / s:>12.0f}{s / seconds['moe']:>8.2f}")
    result = {
        "moe_vs_dense": round(seconds["moe"] / seconds["dense"], 3),
        "naive_vs_moe": round(seconds["naive"] / seconds["moe"], 3) if "naive" in seconds else None,
        "index_loop_vs_moe": round(seconds["index loop"] / seconds["moe"], 3),
        **{f"{name.replace(' ', '_')}_ms": round(s * 1e3, 2) for name, s in seconds.items()},
        "tokens": args.tokens, "device": str(device), "dtype": args.dtype, "threads": args.threads,
    }
    print(f"MoE ÷ dense = {result['moe_vs_dense']} (target ≤ 1.3); "
          f"naive ÷ MoE = {result['naive_vs_moe']} (target ≥ 3)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
