"""Generation from a checkpoint: load it as one single-process model, decode with a KV cache.

    model, tokenizer, cfg = load_for_inference("runs/demo/checkpoints", device)
    ids = generate(model, [tokenizer.encode("北京")], 40, Sampling(greedy=True), tokenizer.eod_id)

``generate`` returns the new ids of each prompt (without the prompt, stopped before the eod
id); :func:`stream` yields them one step at a time. docs/generation.md says what is cached and why.
"""

from megamoe.inference.generate import Sampling, generate, stream
from megamoe.inference.load import load_for_inference

__all__ = ["Sampling", "generate", "load_for_inference", "stream"]
