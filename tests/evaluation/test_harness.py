"""lm-evaluation-harness on a megamoe checkpoint: local harness tasks of each kind (multiple
choice, generation with a regex filter and with a whitespace filter, rolling perplexity), no
network, score exactly what launch/evaluate.py scores on the same items as task files; the
model class on its own (greedy flags, rolling windows, budgets, sampling refused); one-line errors."""

from __future__ import annotations

import contextlib
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import torch
import torch.nn.functional as F

from launch.evaluate import main
from megamoe.checkpoint import write_model_checkpoint
from megamoe.config import compose
from megamoe.errors import TaskError
from megamoe.evaluation.model import ModelBackend
from megamoe.evaluation.scoring import completion, prompt_ids
from megamoe.evaluation.tasks import last_number
from megamoe.inference import load_for_inference
from tests.inference.helpers import lively_model
from tests.models.helpers import model_tensors

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is the eval extra: pip install -e '.[eval]'")
from lm_eval.api.instance import Instance  # noqa: E402 (after the skip)
from lm_eval.tasks import TaskManager  # noqa: E402

from megamoe.evaluation import harness  # noqa: E402
from megamoe.evaluation.harness import MegamoeLM  # noqa: E402

WINDOW = 64  # +exp=tiny's train.seq_len
BUDGET = 16
NUMBER = r"(-?[0-9][0-9,]*(?:\.[0-9]+)?)"  # what megamoe's "number" match reads, as a harness regex

MC_ITEMS = [
    {"context": "Alice lives in", "choices": [" Paris", " Cairo", " Lima"], "answer": 0},
    {"context": "7 times 8 is", "choices": [" 56", " 54"], "answer": 0},
    {"context": "小明住在", "choices": ["北京", "上海", "广州", "深圳"], "answer": 3},
    {"context": "For breakfast Bob eats", "choices": [" bread", " rice", " an apple"], "answer": 2},
    {"context": "", "choices": [" yes", " no"], "answer": 1},
    {"context": "The sky is", "choices": [" blue", " a very long answer indeed"], "answer": 1},
]
GEN_PROMPTS = ["7 times 8 is", "12 times 12 is", "Bob has 3 apples", "3 + 4 =", "x = ", "小红有", "Count: 1, 2,",
               "Year"]
TEXTS = ["Alice lives in Paris. Bob eats bread on Monday, and on Tuesday he eats rice with 12 friends.\n"
         "小明住在北京。三加四等于七。" * 2,  # 262 bytes: five windows of 64 tokens
         "A short one.", "  spaces\tand\nlines  "]


def harness_yaml(name: str, data: Path, body: str) -> str:
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\n{body}")


MC_YAML = """output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
"""
GEN_YAML = """output_type: generate_until
doc_to_text: prompt
doc_to_target: answer
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: {budget}
  do_sample: false
filter_list:
  - name: {filter_name}
    filter:
{filters}      - function: take_first
metric_list:
  - metric: exact_match
"""
REGEX_FILTER = f"      - function: regex\n        regex_pattern: '{NUMBER}'\n        group_select: -1\n"
STRIP_FILTER = "      - function: remove_whitespace\n"
TEXT_YAML = """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: text
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


def write_jsonl(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items), encoding="utf-8")
    return path


@dataclass
class Evaluated:
    ours: dict[str, dict[str, float]]
    harness: dict[str, dict[str, float]]
    output: str
    expected_matches: dict[str, float]  # generation tasks: the share of items whose answer is the model's own


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A lively tiny Yuan model (ByteTokenizer, sequences of 64 tokens) saved as a checkpoint."""
    root = tmp_path_factory.mktemp("harness_ckpt")
    write_model_checkpoint(root / "step_3", model_tensors(lively_model(["+exp=tiny"])), compose(["+exp=tiny"]))
    return root / "step_3"


def greedy_completions(checkpoint: Path, prompts: list[str]) -> list[str]:
    model, tokenizer, _ = load_for_inference(checkpoint, "cpu")
    ids = ModelBackend(model, tokenizer.eod_id, tokenizer.vocab_size, 4).greedy(
        [prompt_ids(p, tokenizer, WINDOW, BUDGET) for p in prompts], BUDGET, "reference")
    return [completion(out, tokenizer, ("\n\n",), BUDGET) for out in ids]


def generation_items(prompts: list[str], completions: list[str], match: str) -> tuple[list[dict], float]:
    """Items whose answer is the model's own completion (its last number, or its stripped text)
    for every other prompt, and one it does not give for the rest; and the share answered right."""
    items, right = [], 0
    for index, (prompt, text) in enumerate(zip(prompts, completions)):
        number = last_number(text)
        own = (str(number) if number is not None else None) if match == "number" else text.strip() or None
        answer = own if index % 2 == 0 and own is not None else ("-987654" if match == "number" else "no such text")
        right += answer == own
        items.append({"prompt": prompt, "answer": answer, "max_new_tokens": BUDGET, "match": match})
    return items, right / len(items)


@dataclass
class TaskFiles:
    """The same items as megamoe task files (by name) and as harness tasks (``harness_<name>``) in ``yamls``."""

    files: dict[str, Path]
    yamls: Path
    expected_matches: dict[str, float]


@pytest.fixture(scope="module")
def task_files(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> TaskFiles:
    root = tmp_path_factory.mktemp("harness_tasks")
    completions = greedy_completions(checkpoint, GEN_PROMPTS)
    number_items, number_share = generation_items(GEN_PROMPTS, completions, "number")
    exact_items, exact_share = generation_items(GEN_PROMPTS, completions, "exact")
    files = {"mc": write_jsonl(root / "mc.jsonl", MC_ITEMS),
             "gen_number": write_jsonl(root / "gen_number.jsonl", number_items),
             "gen_exact": write_jsonl(root / "gen_exact.jsonl", exact_items),
             "text": write_jsonl(root / "text.jsonl", [{"text": text} for text in TEXTS])}
    yamls = root / "yaml"
    yamls.mkdir()
    bodies = {"mc": MC_YAML, "text": TEXT_YAML,
              "gen_number": GEN_YAML.format(budget=BUDGET, filter_name="last-number", filters=REGEX_FILTER),
              "gen_exact": GEN_YAML.format(budget=BUDGET, filter_name="stripped", filters=STRIP_FILTER)}
    for name, body in bodies.items():
        (yamls / f"{name}.yaml").write_text(harness_yaml(f"harness_{name}", files[name], body))
    (yamls / "missing.yaml").write_text(harness_yaml("harness_missing", root / "nowhere.jsonl", MC_YAML))
    (yamls / "unsafe.yaml").write_text(harness_yaml("harness_unsafe", files["mc"], MC_YAML + "unsafe_code: true\n"))
    return TaskFiles(files, yamls, {"gen_number": number_share, "gen_exact": exact_share})


@pytest.fixture(scope="module")
def offline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """No network for the Hugging Face libraries (HF_DATASETS_OFFLINE=1, HF_HUB_OFFLINE=1), and a
    datasets cache of the tests' own; datasets read its environment when the harness imported
    it, so its settings are set as well."""
    import datasets

    cache = tmp_path_factory.mktemp("hf_cache")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in (("HF_DATASETS_OFFLINE", "1"), ("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_CACHE", str(cache))):
            patch.setenv(name, value)
        patch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
        patch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
        yield


@pytest.fixture(scope="module")
def evaluated(checkpoint: Path, task_files: TaskFiles, offline: None) -> Evaluated:
    """launch/evaluate.py once, on the same items as megamoe task files and as local harness tasks."""
    files = task_files.files
    capture = CapturedMain()
    results = capture(["--checkpoint", str(checkpoint), "--tasks", *map(str, files.values()),
                       "--harness-tasks", ",".join(f"harness_{name}" for name in files),
                       "--harness-include-path", str(task_files.yamls), "--batch-size", "3", "--max-new-tokens", "4"])
    return Evaluated({name: results[name] for name in files}, {name: results[f"harness_{name}"] for name in files},
                     capture.output, task_files.expected_matches)


class CapturedMain:
    """launch/evaluate.py's main, its stdout kept; returns the JSON of its last line."""

    output = ""

    def __call__(self, argv: list[str]) -> dict:
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            main(argv)
        self.output = stdout.getvalue()
        return json.loads(self.output.splitlines()[-1])


def test_multiple_choice_scores_equal(evaluated: Evaluated) -> None:
    assert evaluated.harness["mc"]["acc"] == evaluated.ours["mc"]["acc"]
    assert evaluated.harness["mc"]["acc_norm"] == evaluated.ours["mc"]["acc_norm"]
    assert evaluated.ours["mc"]["acc"] != evaluated.ours["mc"]["acc_norm"]  # the length normalisation mattered
    assert evaluated.harness["mc"]["acc_stderr"] > 0


@pytest.mark.parametrize(("task", "metric"), [("gen_number", "exact_match,last-number"),
                                               ("gen_exact", "exact_match,stripped")])
def test_generation_scores_equal(evaluated: Evaluated, task: str, metric: str) -> None:
    expected = evaluated.expected_matches[task]
    assert 0 < expected < 1  # some answers are the model's own, the others are not
    assert evaluated.ours[task] == {"exact_match": expected}
    assert evaluated.harness[task][metric] == expected


def test_rolling_perplexity_equals(evaluated: Evaluated) -> None:
    ours, harness = evaluated.ours["text"], evaluated.harness["text"]
    assert set(ours) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    for metric, value in ours.items():
        assert harness[metric] == pytest.approx(value, rel=1e-12), metric
    assert math.isfinite(ours["byte_perplexity"]) and ours["byte_perplexity"] > 1


def test_output_lines(evaluated: Evaluated) -> None:
    lines = evaluated.output.splitlines()
    assert any(line.startswith(f"{'harness_mc':<24}      6 items  acc ") and " ± " in line for line in lines)
    assert any(line.startswith(f"{'harness_text':<24}      3 items  word_perplexity ") for line in lines)
    assert "lm-evaluation-harness harness_mc, harness_gen_number, harness_gen_exact, harness_text, each task's own " \
           "few-shot, sequences of 64 tokens" in evaluated.output
    assert lines[-2].startswith("8 task(s), 50 items in ")
    assert "sample_len" not in evaluated.output  # the harness's bookkeeping is not a metric


# ---- the model class on its own


@pytest.fixture(scope="module")
def lm(checkpoint: Path) -> MegamoeLM:
    return MegamoeLM.create_from_arg_string(f"checkpoint={checkpoint},max_gen_toks=5", {"batch_size": 2,
                                                                                       "device": "cpu"})


def test_registered_for_the_harness_by_name(lm: MegamoeLM) -> None:
    from lm_eval.api.registry import get_model

    assert get_model("megamoe") is MegamoeLM
    assert (lm.window, lm.max_gen_toks, lm.backend.batch_size) == (WINDOW, 5, 2)


def instance(kind: str, args: tuple, doc_id: int = 0) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0, metadata=("t", doc_id, 1))


@torch.no_grad()
def reference_logprobs(lm: MegamoeLM, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each next token's log-probability in one forward over ``ids`` (over all the embedding's rows,
    as the training loss), and the greedy ids (among the tokenizer's)."""
    logits = lm.backend.model(torch.tensor([ids[:-1]]))[0].double()
    logprobs = F.log_softmax(logits, dim=-1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    return logprobs, logits[:, :lm.tokenizer.vocab_size].argmax(-1)


def greedy_round_trip(lm: MegamoeLM) -> tuple[str, str]:
    """A context whose greedy next token is a character that encodes back to that token (a random
    model often picks a lone UTF-8 continuation byte or a special token, which text cannot carry)."""
    tokenizer = lm.tokenizer
    for context in ("Alice", "Bob", "7 times", "小明", "The", "x", "def", "A", "1", "?"):
        (ids,) = lm.backend.greedy([[tokenizer.eod_id, *tokenizer.encode(context)]], 1, "probe")
        if ids and tokenizer.encode(tokenizer.decode(ids)) == ids:
            return context, tokenizer.decode(ids)
    raise AssertionError("no context of the list has a printable greedy next token")


def test_loglikelihood_is_the_continuation_after_the_eod_and_context(lm: MegamoeLM) -> None:
    context, greedy = greedy_round_trip(lm)
    pairs = [(context, greedy), (context, greedy + " xyz"), ("", " ok")]
    results = lm.loglikelihood([instance("loglikelihood", pair) for pair in pairs])
    for (value, is_greedy), (context, continuation) in zip(results, pairs):
        ids = [lm.tokenizer.eod_id, *lm.tokenizer.encode(context), *lm.tokenizer.encode(continuation)]
        logprobs, argmax = reference_logprobs(lm, ids)
        n = len(lm.tokenizer.encode(continuation))
        assert value == pytest.approx(float(logprobs[-n:].sum()), abs=1e-5)
        assert is_greedy == bool((argmax[-n:] == torch.tensor(ids[-n:])).all())
    assert results[0][1] and not results[1][1]


def test_rolling_loglikelihood_sums_every_token_once(lm: MegamoeLM) -> None:
    text = "x" * 10 + "0123456789" * 14  # 150 tokens: windows of 64, 64 and 22 (after 42 of context)
    (value,) = lm.loglikelihood_rolling([instance("loglikelihood_rolling", (text,))])
    ids = [lm.tokenizer.eod_id, *text.encode()]  # token i of the text is ids[i + 1]
    first, _ = reference_logprobs(lm, ids[:65])
    second, _ = reference_logprobs(lm, ids[64:129])
    last, _ = reference_logprobs(lm, ids[86:151])
    assert value == pytest.approx(float(first.sum() + second.sum() + last[-22:].sum()), abs=1e-4)


def test_generation_budgets_stops_and_sampling(lm: MegamoeLM) -> None:
    tokenizer = lm.tokenizer
    (ids,) = lm.backend.greedy([prompt_ids("7 times", tokenizer, WINDOW, 9)], 9, "reference")
    texts = lm.generate_until([instance("generate_until", ("7 times", {"until": ["\n\n"]})),
                               instance("generate_until", ("7 times", {"until": ["\n\n"], "max_new_tokens": 9}))])
    assert texts == [completion(ids, tokenizer, ("\n\n",), 5), completion(ids, tokenizer, ("\n\n",), 9)]
    assert texts[0] != texts[1]  # max_gen_toks=5 by default here: the budgets were kept apart
    stop = texts[1][len(texts[1]) // 2]
    cut = lm.generate_until([instance("generate_until", ("7 times", {"until": stop, "max_gen_toks": 9}))])
    assert cut == [texts[1][:texts[1].index(stop)]]
    with pytest.raises(TaskError, match=r"^t: doc 4: the task samples .*set do_sample: false"):
        lm.generate_until([instance("generate_until", ("q", {"temperature": 0.7}), doc_id=4)])
    with pytest.raises(TaskError, match=r"^t: doc 0: 64 new tokens leave no room for a prompt in a 64-token"):
        lm.generate_until([instance("generate_until", ("q", {"max_gen_toks": 64}))])


# ---- mistakes


@pytest.fixture(scope="module")
def manager(task_files: TaskFiles) -> TaskManager:
    return harness.task_manager(task_files.yamls)


@pytest.mark.slow
def test_an_unknown_task_names_the_closest(manager: TaskManager) -> None:
    harness.check_tasks(manager, ["harness_mc", "arc_easy", "mmlu_*"])  # a local task, a built-in one, a glob
    with pytest.raises(TaskError, match=r"^harness task 'harness_mcc' not found among lm-evaluation-harness's \d+ "
                                        r"tasks \(closest: harness_mc.*\); for a task of your own, pass "
                                        r"--harness-include-path DIR"):
        harness.check_tasks(manager, ["harness_mcc"])


def test_a_dataset_that_cannot_be_read_is_one_error(manager: TaskManager, lm: MegamoeLM,
                                                    offline: None) -> None:
    with pytest.raises(TaskError) as error:
        harness.evaluate(lm, manager, ["harness_missing"], limit=None, num_fewshot=None, seed=None)
    message = str(error.value)
    assert message.startswith("harness tasks: a dataset could not be loaded (FileNotFoundError: ")
    assert "\n" not in message
    assert message.endswith("a task of your own: check its dataset_path and data_files")


def test_a_task_that_runs_code_needs_the_confirmation(manager: TaskManager, lm: MegamoeLM, offline: None) -> None:
    with pytest.raises(TaskError, match=r"^Attempted to run task: harness_unsafe which is marked as unsafe: it "
                                        r"executes the model's code; pass --confirm-run-unsafe-code, in a sandbox$"):
        harness.evaluate(lm, manager, ["harness_unsafe"], limit=2, num_fewshot=None, seed=None)
    scores, items = harness.evaluate(lm, manager, ["harness_unsafe"], limit=2, num_fewshot=None, seed=3,
                                     unsafe_code=True)
    assert items == {"harness_unsafe": 2} and set(scores["harness_unsafe"]) == {"acc", "acc_stderr", "acc_norm",
                                                                                 "acc_norm_stderr"}
