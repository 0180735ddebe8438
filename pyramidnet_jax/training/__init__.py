"""Training: the step, the optimiser, the device runtime, checkpoints, metrics and the loop.

Submodules are imported where used; `training.loop.train_and_evaluate` is the entry point.
"""
