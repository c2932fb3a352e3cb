"""make_demo_corpus.py: deterministic bytes, honest entropy figures, and facts that stay fixed."""

from __future__ import annotations

import json
import math
import re
from collections import Counter, defaultdict
from pathlib import Path

from data_tools.make_demo_corpus import SHARES, main, make_corpus
from tests.data_tools.helpers import jsonl_texts

FILES = [f"{name}.jsonl" for name in SHARES]


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        make_corpus(str(tmp_path / name), size_mb=0.03, seed=seed)
    for f in FILES + ["stats.json"]:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    assert all((tmp_path / "a" / f).read_bytes() != (tmp_path / "c" / f).read_bytes() for f in FILES)


def test_stats_match_the_files(corpus_dir: Path) -> None:
    """Unigram entropy over ByteTokenizer tokens (bytes + one <eod> per document), from the definition."""
    stats = json.loads((corpus_dir / "stats.json").read_text())
    total: Counter = Counter()
    for name, share in SHARES.items():
        texts = jsonl_texts(corpus_dir / f"{name}.jsonl")
        counts = Counter(b for t in texts for b in t.encode("utf-8"))
        counts["eod"] = len(texts)
        total += counts
        n = sum(counts.values())
        entropy = -sum(c / n * math.log2(c / n) for c in counts.values())
        assert stats[name]["documents"] == len(texts)
        assert stats[name]["bytes"] == n - len(texts) >= share * 0.06e6
        assert math.isclose(stats[name]["unigram_entropy_bits"], entropy, rel_tol=1e-9)
    n = sum(total.values())
    assert math.isclose(stats["all"]["unigram_entropy_bits"], -sum(c / n * math.log2(c / n) for c in total.values()))


def test_facts_about_a_person_never_change(corpus_dir: Path) -> None:
    """The structure a model can learn: each name always has the same city and job, in both languages."""
    patterns = {"en": r"(\w+) lives in (\w+)\. \1 works as a (\w+)\.", "zh": r"^(\w{2})住在(\w{2})。\1是一名(\w{2})。"}
    for name, pattern in patterns.items():
        facts = defaultdict(set)
        for text in jsonl_texts(corpus_dir / f"{name}.jsonl"):
            person, city, job = re.match(pattern, text).groups()
            facts[person].add((city, job))
        assert len(facts) > 8 and all(len(v) == 1 for v in facts.values())


def test_main_reports_entropy(tmp_path: Path, capsys) -> None:
    main(["--output-dir", str(tmp_path), "--size-mb", "0.01", "--seed", "3"])
    out = capsys.readouterr().out
    assert "unigram entropy" in out and "bits/token" in out and "nats" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FILES + ["stats.json"])
