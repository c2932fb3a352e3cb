"""launch/generate.py as a user runs it: a checkpoint in, completions out (streamed for one
prompt), the same text as the generation API, and every mistake one ``error:`` line."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megamoe.checkpoint import write_model_checkpoint
from megamoe.config import compose
from megamoe.data.tokenizer import ByteTokenizer
from megamoe.inference import Sampling, generate, load_for_inference
from tests.inference.helpers import lively_model
from tests.models.helpers import model_tensors

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "launch" / "generate.py"
spec = importlib.util.spec_from_file_location("generate_script", SCRIPT)
script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(script)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoints directory whose latest is a lively tiny Yuan model (ByteTokenizer, 128 positions)."""
    root = tmp_path_factory.mktemp("run") / "checkpoints"
    write_model_checkpoint(root / "step_7", model_tensors(lively_model(["+exp=tiny"])), compose(["+exp=tiny"]))
    return root


def expected_text(checkpoint: Path, prompt: str, max_new_tokens: int) -> str:
    model, tokenizer, _ = load_for_inference(checkpoint, "cpu")
    ids = generate(model, [tokenizer.encode(prompt)], max_new_tokens, Sampling(greedy=True), tokenizer.eod_id,
                   vocab_size=tokenizer.vocab_size)[0]
    return prompt + tokenizer.decode(ids)


def test_one_prompt_end_to_end(checkpoints: Path) -> None:
    result = subprocess.run([sys.executable, str(SCRIPT), "--checkpoint", str(checkpoints), "--prompt", "The ",
                             "--greedy", "--max-new-tokens", "24"],
                            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected_text(checkpoints, "The ", 24) + "\n"
    assert "tokens/s" in result.stderr


def test_a_batch_from_flags_and_a_file(checkpoints: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("北京\n\nhello\n", encoding="utf-8")
    script.main(["--checkpoint", str(checkpoints / "step_7"), "--prompt", "The ", "--prompts-file", str(prompts_file),
                 "--greedy", "--max-new-tokens", "12", "--device", "cpu"])
    out = capsys.readouterr().out
    blocks = [expected_text(checkpoints, prompt, 12) for prompt in ("The ", "北京", "hello")]
    assert out == "".join(f"=== {n}/3 ===\n{block}\n" for n, block in enumerate(blocks, start=1))


def test_the_stream_holds_back_a_character_until_its_bytes_are_in(capsys: pytest.CaptureFixture) -> None:
    text = script.TextStream(ByteTokenizer())
    shown = []
    for byte in "北a".encode():
        text.add(byte)
        shown.append(capsys.readouterr().out)
    assert shown == ["", "", "北", "a"]
    text.add("京".encode()[0])  # cut by --max-new-tokens: marked, not dropped
    assert text.close() == "北a\ufffd" and capsys.readouterr().out == "\ufffd\n"


@pytest.mark.parametrize("prompts", [["x"], ["x", "y"]])
def test_a_completion_of_invalid_utf8_is_printed_marked(checkpoints: Path, prompts: list[str],
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture) -> None:
    """The model's new bytes are not UTF-8 (injected: 0xff can start no character): each shows as
    U+FFFD after what does decode, and the summary line says how many did not."""
    completion = [*b"ok ", 0xFF, 0xFE, *"北".encode()[:2]]  # ends in an invalid byte pair and a cut character
    monkeypatch.setattr(script, "stream", lambda *args, **kwargs: ((token,) for token in completion))
    monkeypatch.setattr(script, "generate", lambda *args, **kwargs: [completion] * len(prompts))
    script.main(["--checkpoint", str(checkpoints), *(a for p in prompts for a in ("--prompt", p)),
                 "--max-new-tokens", "7", "--device", "cpu"])
    out, err = capsys.readouterr()
    completions = [line for line in out.splitlines() if not line.startswith("===")]
    assert completions == [f"{p}ok \ufffd\ufffd\ufffd" for p in prompts]
    assert err.startswith(f"{7 * len(prompts)} new tokens in ")
    assert err.rstrip().endswith(f"; {3 * len(prompts)} undecodable character(s) (invalid or cut-short UTF-8) "
                                 "shown as \ufffd")


@pytest.mark.parametrize(("args", "message"), [
    (["--checkpoint", "{tmp}/nowhere", "--prompt", "x"], "nowhere: no such checkpoint directory"),
    (["--checkpoint", "{tmp}", "--prompt", "x"], "holds no complete checkpoint"),
    (["--checkpoint", "{ckpt}"], "no prompt: pass --prompt"),
    (["--checkpoint", "{ckpt}", "--prompts-file", "{tmp}/missing.txt"], "missing.txt: no such file"),
    (["--checkpoint", "{ckpt}", "--prompts-file", "{tmp}/latin1.txt"], "latin1.txt: cannot read it as UTF-8"),
    (["--checkpoint", "{ckpt}", "--prompts-file", "{tmp}/blank.txt"], "blank.txt: holds no prompt"),
    (["--checkpoint", "{ckpt}", "--prompt", "x" * 100, "--max-new-tokens", "40"],
     "prompt 1 is 100 tokens; with --max-new-tokens 40 that passes the model's 128 positions"),
    (["--checkpoint", "{ckpt}", "--prompt", "", "--prompt", "x"], "prompt 1 is empty"),
    (["--checkpoint", "{ckpt}", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens 0: must be at least 1"),
    (["--checkpoint", "{ckpt}", "--prompt", "x", "--top-p", "2"], "--top-p 2.0: must be in (0, 1]"),
    (["--checkpoint", "{ckpt}", "--prompt", "x", "--device", "tpu:x"], "--device tpu:x: not a device"),
])
def test_mistakes_are_one_error_line(checkpoints: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                     args: list[str], message: str) -> None:
    (tmp_path / "latin1.txt").write_bytes("café\n".encode("latin-1"))
    (tmp_path / "blank.txt").write_text("\n  \n")
    argv = [arg.format(tmp=tmp_path, ckpt=checkpoints) for arg in args]
    with pytest.raises(SystemExit) as exit_info:
        script.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err
