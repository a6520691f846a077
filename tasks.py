"""Invoke entry point: the tasks live in the pvlab package (src/pvlab/tasks.py)."""

from pvlab.tasks import ns  # noqa: F401
