"""The training step at full scale on fake tensors: every pipeline rank's real step, measured.

launch/dry_run.py drives it; docs/dry_run.md says what it proves and what it does not."""
