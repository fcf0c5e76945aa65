"""Runnable recipes, one per finding (see docs/findings.md); shared plumbing in _common.py."""
