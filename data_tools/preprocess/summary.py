"""What a preprocessing run did: counts, rates, the end-of-run report and the interrupted line."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

from data_tools.preprocess.encoder import Encoded
from data_tools.preprocess.readers import Piece
from megamoe.data.indexed import IndexedDatasetBuilder


@dataclass
class Summary:
    """What a run did; printed at the end and returned to callers (benchmarks, tests)."""

    outputs: list[str]
    rejects_path: str  # where skipped bad documents went (--skip-bad-docs)
    inputs: list[Piece] = field(default_factory=list)
    input_size: int = 0  # bytes of all inputs on disk
    documents: int = 0
    tokens: int = 0
    empty: int = 0
    rejected: Counter = field(default_factory=Counter)
    found: Counter = field(default_factory=Counter)  # documents written or rejected, by input file
    input_bytes: int = 0  # bytes of the inputs done so far
    bytes_written: int = 0
    elapsed: float = 0.0

    def add(self, enc: Encoded) -> None:
        self.documents += enc.documents
        self.tokens += sum(len(t) for t in enc.tokens)
        self.empty += enc.empty
        self.rejected.update(r.kind for r in enc.rejects)
        self.found[enc.path] += enc.documents + len(enc.rejects)
        self.input_bytes += enc.input_bytes

    def empty_inputs(self) -> list[str]:
        """Input files (or ranges) with no documents (nothing, or only blank lines and empty texts)."""
        return [str(piece) for piece in self.inputs if not self.found[str(piece.path)]]

    def rates(self) -> str:
        el = max(self.elapsed, 1e-9)
        return f"{self.documents / el:,.0f} docs/s, {self.tokens / el:,.0f} tokens/s"

    def output_files(self) -> str:
        return ", ".join(p + ".bin/.idx" for p in self.outputs)

    def report(self) -> str:
        rejected = sum(self.rejected.values())
        reasons = "".join(f"\n    {kind}: {n:,}" for kind, n in sorted(self.rejected.items()))
        if rejected:
            reasons += f"\n    (written to {self.rejects_path})"
        return "\n".join([
            f"preprocessed {len(self.inputs)} file(s) → {self.output_files()}",
            f"  documents  {self.documents:,} written, {self.empty:,} empty skipped, {rejected:,} rejected{reasons}",
            f"  tokens     {self.tokens:,}",
            f"  written    {self.bytes_written / 1e6:,.2f} MB",
            f"  elapsed    {self.elapsed:,.1f} s ({self.rates()}, "
            f"{self.input_bytes / max(self.elapsed, 1e-9) / 1e6:,.1f} MB/s of input)",
        ])

    def expected_bytes(self, itemsize: int) -> Optional[int]:
        """The size of all outputs, extrapolated from the share of the inputs done (None before any)."""
        if not self.input_bytes:
            return None
        scale = self.input_size / self.input_bytes
        index = IndexedDatasetBuilder.index_bytes(round(self.documents * scale))
        return round(self.tokens * scale) * itemsize + len(self.outputs) * index

    def unfinished(self) -> str:
        """The line for an interrupted run: what it did not write, and how far it had got."""
        total = round(self.documents * self.input_size / max(self.input_bytes, 1))
        done = f"{self.documents:,} of ~{total:,} documents done" if self.documents else "no documents done yet"
        return f"interrupted: {self.output_files()} not written ({done}); nothing was left behind"
