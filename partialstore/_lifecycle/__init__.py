"""Checkpoint lifecycle of a training run: steps, the run index, retention, sessions.

A layer above :mod:`partialstore._commit` and below :mod:`partialstore._api`:
:class:`~partialstore._lifecycle.manager.CheckpointManager` names one
checkpoint per step under a root and reuses the one entry point per
operation in :mod:`partialstore._commit.operations` for saving, finalizing,
loading and discarding them.
"""
