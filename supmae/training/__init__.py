"""Pretraining: a run built from its configuration, the step, the loop, the optimiser and schedule,
checkpoints, metrics and stop requests."""
