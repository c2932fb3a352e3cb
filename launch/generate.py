"""Generate text from a megamoe checkpoint (any training layout) on the CPU or one GPU.

  python launch/generate.py --checkpoint runs/demo/checkpoints --prompt "北京" --greedy
  python launch/generate.py --checkpoint runs/x/checkpoints/step_1000 --prompts-file prompts.txt \\
      --max-new-tokens 128 --temperature 0.8 --top-p 0.95 --seed 1

--checkpoint takes a step_N/ directory or a checkpoints directory (its latest); the tokenizer is
the one the run trained with (its data.tokenizer). --prompt may be repeated; --prompts-file
holds one prompt per line. One prompt is printed token by token as it is generated; a batch of
prompts is decoded together (left-padded) and each completion printed when all are done. A
completion stops at the tokenizer's end-of-document token or after --max-new-tokens. Decoding
uses a KV cache (docs/generation.md). Mistakes end with one ``error:`` line, exit 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from megamoe.cli import exit_on_user_error
from megamoe.data.tokenizer import Tokenizer
from megamoe.errors import UserError
from megamoe.inference import Sampling, generate, load_for_inference, stream
from megamoe.inference.load import default_device

UNDECODABLE = "\ufffd"  # what decoding makes of bytes that are not valid UTF-8 (or not yet: a character cut short)


class TextStream:
    """Prints a completion as its tokens arrive. Bytes that do not decode are held back while a
    character's later bytes may still come; at the end whatever is left undecodable is printed as
    U+FFFD, so every new token shows up in the output."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer, self.ids, self.shown = tokenizer, [], 0

    def add(self, token: int) -> None:
        self.ids.append(token)
        self.show(self.tokenizer.decode(self.ids).rstrip(UNDECODABLE))

    def close(self) -> str:
        """End the line; the whole completion's text."""
        text = self.tokenizer.decode(self.ids)
        self.show(text + "\n")
        return text

    def show(self, text: str) -> None:
        print(text[self.shown:], end="", flush=True)
        self.shown = len(text)


def undecodable_note(texts: list[str]) -> str:
    """For the summary line: how many characters of the completions did not decode, if any."""
    count = sum(text.count(UNDECODABLE) for text in texts)
    return f"; {count} undecodable character(s) (invalid or cut-short UTF-8) shown as {UNDECODABLE}" if count else ""


def read_prompts(args: argparse.Namespace) -> list[str]:
    """--prompt values, then the lines of --prompts-file (blank lines skipped)."""
    prompts = list(args.prompt or [])
    if args.prompts_file is not None:
        try:
            lines = args.prompts_file.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise UserError(f"{args.prompts_file}: no such file; --prompts-file takes a text file with one "
                            "prompt per line") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"{args.prompts_file}: cannot read it as UTF-8 text ({exc}); --prompts-file takes a "
                            "text file with one prompt per line") from None
        file_prompts = [line for line in lines if line.strip()]
        if not file_prompts:
            raise UserError(f"{args.prompts_file}: holds no prompt; write one prompt per line")
        prompts += file_prompts
    if not prompts:
        raise UserError("no prompt: pass --prompt TEXT (repeatable) or --prompts-file FILE")
    return prompts


def encode(prompts: list[str], tokenizer: Tokenizer, max_new_tokens: int, max_positions: int) -> list[list[int]]:
    """Token ids of each prompt, checked to leave room for --max-new-tokens in the model's positions."""
    ids = tokenizer.encode_batch(prompts)
    for number, prompt_ids in enumerate(ids, start=1):
        if not prompt_ids:
            raise UserError(f"prompt {number} is empty; give it some text")
        if len(prompt_ids) + max_new_tokens > max_positions:
            raise UserError(f"prompt {number} is {len(prompt_ids)} tokens; with --max-new-tokens {max_new_tokens} "
                            f"that passes the model's {max_positions} positions (model.max_position_embeddings): "
                            "shorten the prompt or lower --max-new-tokens")
    return ids


def device_of(name: str | None) -> torch.device:
    if name is None:
        return default_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: this machine has no CUDA GPU torch can use; use --device cpu")
    return device


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="generate.py", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="step_N/ or a checkpoints directory (its latest)")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    p.add_argument("--prompts-file", type=Path, help="a UTF-8 text file, one prompt per line")
    p.add_argument("--max-new-tokens", type=int, default=64, help="most tokens to add to each prompt (default 64)")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (0 = greedy; default 1)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (default 0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample in the nucleus of probability p (default 1: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling generator (default 0)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: a GPU if there is one)")
    return p


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    sampling = Sampling(args.greedy, args.temperature, args.top_k, args.top_p, args.seed)
    prompts = read_prompts(args)
    device = device_of(args.device)
    model, tokenizer, cfg = load_for_inference(args.checkpoint, device)
    ids = encode(prompts, tokenizer, args.max_new_tokens, cfg.model.max_position_embeddings)
    decoding = (model, ids, args.max_new_tokens, sampling, tokenizer.eod_id)
    start, new_tokens, texts = time.perf_counter(), 0, []
    if len(prompts) == 1:
        print(prompts[0], end="", flush=True)
        text = TextStream(tokenizer)
        for (token,) in stream(*decoding, vocab_size=tokenizer.vocab_size):
            if token is not None:
                text.add(token)
        texts.append(text.close())
        new_tokens = len(text.ids)
    else:
        completions = generate(*decoding, vocab_size=tokenizer.vocab_size)
        for number, (prompt, completion) in enumerate(zip(prompts, completions), start=1):
            texts.append(tokenizer.decode(completion))
            print(f"=== {number}/{len(prompts)} ===\n{prompt}{texts[-1]}", flush=True)
            new_tokens += len(completion)
    seconds = time.perf_counter() - start
    print(f"{new_tokens} new tokens in {seconds:.1f} s ({new_tokens / max(seconds, 1e-9):.1f} tokens/s) on {device}"
          f"{undecodable_note(texts)}", file=sys.stderr)


if __name__ == "__main__":
    main()
