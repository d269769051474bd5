"""Deterministic orchestration: one SendEmailWorkflow per email."""
