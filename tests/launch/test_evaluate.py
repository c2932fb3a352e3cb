"""launch/evaluate.py on a checkpoint a real training run wrote: the same scores that run logged
in training for that step, deterministic, plotted by the report; and its one-line errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from launch import report
from launch.evaluate import main
from tests.pretrain import logged, run_pretrain

TASKS = ["eval.downstream_tasks=[demo-en,demo-math]", "eval.downstream_limit=16", "eval.downstream_max_new_tokens=4"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two steps of tiny on mock data, downstream tasks and a checkpoint at step 2."""
    run_dir = tmp_path_factory.mktemp("run")
    result = run_pretrain(run_dir, "train.steps=2", "checkpoint.interval=2", "eval.downstream_interval=2", *TASKS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "downstream step 2 | demo-en acc" in result.stdout + result.stderr
    return run_dir


def evaluate(capsys: pytest.CaptureFixture, *args: str) -> tuple[dict, str]:
    """The JSON of the last output line, and the output before it."""
    main(list(args))
    lines = capsys.readouterr().out.splitlines()
    return json.loads(lines[-1]), "\n".join(lines[:-1])


def test_scores_what_training_logged_for_the_checkpoint(run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    (row,) = logged(run_dir, "downstream.jsonl")
    assert row["step"] == 2 and set(row["tasks"]) == {"demo-en", "demo-math"}
    scores, text = evaluate(capsys, "--checkpoint", str(run_dir / "checkpoints"), "--tasks", "demo-en,demo-math",
                            "--limit", "16", "--max-new-tokens", "4")
    assert scores == row["tasks"] and scores["demo-en"]["acc_norm"] > 0  # (a random model still hits some)
    assert "step_2 (step 2): 2 task(s), 0-shot, seed 1234, sequences of 32 tokens" in text
    assert "demo-en                      16 items  acc " in text and "(chance 0.125)" in text


def test_fewshot_scores_are_deterministic(run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["--checkpoint", str(run_dir / "checkpoints" / "step_2"), "--tasks", "demo-zh", "--limit", "4",
            "--num-fewshot", "2", "--seed", "7", "--batch-size", "5"]
    first, text = evaluate(capsys, *args)
    assert evaluate(capsys, *args)[0] == first and set(first["demo-zh"]) == {"acc", "acc_norm"}
    assert "2-shot, seed 7" in text


def test_report_plots_downstream_scores(run_dir: Path) -> None:
    report.main([str(run_dir)])
    assert (run_dir / "report" / "downstream.png").stat().st_size > 1000
    summary = (run_dir / "report" / "summary.md").read_text()
    assert "## Downstream tasks" in summary and "| demo-math | exact_match |" in summary
    assert "![downstream](downstream.png)" in summary


@pytest.mark.parametrize(("args", "message"), [
    (["--tasks", "demo-fr"], "error: unknown task 'demo-fr': not a built-in task (demo-zh, demo-en, demo-math)"),
    (["--tasks", "BAD"], 'error: BAD:2: no "answer"; an item of this task is {"context": str'),
    (["--tasks", "demo-en", "--limit", "0"], "error: --limit 0: must be >= 1"),
    ([], "error: no task: name --tasks (built-in tasks, task files) and/or --harness-tasks"),
    (["--tasks", "demo-en", "--harness-tasks", "demo-en"],
     "error: task 'demo-en' is named by --tasks and --harness-tasks"),
    (["--harness-tasks", "arc_easy", "--harness-include-path", "BAD"],
     "error: --harness-include-path BAD: not a directory; point it at a directory of task YAML files"),
    (["--harness-tasks", "arc_easy", "--harness-limit", "0"], "error: --harness-limit 0: must be >= 1"),
])
def test_mistakes_are_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str],
                                     message: str) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "q", "choices": [" a", " b"], "answer": 1}\n'
                   '{"context": "q", "choices": [" a", " b"]}\n')
    with pytest.raises(SystemExit) as exit_:
        main(["--checkpoint", str(tmp_path), *[str(bad) if a == "BAD" else a for a in args]])
    err = capsys.readouterr().err.replace(str(bad), "BAD")
    assert exit_.value.code == 2 and err.startswith(message) and err.count("\n") == 1, err


def test_harness_tasks_without_the_harness_installed(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if lm-eval were not installed
    monkeypatch.delitem(sys.modules, "megamoe.evaluation.harness", raising=False)
    with pytest.raises(SystemExit) as exit_:
        main(["--checkpoint", str(tmp_path), "--harness-tasks", "arc_easy,hellaswag"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: --harness-tasks needs lm-evaluation-harness, which cannot be imported (")
    assert err.endswith("pip install -e '.[eval]'\n")


def test_a_missing_checkpoint_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--checkpoint", str(tmp_path / "nowhere"), "--tasks", "demo-en"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith(f"error: {tmp_path / 'nowhere'}: no such checkpoint directory")
