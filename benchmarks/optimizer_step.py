"""Training-step time under Muon ÷ AdamW (and each with bf16 optimizer state), in one process;
and Muon's Newton–Schulz FLOPs per step for a large config, as a fraction of its training FLOPs.

The timed trainers run the model of benchmarks/train_step.py (4 layers, hidden 256, 16 experts
top-2, expert FFN 512) through the real loop (``build_trainer`` + ``train_step``) on mock data,
one per optimizer, in interleaved rounds so machine noise hits all alike. Target (issue 24):
Muon ÷ AdamW ≤ 1.15.

Newton–Schulz costs FLOPs per parameter (≈ 5 iterations × 6·A for an A × B matrix), training
costs FLOPs per token: the ratio is set by the tokens per step and replica. The default batch,
128 × 256 tokens in micro-batches of 32, gives this model a Newton–Schulz share of its training
FLOPs (0.17, printed) near M32's per GPU on 256 GPUs (0.11); train_step.py's 8 × 256 would give
2.7, a regime no pretraining run is in.

The FLOP count needs no hardware: the ``--flops-exp`` model (default M32) is built on the meta
device, each Muon matrix costs ``ns_steps`` iterations of 4A²B + 2A³ (A ≤ B), and the training
FLOPs are the MFU convention's, 3 × (forward matmuls + attention scores) per token. Every
replica orthogonalises its own copy of its matrices (no optimizer sharding), so per GPU the
fraction is dp × (dense matrices + expert matrices / ep) ÷ the model's training FLOPs.

    python -m benchmarks.optimizer_step --threads 2
    python -m benchmarks.optimizer_step --steps 1 --rounds 1 --hidden 64 --seq-len 32 --batch 8  # smoke run
"""

from __future__ import annotations

import argparse
import json

import torch
from omegaconf import DictConfig

from benchmarks.train_step import add_model_arguments, median_step_times, overrides
from megamoe.config import compose
from megamoe.estimators.planner import model_flops_per_token
from megamoe.models import build_stage, validate_config
from megamoe.nn.moe.experts import expert_parameters
from megamoe.train.muon import newton_schulz_flops
from megamoe.train.optim import muon_matrices

OPTIMIZERS = {
    "adamw": [],
    "muon": ["train.optimizer=muon"],
    "adamw_bf16_state": ["train.optimizer_state_dtype=bf16"],
    "muon_bf16_state": ["train.optimizer=muon", "train.optimizer_state_dtype=bf16"],
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(p)
    p.set_defaults(batch=128, steps=2)
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--optimizers", nargs="+", choices=tuple(OPTIMIZERS), default=list(OPTIMIZERS))
    p.add_argument("--flops-exp", default="m32_2000b", help="the config whose Newton–Schulz FLOPs are counted")
    p.add_argument("--world-size", type=int, default=256, help="GPUs of the --flops-exp layout (gives dp)")
    return p.parse_args()


def timed_overrides(args: argparse.Namespace, optimizer: str) -> list[str]:
    return [*overrides(args, dense=False), f"train.micro_batch={min(args.micro_batch, args.batch)}",
            *OPTIMIZERS[optimizer]]


def newton_schulz_share(cfg: DictConfig, world_size: int) -> dict[str, float]:
    """Newton–Schulz FLOPs per step of ``cfg`` under Muon: the whole model's (each matrix once) and
    one GPU's at its layout on ``world_size`` GPUs, each ÷ the training FLOPs of the same scope."""
    with torch.device("meta"):
        model = build_stage(cfg)
    matrices = muon_matrices(model, model.embedding_parameters())
    experts = {id(p) for p in expert_parameters(model)}
    steps = cfg.train.muon.ns_steps
    expert_flops = newton_schulz_flops((m for p, m in matrices.items() if id(p) in experts), steps)
    dense_flops = newton_schulz_flops((m for p, m in matrices.items() if id(p) not in experts), steps)
    training = model_flops_per_token(cfg) * cfg.train.global_batch * cfg.train.seq_len
    p = cfg.parallel
    dp = world_size // p.pp
    return {"world_size": world_size, "pp": p.pp, "dp": dp, "ep": p.ep,
            "newton_schulz_flops": dense_flops + expert_flops, "training_flops": training,
            "model_fraction": (dense_flops + expert_flops) / training,
            "per_gpu_fraction": dp * (dense_flops + expert_flops / p.ep) / training}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    median, _ = median_step_times({name: compose(timed_overrides(args, name)) for name in args.optimizers}, args)
    tokens = args.batch * args.seq_len
    for name, seconds in median.items():
        print(f"{name:>17}: {seconds * 1e3:8.1f} ms/step  {tokens / seconds:10,.0f} tokens/s")
    ratios = {f"{name}_vs_adamw": median[name] / median["adamw"] for name in median if name != "adamw"}
    if "muon_vs_adamw" in ratios:
        print(f"Muon ÷ AdamW step time: {ratios['muon_vs_adamw']:.3f}  (target ≤ 1.15)")
    timed = newton_schulz_share(compose(timed_overrides(args, "muon")), 1)
    print(f"the timed model: Newton–Schulz FLOPs = {timed['model_fraction']:.2f} × its training FLOPs per step")
    large = compose([f"+exp={args.flops_exp}", *OPTIMIZERS["muon"]])
    validate_config(large, args.world_size)
    share = newton_schulz_share(large, args.world_size)
    print(f"{args.flops_exp}: Newton–Schulz {share['newton_schulz_flops']:.3e} FLOPs per step, "
          f"{share['model_fraction']:.2%} of the training FLOPs (each matrix once); per GPU at pp {share['pp']} × "
          f"dp {share['dp']} (ep {share['ep']}): {share['per_gpu_fraction']:.2%}")
    print(json.dumps({"ms_per_step": {name: s * 1e3 for name, s in median.items()},
                      **{k: round(v, 4) for k, v in ratios.items()}, "threads": args.threads,
                      "timed_model_newton_schulz_fraction": timed["model_fraction"],
                      "newton_schulz": {"exp": args.flops_exp, **share}}))


if __name__ == "__main__":
    main()
