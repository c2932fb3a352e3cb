"""Peak memory of the loss path, chunked against plain, forward + backward, in the same process.

Default sizes are Yuan 2.0-M32's output head: hidden 2048, vocabulary 135,040, one micro-batch
of 4096 tokens, fp32 on CPU (the plain path's logits alone are 2.2 GB). Both cases start from
the same final-normed hidden states and head weight (leaves, allocated before measuring) and
run the loss and its backward into the hidden states' and the weight's gradients:

- plain: ``lm_loss(F.linear(hidden, weight), ...)``, full-vocabulary fp32 logits;
- chunked: ``chunked_lm_loss(hidden, weight, ...)``, what training runs.

Peak = the most bytes the CPU allocator had handed out at once during a case (both count the
weight's gradient, V·H·4 bytes). The losses and gradients are checked to agree first. Prints one
line per case and, as the last line, one JSON object (``chunked_vs_plain``, target ≤ 0.25).

    python benchmarks/loss_memory.py            # M32's head: allocates ~10 GB
    python benchmarks/loss_memory.py --small    # hidden 256, vocab 8192, 1024 tokens (one chunk): a smoke run
"""

from __future__ import annotations

import argparse
import json
from typing import Callable

import torch
import torch.nn.functional as F

from megamoe.cli import exit_on_user_error
from megamoe.errors import UserError
from megamoe.nn.loss import IGNORE_INDEX, chunk_tokens, chunked_lm_loss, lm_loss
from megamoe.train.peak_memory import cpu_peak_bytes

GIB = 2**30
TARGET = 0.25
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
CASES: dict[str, LossFn] = {
    "plain": lambda hidden, weight, labels, mask: lm_loss(F.linear(hidden, weight), labels, mask),
    "chunked": chunked_lm_loss,
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=135040)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--small", action="store_true", help="hidden 256, vocab 8192, seq 1024 (one chunk): a smoke run")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch CPU threads; set it to the cores that are free")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.small:
        args.hidden, args.vocab, args.seq_len = 256, 8192, 1024
    if min(args.hidden, args.vocab, args.seq_len, args.micro_batch) < 1:
        raise UserError("--hidden, --vocab, --seq-len and --micro-batch must be >= 1")
    return args


def run_case(loss_fn: LossFn, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
             mask: torch.Tensor) -> tuple[int, list[torch.Tensor]]:
    """Peak bytes of one forward + backward, and (loss, grad of hidden, grad of weight)."""
    hidden.grad = weight.grad = None
    with cpu_peak_bytes() as peak:
        loss = loss_fn(hidden, weight, labels, mask)
        loss.backward()
    return peak.bytes, [loss.detach(), hidden.grad, weight.grad]


@exit_on_user_error
def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(args.seed)
    b, s, h, v = args.micro_batch, args.seq_len, args.hidden, args.vocab
    hidden = torch.randn(b, s, h, generator=g).requires_grad_()
    weight = (0.02 * torch.randn(v, h, generator=g)).requires_grad_()
    labels = torch.randint(0, v, (b, s), generator=g)
    labels[:, -1] = IGNORE_INDEX  # the last position has no next token
    mask = torch.ones(b, s)

    results = {name: run_case(fn, hidden, weight, labels, mask) for name, fn in CASES.items()}
    expected = results["plain"][1]
    if any((a - e).abs().max() > 1e-5 * e.abs().max() for a, e in zip(results["chunked"][1], expected)):
        raise SystemExit("the chunked loss disagrees with the plain one; not reporting its memory")

    tokens = b * s
    print(f"loss fwd+bwd: {tokens} tokens, hidden {h}, vocab {v}, fp32 on CPU ({args.threads} threads); "
          f"chunks of {min(chunk_tokens(v), tokens)} tokens; the weight's gradient is {4 * v * h / GIB:.2f} GiB")
    for name, (peak, _) in results.items():
        print(f"{name:<8} peak {peak / GIB:8.2f} GiB")
    ratio = results["chunked"][0] / results["plain"][0]
    print(f"chunked ÷ plain = {ratio:.3f} (target ≤ {TARGET})")
    print(json.dumps({
        "chunked_vs_plain": round(ratio, 3),
        **{f"{name}_peak_gib": round(peak / GIB, 3) for name, (peak, _) in results.items()},
        "tokens": tokens, "hidden": h, "vocab": v, "chunk_tokens": min(chunk_tokens(v), tokens),
        "threads": args.threads, "target": TARGET,
    }))


if __name__ == "__main__":
    main()
