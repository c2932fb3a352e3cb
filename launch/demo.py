"""`make demo`: the whole path on CPU in a few minutes.

demo corpus (zh / en, generated, no download) → Megatron .bin/.idx (byte-level tokens) →
train a tiny Yuan MoE with 4 processes: pipeline (pp=2) × data (dp=2) × expert (ep=2)
parallelism, stopping at step 150 and resuming from its checkpoint to step 300 → show the loss
falling below the corpus' unigram entropy, per language, and the demo-zh / demo-en
multiple-choice scores (scored through the pipeline at steps 150 and 300) → write the run
report (plots and summary) into runs/demo/report/ → print a zh and an en completion of the
trained model (launch/generate.py, greedy).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path("demo_data")
RUN_DIR = Path("runs/demo")
NPROC = 4  # pp=2 × dp=2, ep=2 inside dp (configs/exp/demo.yaml)


def sh(*args: str, **env: str) -> None:
    """Run one stage; a failure stops the demo with the stage's own message."""
    print(f"\n$ {' '.join(args)}", flush=True)
    result = subprocess.run(args, cwd=ROOT, env={**os.environ, **env})
    if result.returncode != 0:
        sys.exit(f"demo: the step above failed with exit code {result.returncode}")


def prepare_data() -> None:
    if not (DATA / "raw" / "stats.json").exists():
        sh(sys.executable, "-m", "data_tools.make_demo_corpus", "--output-dir", str(DATA / "raw"), "--size-mb", "4")
    for lang in ("zh", "en"):
        if not (DATA / "tokens" / f"{lang}_text_document.idx").exists():
            sh(sys.executable, "-m", "data_tools.preprocess_data", "--input", str(DATA / "raw" / f"{lang}.jsonl"),
               "--output-prefix", str(DATA / "tokens" / lang), "--json-keys", "text",
               "--tokenizer-type", "ByteTokenizer", "--append-eod", "--workers", "2")


def train(*overrides: str) -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    sh(str(torchrun), "--standalone", f"--nproc_per_node={NPROC}", "launch/pretrain.py", "+exp=demo",
       f"run.dir={RUN_DIR}", *overrides, OMP_NUM_THREADS="1")


def summarise() -> None:
    steps = [json.loads(line) for line in (ROOT / RUN_DIR / "metrics.jsonl").read_text().splitlines()]
    evals = [json.loads(line) for line in (ROOT / RUN_DIR / "eval.jsonl").read_text().splitlines()]
    stats = json.loads((ROOT / DATA / "raw" / "stats.json").read_text())
    entropy = {lang: stats[lang]["unigram_entropy_bits"] * math.log(2) for lang in ("zh", "en")}
    first, last = steps[0], steps[-1]
    tokens_per_s = sum(s["tokens_per_s"] for s in steps) / len(steps)
    print("\n== megamoe demo: tiny Yuan MoE, pp=2 × dp=2 × ep=2 on 4 CPU processes ==")
    print(f"train loss  step {first['step']:>4}: {first['loss']:.3f}   "
          f"step {last['step']:>4}: {last['loss']:.3f}  (nats/token)")
    for lang, loss in evals[-1]["loss"].items():
        print(f"validation loss [{lang}]: {loss:.3f} nats/token  (unigram entropy {entropy[lang]:.3f})")
    print(f"mean throughput: {tokens_per_s:,.0f} tokens/s;  metrics: {RUN_DIR}/metrics.jsonl")
    downstream = [json.loads(line) for line in (ROOT / RUN_DIR / "downstream.jsonl").read_text().splitlines()]
    for task, metrics in downstream[-1]["tasks"].items():
        scores = ", ".join(f"{metric} {value:.2f}" for metric, value in metrics.items())
        print(f"{task} at step {downstream[-1]['step']}: {scores}  (chance 0.125)")
    if not last["loss"] < first["loss"] - 1.0:
        sys.exit("demo: the loss did not fall by at least 1 nat — something is wrong")


def main() -> None:
    prepare_data()
    shutil.rmtree(ROOT / RUN_DIR, ignore_errors=True)  # every demo starts fresh
    train("train.steps=150")  # stops at 150 (checkpoint saved) ...
    train()  # ... and a new launch resumes from runs/demo/checkpoints/latest to 300
    summarise()
    sh(sys.executable, "launch/report.py", str(RUN_DIR))
    sh(sys.executable, "launch/generate.py", "--checkpoint", str(RUN_DIR / "checkpoints"), "--greedy",
       "--max-new-tokens", "40", "--prompt", "北京", "--prompt", "The ", OMP_NUM_THREADS="1")


if __name__ == "__main__":
    main()
