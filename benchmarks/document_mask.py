"""Training-step time with attention inside documents (``data.reset_attention_mask``) ÷ plain causal.

The demo config (the tiny Yuan MoE with LFA, on the byte-level zh + en demo corpus: real
documents of varied length; built and preprocessed first if missing) in one process: two
trainers read the same samples, one keeping attention and LFA inside each document, one plain
causal, and timing rounds alternate between them so machine noise hits both alike. On the CPU
the document mask is SDPA's boolean [b, 1, s, s] mask, built once per micro-batch forward; plain
causal is SDPA's ``is_causal`` path. Prints ms/step of each, the ratio masked ÷ causal, and the
documents per row and their mean length in the samples the run read; the last line is one JSON
object.

    python -m benchmarks.document_mask --threads 2
    python -m benchmarks.document_mask --steps 1 --rounds 1 --seq-len 64 --batch 4   # smoke run
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from benchmarks.train_step import median_step_times
from launch.demo import prepare_data
from megamoe.config import compose
from megamoe.data.loader import document_ids
from megamoe.train.trainer import Trainer

MODES = {"causal": "false", "documents": "true"}  # mode → data.reset_attention_mask


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=None, help="train.seq_len (default: the demo's, 128)")
    p.add_argument("--batch", type=int, default=None, help="global batch, in micro-batches of up to 4 (default: 16)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    return p.parse_args()


def overrides(args: argparse.Namespace) -> list[str]:
    """The demo config in one process, with the benchmark's shape; long enough for every step read."""
    steps = (args.rounds + 1) * args.steps + 1
    shape = [f"train.seq_len={args.seq_len}"] if args.seq_len else []
    if args.batch:
        shape += [f"train.global_batch={args.batch}", f"train.micro_batch={min(args.batch, 4)}"]
    return ["+exp=demo", "parallel.pp=1", "parallel.ep=1", f"train.steps={steps}", f"train.decay_steps={steps}",
            "train.warmup_steps=1", *shape]


def documents_read(trainer: Trainer) -> tuple[float, float]:
    """(documents per row, mean tokens per document) over the samples ``trainer`` has read."""
    rows = np.stack([trainer.loader.dataset[i][:-1] for i in range(trainer.loader.consumed_samples)])
    per_row = float((document_ids(rows, trainer.eod_id)[:, -1] + 1).mean())
    return per_row, rows.shape[1] / per_row


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    prepare_data()
    cfgs = {mode: compose([*overrides(args), f"data.reset_attention_mask={flag}"]) for mode, flag in MODES.items()}
    median, trainers = median_step_times(cfgs, args)
    per_row, doc_tokens = documents_read(trainers["documents"])
    cfg = cfgs["documents"]
    for mode, seconds in median.items():
        print(f"{mode:>9}: {seconds * 1e3:8.1f} ms/step")
    ratio = median["documents"] / median["causal"]
    print(f"attention inside documents ÷ plain causal step time: {ratio:.3f}  ({per_row:.1f} documents per "
          f"{cfg.train.seq_len}-token row, {doc_tokens:.0f} tokens each on average; {args.threads} threads)")
    print(json.dumps({"documents_vs_causal_step_time": round(ratio, 4), "causal_ms": median["causal"] * 1e3,
                      "documents_ms": median["documents"] * 1e3, "documents_per_row": round(per_row, 2),
                      "tokens_per_document": round(doc_tokens, 1), "seq_len": cfg.train.seq_len,
                      "global_batch": cfg.train.global_batch, "threads": args.threads}))


if __name__ == "__main__":
    main()
