"""lm-evaluation-harness on a megamoe checkpoint, in one process (launch/evaluate.py --harness-tasks).

:class:`MegamoeLM` is the harness's model interface (``lm_eval.api.model.LM``) over our own
single-process backend (megamoe.evaluation.model): the harness builds each task's prompts,
few-shot examples, filters and metrics; megamoe scores the requests exactly as it scores its own
task files (megamoe.evaluation.scoring) — the eod first, context and continuation tokenized
separately, sequences cut from the left to the run's ``train.seq_len``, batched forward passes,
greedy KV-cached decoding — so the same items give the same numbers through either path.
Registered as ``megamoe``: ``lm_eval.simple_evaluate(model="megamoe", model_args="checkpoint=DIR")``.

Needs the ``eval`` extra (``pip install -e ".[eval]"``); importing this module without it raises
ImportError.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Optional, Sequence

from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.tasks import TaskManager
from lm_eval.utils import simple_parse_args_string

from megamoe.data.tokenizer import Tokenizer
from megamoe.errors import TaskError, UserError
from megamoe.evaluation.model import ModelBackend
from megamoe.evaluation.scoring import check_room, completion, continuation_request, prompt_ids, text_loglikelihoods
from megamoe.inference import load_for_inference

# The harness's spellings of a generation budget, in its order of priority.
BUDGET_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")
# Where the error of a dataset that cannot be fetched comes from.
DATASET_PACKAGES = ("datasets", "huggingface_hub", "requests", "urllib3", "fsspec")


def _where(request: Instance) -> str:
    return f"{request.task_name}: doc {request.doc_id}"


def _samples(kwargs: dict[str, Any]) -> bool:
    """Whether a request's generation kwargs ask for sampling, as the harness reads them:
    ``do_sample`` when given, else a temperature above 0."""
    if kwargs.get("do_sample") is not None:
        return bool(kwargs["do_sample"])
    return float(kwargs.get("temperature") or 0.0) > 0.0


def greedy_settings(request: Instance, default_budget: int) -> tuple[tuple[str, ...], int]:
    """A generate_until request's stop strings and token budget; TaskError for a sampling task."""
    kwargs = request.args[1]
    if _samples(kwargs):
        raise TaskError(f"{_where(request)}: the task samples (do_sample / temperature in its generation_kwargs); "
                        "megamoe decodes greedily: set do_sample: false in the task's YAML")
    until = kwargs.get("until") or []
    budget = next((kwargs[key] for key in BUDGET_KEYS if kwargs.get(key) is not None), default_budget)
    return (until,) if isinstance(until, str) else tuple(until), int(budget)


@register_model("megamoe")
class MegamoeLM(LM):
    """A megamoe model as the harness sees it; ``window`` is the sequence length scored (the
    run's ``train.seq_len``), ``max_gen_toks`` the budget of generation requests that set none."""

    def __init__(self, backend: ModelBackend, tokenizer: Tokenizer, window: int, max_gen_toks: int = 256) -> None:
        super().__init__()
        self.backend, self.tokenizer, self.window, self.max_gen_toks = backend, tokenizer, window, max_gen_toks

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, batch_size: int | str = 16, device: Optional[str] = None,
                        max_gen_toks: int | str = 256) -> "MegamoeLM":
        """Any checkpoint (a ``step_N/`` or a checkpoints directory, any training layout)."""
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise UserError(f"batch_size={batch_size}: megamoe takes a positive number of sequences per pass")
        model, tokenizer, cfg = load_for_inference(checkpoint, device)
        backend = ModelBackend(model, tokenizer.eod_id, tokenizer.vocab_size, int(batch_size))
        return cls(backend, tokenizer, cfg.train.seq_len, int(max_gen_toks))

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None) -> "MegamoeLM":
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: Optional[dict] = None) -> "MegamoeLM":
        """``model_args`` (checkpoint=DIR, batch_size, device, max_gen_toks) plus the harness's
        own --batch_size / --device."""
        extra = {key: value for key, value in (additional_config or {}).items()
                 if key in ("batch_size", "device") and value is not None}
        return cls.from_checkpoint(**{**arg_dict, **extra})

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log-likelihood of the continuation after the context, whether it is greedy) per request."""
        eod, encode = self.tokenizer.eod_id, self.tokenizer.encode
        scored = [continuation_request([eod, *encode(context)], encode(continuation), self.window, _where(request))
                  for request in requests for context, continuation in [request.args]]
        return self.backend.scores(scored, "loglikelihood")

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood after the eod, every token scored once (rolling windows)."""
        texts = [request.args[0] for request in requests]
        return text_loglikelihoods(texts, self.tokenizer, self.backend, self.window, "loglikelihood_rolling")

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, cut before the first stop string; requests of one budget decode
        together, longest prompts first."""
        settings = [greedy_settings(request, self.max_gen_toks) for request in requests]
        by_budget: dict[int, list[int]] = {}
        for index, (request, (_, budget)) in enumerate(zip(requests, settings)):
            check_room(_where(request), budget, self.window, "max_gen_toks in the task's generation_kwargs")
            by_budget.setdefault(budget, []).append(index)
        prompts = [prompt_ids(request.args[0], self.tokenizer, self.window, budget)
                   for request, (_, budget) in zip(requests, settings)]
        texts = [""] * len(requests)
        for budget, indices in sorted(by_budget.items()):
            indices.sort(key=lambda i: -len(prompts[i]))
            generated = self.backend.greedy([prompts[i] for i in indices], budget, "generate_until")
            for i, ids in zip(indices, generated):
                texts[i] = completion(ids, self.tokenizer, settings[i][0], budget)
        return texts


def task_manager(include_path: Optional[Path]) -> TaskManager:
    """The harness's tasks, and those of the YAML files under ``include_path``."""
    if include_path is not None and not include_path.is_dir():
        raise UserError(f"--harness-include-path {include_path}: not a directory; point it at a directory of task "
                        "YAML files")
    return TaskManager(include_path=None if include_path is None else str(include_path))


def check_tasks(manager: TaskManager, names: Sequence[str]) -> None:
    """TaskError naming the first task (or group, tag, glob) the harness does not know, with the
    names closest to it."""
    for name in names:
        if not manager.match_tasks([name]):
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hint = f" (closest: {', '.join(close)})" if close else ""
            raise TaskError(f"harness task {name!r} not found among lm-evaluation-harness's {len(manager.all_tasks)} "
                            f"tasks{hint}; for a task of your own, pass --harness-include-path DIR with its YAML")


def _dataset_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a dataset that could not be fetched or read (no network, no cached copy, a
    wrong local path), rather than a bug."""
    return isinstance(exc, (ConnectionError, FileNotFoundError)) or \
        type(exc).__module__.split(".")[0] in DATASET_PACKAGES


def _metric_name(key: str) -> str:
    """The harness's ``metric,filter`` key, without the default filter: ``acc,none`` → ``acc``."""
    return key.removesuffix(",none")


def _metrics(results: dict[str, Any]) -> dict[str, float]:
    """A task's numbers in the harness's results: its ``metric,filter`` keys (not ``alias`` or
    ``sample_len``), stderrs included; an stderr it could not compute ("N/A") left out."""
    return {_metric_name(key): value for key, value in results.items()
            if "," in key and isinstance(value, (int, float)) and not isinstance(value, bool)}


def evaluate(lm: MegamoeLM, manager: TaskManager, names: Sequence[str], limit: Optional[int],
             num_fewshot: Optional[int], seed: Optional[int], unsafe_code: bool = False
             ) -> tuple[dict[str, dict[str, float]], dict[str, int]]:
    """Each task's (and group's) metrics, stderrs included, and each task's number of items.

    ``num_fewshot`` None keeps each task's own setting; ``seed`` None keeps the harness's default
    seeds (so scores compare with published harness runs), else seeds all four of them;
    ``unsafe_code`` lets tasks that execute the model's code (humaneval) run.
    """
    options: dict[str, Any] = {"confirm_run_unsafe_code": True} if unsafe_code else {}
    if seed is not None:
        options.update(dict.fromkeys(("random_seed", "numpy_random_seed", "torch_random_seed", "fewshot_random_seed"),
                                     seed))
    try:
        out = simple_evaluate(model=lm, tasks=list(names), task_manager=manager, limit=limit,
                              num_fewshot=num_fewshot, log_samples=False, **options)
    except Exception as exc:
        if "marked as unsafe" in str(exc):  # the harness's words for a task that runs the model's code
            raise TaskError(f"{str(exc).split('. ')[0]}: it executes the model's code; pass "
                            "--confirm-run-unsafe-code, in a sandbox") from None
        if not _dataset_failure(exc):
            raise
        raise TaskError(f"harness tasks: a dataset could not be loaded ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}); the harness's own tasks download theirs "
                        "from the Hugging Face Hub: run once with network (they are cached), or set HF_DATASETS_CACHE "
                        "to a copy; a task of your own: check its dataset_path and data_files") from None
    scores = {task: _metrics(results) for task, results in out["results"].items()}
    items = {task: counts["effective"] for task, counts in out.get("n-samples", {}).items()}
    return scores, items
