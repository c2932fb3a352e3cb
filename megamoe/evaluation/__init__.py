"""Downstream evaluation (docs/evaluation.md): tasks from local jsonl files or built in
(:mod:`~megamoe.evaluation.tasks`, :mod:`~megamoe.evaluation.demo`), scored the same way by one
process (:mod:`~megamoe.evaluation.model`, launch/evaluate.py) and by a training run's pipeline
stages (megamoe.train.downstream) through :mod:`~megamoe.evaluation.scoring`; lm-evaluation-harness's
tasks go through the same scorer (:mod:`~megamoe.evaluation.harness`, the ``eval`` extra).
"""
