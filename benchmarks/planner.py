"""The layout planner's step-time model against measured steps, on this machine.

Claim: ``launch/plan.py`` orders layouts the way they really run. The CPU is described to the
planner as a "GPU" whose sustained FLOP/s and link bandwidth are measured first (a matmul of the
model's shapes on one thread, a gloo all-reduce between two processes); then every layout below
trains a few steps of the same model with ``launch/pretrain.py`` (one or two processes: this
machine has two cores), and the median step time is compared with the prediction. Reports each
layout's predicted and measured seconds and their ratio, and Spearman's rank correlation.

    python benchmarks/planner.py            # ~3 minutes on 2 cores; --steps to change the length

Also prints the planner's best layout and MFU for M32 on 64, 256 and 1536 GPUs of each named
kind. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megamoe.config import compose
from megamoe.estimators import balance, memory
from megamoe.estimators.planner import GPUS, Hardware, Layout, plan, step_time, with_layout

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["+exp=tiny", "model.hidden_size=256", "model.num_heads=4", "model.head_dim=64", "model.num_layers=4",
         "model.vocab_size=4096", "model.max_position_embeddings=256", "moe.ffn_hidden_size=512",
         "train.seq_len=256", "train.global_batch=16", "train.warmup_steps=1", "data=mock"]
LAYOUTS = [  # (processes, layout)
    (1, Layout(1, 1, 1, "1f1b", 4, "none", "even")),
    (1, Layout(1, 1, 1, "1f1b", 1, "none", "even")),
    (1, Layout(1, 1, 1, "1f1b", 4, "full", "even")),
    (2, Layout(1, 1, 1, "1f1b", 2, "none", "even")),
    (2, Layout(1, 2, 1, "1f1b", 2, "none", "even")),
    (2, Layout(2, 1, 1, "1f1b", 1, "none", "even")),
    (2, Layout(2, 1, 1, "1f1b", 4, "none", "even")),
    (2, Layout(2, 1, 2, "interleaved_1f1b", 2, "none", "even")),
]


def matmul_flops_per_s(hidden: int, ffn: int, tokens: int, repeats: int = 20) -> float:
    """Sustained FLOP/s of one thread on a matmul of the model's FFN shape (the bulk of its FLOPs)."""
    torch.set_num_threads(1)
    x, w = torch.randn(tokens, hidden), torch.randn(2 * ffn, hidden)
    torch.nn.functional.linear(x, w)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.nn.functional.linear(x, w)
    return repeats * 2 * tokens * hidden * 2 * ffn / (time.perf_counter() - start)


def _all_reduce_worker(rank: int, rendezvous: str, nbytes: int, out: mp.Queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    buffer = torch.zeros(nbytes // 4)
    dist.all_reduce(buffer)
    start = time.perf_counter()
    for _ in range(5):
        dist.all_reduce(buffer)
    if rank == 0:  # a ring all-reduce of two moves the buffer once each way
        out.put(5 * nbytes / (time.perf_counter() - start))
    dist.destroy_process_group()


def link_bytes_per_s(nbytes: int = 16 << 20) -> float:
    """Bytes per second one way between two gloo processes on this machine."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_all_reduce_worker, args=(r, f"{tmp}/rendezvous", nbytes, out)) for r in range(2)]
        for p in procs:
            p.start()
        value = out.get(timeout=120)
        for p in procs:
            p.join()
    return value


def measured_step_s(nproc: int, layout: Layout, steps: int) -> float:
    """Median step_time_s of ``launch/pretrain.py`` over the steps after the first two."""
    overrides = [f"{k}={'null' if v is None else v}" for k, v in layout.overrides().items()]
    with tempfile.TemporaryDirectory() as run_dir:
        script = ["launch/pretrain.py", *MODEL, *overrides, f"train.steps={steps}", f"run.dir={run_dir}",
                  "checkpoint.interval=100000", "train.eval_interval=100000", "logging.expert_load=false"]
        cmd = [sys.executable, *script] if nproc == 1 else [
            str(Path(sys.executable).with_name("torchrun")), "--standalone", f"--nproc_per_node={nproc}", *script]
        subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True, capture_output=True)
        records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["step_time_s"] for r in records[2:])


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(xs: list[float]) -> list[int]:
        order = sorted(range(len(xs)), key=xs.__getitem__)
        return [order.index(i) for i in range(len(xs))]

    ra, rb = ranks(a), ranks(b)
    n = len(a)
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb)) / (n * (n * n - 1))


def m32_best_layouts() -> dict[str, dict]:
    cfg = compose(["+exp=m32_2000b"])
    best = {}
    for name, hw in GPUS.items():
        for gpus in (64, 256, 1536):
            result = plan(cfg, gpus, hw)
            key = f"{name}x{gpus}"
            best[key] = result.plans[0].summary() if result.plans else {"fits": False}
            summary = best[key]
            print(f"M32 on {gpus} × {name}: " + (f"{result.plans[0].layout.short()}, {summary['memory_gib']} GiB, "
                  f"MFU {100 * summary['mfu']:.1f}%, {summary['days']} days" if result.plans else "no layout fits"))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    cfg = compose(MODEL)
    flops_per_s = matmul_flops_per_s(cfg.model.hidden_size, cfg.moe.ffn_hidden_size, cfg.train.seq_len * 2)
    link = link_bytes_per_s()
    cpu = Hardware("cpu", memory_gib=24, peak_tflops=flops_per_s / 1e12, gpus_per_node=2, efficiency=1.0,
                   intra_node_gbps=8 * link / 1e9, inter_node_gbps=8 * link / 1e9)
    print(f"this CPU as the planner sees it: {flops_per_s / 1e9:.1f} GFLOP/s per process, link {link / 1e9:.2f} GB/s")
    rows = []
    for nproc, layout in LAYOUTS:
        candidate = with_layout(cfg, layout)
        lay = memory.grid_shape(candidate, nproc)
        predicted = step_time(candidate, lay, cpu, balance.stage_layers(candidate)).total
        measured = measured_step_s(nproc, layout, args.steps)
        rows.append({"layout": layout.short(), "processes": nproc, "predicted_s": round(predicted, 4),
                     "measured_s": round(measured, 4), "ratio": round(measured / predicted, 3)})
        print(f"{nproc} process(es), {layout.short()}: predicted {predicted:.3f} s, measured {measured:.3f} s "
              f"(measured ÷ predicted {measured / predicted:.2f})")
    rho = spearman([r["predicted_s"] for r in rows], [r["measured_s"] for r in rows])
    print(f"Spearman rank correlation, predicted vs measured: {rho:.2f}")
    best = m32_best_layouts()
    print(json.dumps({"cpu_gflops": round(flops_per_s / 1e9, 2), "link_gb_per_s": round(link / 1e9, 3),
                      "layouts": rows, "spearman": round(rho, 3), "m32": best}))


if __name__ == "__main__":
    main()
