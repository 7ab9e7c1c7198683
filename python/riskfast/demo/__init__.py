"""Demonstrations run by the ``riskfast`` command line."""

from .synthetic import SyntheticRollout, make_rollout, run_synthetic_demo

__all__ = ["SyntheticRollout", "make_rollout", "run_synthetic_demo"]
