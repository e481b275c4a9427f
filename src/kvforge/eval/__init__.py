"""Evaluation: task generators (`tasks/`), metrics, runner and report."""
