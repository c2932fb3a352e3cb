"""Checkpoint save / load throughput against a raw sequential write / read of the same bytes.

A single-process trainer of a few GB (weights + AdamW state) is saved with
``save_checkpoint`` (safetensors shards, CRC-32, fsync, atomic rename, manifest) and loaded
back with ``load_checkpoint`` (verify every byte, copy into the model, rebuild the optimizer).
The baseline, in the same run and directory, writes the same number of bytes to one file in
64 MiB chunks and fsyncs it, then reads it back into a preallocated buffer: what the disk
gives a program that does nothing but I/O. Both sides drop their files from the page cache
(``posix_fadvise(DONTNEED)``) before reading, so reads come from the disk, not from memory.
An untimed save comes first; then each round times both sides, alternating which goes first,
and each figure is the best of ``--repeats``. Target (issue 6): ≥ 0.5 of raw both ways.

    python benchmarks/checkpoint.py                 # ~1 GiB of fp32 weights, ~3 GiB checkpoint
    python benchmarks/checkpoint.py --dir /scratch  # the disk to measure
    python benchmarks/checkpoint.py --quick         # smoke run (tiny model)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from megamoe.checkpoint.saver import save_checkpoint
from megamoe.checkpoint.state import load_checkpoint
from megamoe.checkpoint.store import read_manifest
from megamoe.cli import exit_on_user_error
from megamoe.config import compose
from megamoe.errors import UserError
from megamoe.parallel.mesh import init_grid, shutdown
from megamoe.train.trainer import Trainer, build_trainer

CHUNK = 64 << 20


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", type=Path, default=Path("runs/bench_checkpoint"), help="where to write (removed after)")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--ffn", type=int, default=1024, help="expert ffn hidden size")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny model, one repeat (smoke run)")
    args = p.parse_args()
    if args.quick:
        args.hidden, args.layers, args.experts, args.ffn, args.vocab, args.repeats = 64, 2, 4, 128, 512, 1
    return args


def build(args: argparse.Namespace) -> Trainer:
    """A one-process trainer whose AdamW state exists (one step on zero gradients creates it)."""
    cfg = compose([
        "+exp=tiny", f"model.hidden_size={args.hidden}", f"model.num_layers={args.layers}", "model.num_heads=8",
        f"model.head_dim={args.hidden // 8}", f"model.vocab_size={args.vocab}", f"moe.num_experts={args.experts}",
        f"moe.ffn_hidden_size={args.ffn}", f"run.dir={args.dir / 'run'}", "checkpoint.keep=1000",
    ])
    trainer = build_trainer(cfg, init_grid(1, 1, timeout_s=600))
    for param in trainer.parameters():
        param.grad = torch.zeros_like(param)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return trainer


def drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def raw_write(path: Path, nbytes: int) -> float:
    """Seconds to write ``nbytes`` sequentially in 64 MiB chunks and fsync."""
    chunk = memoryview(torch.randint(0, 256, (CHUNK,), dtype=torch.uint8).numpy())
    start = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        for offset in range(0, nbytes, CHUNK):
            f.write(chunk[:min(CHUNK, nbytes - offset)])
        os.fsync(f.fileno())
    return time.perf_counter() - start


def raw_read(path: Path) -> float:
    """Seconds to read a whole file sequentially into a preallocated buffer."""
    view = memoryview(torch.empty(path.stat().st_size, dtype=torch.uint8).numpy())
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        done = 0
        while done < len(view):
            done += f.readinto(view[done:done + CHUNK])
    return time.perf_counter() - start


def checkpoint_files(ckpt: Path) -> list[Path]:
    return [ckpt / name for name in read_manifest(ckpt).files]


@exit_on_user_error
def main() -> None:
    args = parse_args()
    if args.repeats < 1:
        raise UserError(f"--repeats {args.repeats}: must be at least 1")
    if args.dir.exists():
        raise UserError(f"--dir {args.dir} exists; give a new directory (it is deleted afterwards)")
    trainer = build(args)
    raw_file = args.dir / "raw.bin"
    seconds: dict[str, list[float]] = {"save": [], "raw_write": [], "load": [], "raw_read": []}

    def timed(key: str, fn: Callable[[], object]) -> None:
        start = time.perf_counter()
        fn()
        seconds[key].append(time.perf_counter() - start)

    try:
        ckpt = save_checkpoint(trainer.state)  # untimed warm-up: learns the size, touches every page once
        files = checkpoint_files(ckpt)
        nbytes = sum(f.stat().st_size for f in files)
        shutil.rmtree(ckpt)
        for repeat in tqdm(range(args.repeats), desc="save / load / raw", unit="round"):
            writes = [("save", lambda: save_checkpoint(trainer.state)),
                      ("raw_write", lambda: raw_write(raw_file, nbytes))]
            reads = [("load", lambda: load_checkpoint(trainer.state, ckpt)), ("raw_read", lambda: raw_read(raw_file))]
            order = slice(None, None, 1 if repeat % 2 == 0 else -1)  # alternate who goes first
            for key, fn in writes[order]:
                timed(key, fn)
            for path in (*checkpoint_files(ckpt), raw_file):
                drop_from_page_cache(path)
            for key, fn in reads[order]:
                timed(key, fn)
            shutil.rmtree(ckpt)
            raw_file.unlink()
    finally:
        shutdown()
        shutil.rmtree(args.dir, ignore_errors=True)
    gb = nbytes / 1e9
    rates = {key: gb / min(values) for key, values in seconds.items()}
    params = sum(p.numel() for p in trainer.parameters())
    print(f"checkpoint: {gb:.2f} GB ({params / 1e6:.0f}M fp32 parameters + AdamW state), {len(files)} files, "
          f"best of {args.repeats}")
    print(f"save {rates['save']:.2f} GB/s vs raw write {rates['raw_write']:.2f} GB/s → "
          f"{rates['save'] / rates['raw_write']:.2f}×")
    print(f"load {rates['load']:.2f} GB/s vs raw read  {rates['raw_read']:.2f} GB/s → "
          f"{rates['load'] / rates['raw_read']:.2f}×")
    print(json.dumps({
        "checkpoint_gb": round(gb, 3),
        "save_gbps": round(rates["save"], 3), "raw_write_gbps": round(rates["raw_write"], 3),
        "load_gbps": round(rates["load"], 3), "raw_read_gbps": round(rates["raw_read"], 3),
        "save_vs_raw_write": round(rates["save"] / rates["raw_write"], 3),
        "load_vs_raw_read": round(rates["load"] / rates["raw_read"], 3),
    }))


if __name__ == "__main__":
    main()
