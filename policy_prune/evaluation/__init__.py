"""Evaluation: heuristic baselines, token merging, metrics, the eval and bench verbs."""
