"""Decoding and validating raw records: a chunk's usable documents, its rejects and blanks."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from data_tools.preprocess.readers import Chunk


@dataclass(frozen=True)
class Reject:
    """A document that could not be used, and why (``kind`` is what the summary counts)."""

    path: str
    line: int
    kind: str
    message: str
    raw: str  # the record as text, for the rejects file

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"

    def to_json(self) -> str:
        """One line of the rejects file."""
        return json.dumps({"path": self.path, "line": self.line, "reason": self.message, "raw": self.raw},
                          ensure_ascii=False)


@dataclass
class Parsed:
    """The usable documents of a chunk: one text column per key, aligned by document."""

    columns: list[list[str]]
    lines: list[int]
    rejects: list[Reject] = field(default_factory=list)
    empty: int = 0


_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}


# What a record parser returns: (texts, None) for a usable document, (None, (kind, message)) for a
# bad one, (None, None) for a blank one.
ParseResult = tuple[Optional[Sequence[str]], Optional[tuple[str, str]]]

_DECODER = json.JSONDecoder()


def _is_blank(text: str) -> bool:
    return not text or text.isspace()


def _decode_utf8(raw: bytes) -> tuple[Optional[str], Optional[tuple[str, str]]]:
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        return None, ("invalid UTF-8", f"invalid UTF-8 at byte {exc.start}")


def _parse_json_line(raw: bytes, keys: Sequence[str]) -> ParseResult:
    line, bad = _decode_utf8(raw)
    if line is None:
        return None, bad
    try:  # fast path: raw_decode skips json.loads' extra whitespace scans (about half its cost)
        obj, end = _DECODER.raw_decode(line)
        if end != len(line) and not line[end:].isspace():
            raise ValueError("trailing data")
    except ValueError:  # rare: leading whitespace, a blank line or a real error; json.loads decides
        if _is_blank(line):
            return None, None
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            return None, ("malformed JSON", f"malformed JSON: {exc.msg} at column {exc.colno}")
    if not isinstance(obj, dict):
        return None, ("not a JSON object", f"expected a JSON object, got {_JSON_TYPES.get(type(obj), 'a value')}")
    texts = []
    for key in keys:
        if key not in obj:
            return None, ("missing key", f"missing key {key!r} (keys: {', '.join(map(repr, list(obj)[:8]))})")
        value = obj[key]
        if not isinstance(value, str):
            return None, ("non-string value", f"{key!r} is {_JSON_TYPES.get(type(value), 'a value')}, not a string")
        texts.append(value)
    return texts, None


def _parse_txt_line(raw: bytes, keys: Sequence[str]) -> ParseResult:
    text, bad = _decode_utf8(raw.rstrip(b"\r\n"))
    return (None, bad) if text is None else ([text], None)


def _parse_parquet_row(row: tuple, keys: Sequence[str]) -> ParseResult:
    null = next((key for key, value in zip(keys, row) if value is None), None)
    return (row, None) if null is None else (None, ("non-string value", f"{null!r} is null, not a string"))


def _raw_record(record: Any, keys: Sequence[str]) -> str:
    """A bad record as text for the rejects file: the line itself, or the parquet row as JSON."""
    if isinstance(record, bytes):
        return record.decode("utf-8", errors="replace").rstrip("\r\n")
    return json.dumps(dict(zip(keys, record)), ensure_ascii=False)


_PARSERS = {"json": _parse_json_line, "txt": _parse_txt_line, "parquet": _parse_parquet_row}


def parse_chunk(chunk: Chunk, keys: Sequence[str]) -> Parsed:
    """Decode and validate a chunk; bad records become Rejects, blank documents are counted.

    A document is kept only if every key is non-blank, so the per-key datasets stay aligned."""
    out = Parsed([[] for _ in keys], [])
    parse = _PARSERS[chunk.fmt]
    records = zip(*(a.to_pylist() for a in chunk.records)) if chunk.fmt == "parquet" else chunk.records
    for line, record in enumerate(records, chunk.first_line):
        texts, bad = parse(record, keys)
        if bad is not None:
            out.rejects.append(Reject(chunk.path, line, bad[0], bad[1], _raw_record(record, keys)))
        elif texts is None or any(map(_is_blank, texts)):
            out.empty += 1
        else:
            for column, text in zip(out.columns, texts):
                column.append(text)
            out.lines.append(line)
    return out
