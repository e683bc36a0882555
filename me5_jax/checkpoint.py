"""Checkpoints: train state (params, Adam moments, step) + the input pipeline's state, in one orbax step.

Dropout randomness is a function of (config.seed, step) (see train_step), so state + data position + the
config written next to the checkpoints determine every following step exactly; nothing else is needed
for a bitwise resume.

Saves are asynchronous and atomic (orbax writes into a temporary folder and renames it when complete), so
a run killed mid-save leaves the previous checkpoints intact. A checkpoint that is complete but damaged
(a truncated file) fails to restore: `restore_latest` then warns, naming its step, and falls back to the
next older one.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, data_state: dict) -> None:
    """Starts an (async) save of `state` and the pipeline position; `wait` blocks until it is on disk."""
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    data=ocp.args.JsonSave(data_state)), force=True)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores into `abstract_state` (ShapeDtypeStructs carrying the target shardings)."""
    out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                             data=ocp.args.JsonRestore()))
    return out["state"], dict(out["data"])

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
    """(step, state, data_state) of the newest checkpoint that restores, or None when there is none."""
    for step in reversed(self.steps()):
      try:
        state, data_state = self.restore(step, abstract_state)
      except Exception as e:  # noqa: BLE001 — any failure of a damaged checkpoint means: try the previous
        log.warning("checkpoint at step %d in %s is damaged and was skipped (%s: %s)", step, self.directory,
                    type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
        continue
      return step, state, data_state
    return None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
