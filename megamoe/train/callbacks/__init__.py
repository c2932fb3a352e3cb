"""The jobs around a training step, one small object each (OLMo-core's callbacks, lighter).

After every step the loop hands the :class:`megamoe.train.step.StepResult` to each callback in
turn (:func:`build_callbacks` gives the order): metrics and the console line, loss-spike
rollback, the skipped-step streak, validation, downstream evaluation, and checkpointing with
preemption. A callback may answer with an :class:`Action` — the state was rewound, or the run
must stop — and the callbacks after it are not called for that step.
"""
