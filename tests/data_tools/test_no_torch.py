"""The data tools run on CPU-only data machines without torch: none of them imports it.

Each tool runs as a user runs it, in a fresh interpreter, under a guard that records the
stack of the first ``import torch`` (and lets it proceed), so a failure names the culprit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.data_tools.helpers import tokenizer_argv

REPO = Path(__file__).resolve().parents[2]

# Runs a script as __main__ with the given argv, then prints where torch was first imported (or nothing).
GUARD = """
import runpy, sys, traceback

class TorchImport:
    stack = None

    def find_spec(self, name, path=None, target=None):
        if name == "torch" and TorchImport.stack is None:
            TorchImport.stack = "".join(traceback.format_stack())
        return None

sys.meta_path.insert(0, TorchImport())
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as exc:
    assert exc.code in (None, 0), exc.code
print("\\nTORCH-IMPORTED-AT:" + (TorchImport.stack or ""), file=sys.stderr)
"""


def torch_import_stack(script: str, *args: str) -> str:
    """Run ``script`` with ``args``; the stack of its first torch import, or "" if it imported none."""
    proc = subprocess.run([sys.executable, "-c", GUARD, script, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    return proc.stderr.rsplit("TORCH-IMPORTED-AT:", 1)[1].strip()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory, hf_model: str) -> str:
    """A small dataset made by the tool itself (also checked for torch)."""
    tmp = tmp_path_factory.mktemp("no_torch")
    (tmp / "in.jsonl").write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(20)))
    stack = torch_import_stack("data_tools/preprocess_data.py", "--input", str(tmp / "in.jsonl"),
                               "--output-prefix", str(tmp / "d"), "--append-eod",
                               *tokenizer_argv("HuggingFaceTokenizer", hf_model))
    assert stack == "", f"preprocess_data.py imported torch:\n{stack}"
    return str(tmp / "d_text_document")


def test_preprocess_data_help_does_not_import_torch() -> None:
    stack = torch_import_stack("data_tools/preprocess_data.py", "--help")
    assert stack == "", f"preprocess_data.py --help imported torch:\n{stack}"


def test_preprocessing_and_inspecting_do_not_import_torch(dataset: str, hf_model: str) -> None:
    stack = torch_import_stack("data_tools/inspect_data.py", dataset, *tokenizer_argv("HuggingFaceTokenizer", hf_model))
    assert stack == "", f"inspect_data.py imported torch:\n{stack}"


def test_the_guard_sees_a_torch_import() -> None:
    """The check itself can fail: a tool that does import torch is caught, with the importing line."""
    stack = torch_import_stack("launch/plan.py", "--help")
    assert "import" in stack and "torch" in stack
