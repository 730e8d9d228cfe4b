"""The worker processes: install the steerer after the model loads, hook each runner's step, self-test."""
