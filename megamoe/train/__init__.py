"""The training loop and its parts: optimizer, learning-rate schedule, metrics."""
