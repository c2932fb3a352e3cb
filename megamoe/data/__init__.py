"""Tokens from .bin/.idx files → samples → per-rank micro-batches (see docs/data.md).

Modules: ``indexed`` (Megatron-compatible reader and builder), ``samples`` (document, sample
and shuffle indices, cached), ``blend`` (weighted sources with train/valid/test splits),
``fim`` (fill-in-the-middle), ``mock`` (random tokens), ``loader`` (deterministic, resumable),
``demo_world`` (the facts the demo corpus states).
Nothing is imported here so that data tools load without torch.
"""
