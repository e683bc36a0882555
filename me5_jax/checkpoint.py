"""Checkpoints: train state (params, Adam moments, step) + the input pipeline's state, in one orbax step,
and the model description (encoder config + tokenizer files) that `me5_jax.export` needs beside them.

Dropout randomness is a function of (config.seed, step) (see train_step), so state + data position + the
config written next to the checkpoints determine every following step exactly; nothing else is needed
for a bitwise resume.

Saves are asynchronous and atomic (orbax writes into a temporary folder and renames it when complete), so
a run killed mid-save leaves the previous checkpoints intact; the leftover temporary folder is removed
when the next run opens the directory. A checkpoint that is complete but damaged fails to restore: orbax's
OCDBT format detects truncated data files (checked for every file of a checkpoint; none restored garbage),
so no checksum of our own is needed. `restore_latest` then warns, naming the step, moves the checkpoint
aside into `<directory>.damaged/` (kept for inspection, and so that the step can be saved again) and falls
back to the next older one.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from me5_jax import hf_io
from me5_jax.variants import EncoderConfig

log = logging.getLogger(__name__)
MODEL_DIR = "model"  # WORKDIR/model: encoder.json + the tokenizer files of the run


class Checkpointer:
  def __init__(self, directory: str, keep: int = 3, read_only: bool = False):
    """read_only: for readers beside a run that may still be saving (export): nothing is created, cleaned
    up or moved aside."""
    self.directory, self.read_only = os.path.abspath(directory), read_only
    if read_only:
      options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
    else:
      options = ocp.CheckpointManagerOptions(max_to_keep=keep, cleanup_tmp_directories=True)
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
    """(step, state, data_state) of the newest checkpoint that restores on every process, or None."""
    for step in reversed(self.steps()):
      try:
        state, data_state = self.restore(step, abstract_state)
        error = ""
      except Exception as e:  # noqa: BLE001 — any failure of a damaged checkpoint means: try the previous
        error = describe_error(e)
      if _on_all_processes(not error):
        return step, state, data_state
      error = error or "it failed to restore on another process"
      if self.read_only:
        log.warning("checkpoint at step %d in %s is damaged (%s); trying an older one", step, self.directory, error)
      else:
        self._set_aside(step, error)
    return None

  def _set_aside(self, step: int, why: str) -> None:
    aside = os.path.join(f"{self.directory}.damaged", f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    log.warning("checkpoint at step %d in %s is damaged (%s): moved to %s; trying an older one",
                step, self.directory, why, aside)
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(aside), exist_ok=True)
      os.rename(os.path.join(self.directory, str(step)), aside)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"checkpoint {step} set aside")
    self.manager.reload()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def describe_error(e: Exception) -> str:
  """The first line of an exception (TensorStore appends pages of details)."""
  first = (str(e).splitlines() or [""])[0].split(" See full TensorStore")[0]
  return f"{type(e).__name__}: {first[:200]}"


def _on_all_processes(ok: bool) -> bool:
  """Every process must resume from the same step, even if only one of them read a damaged file."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(multihost_utils.process_allgather(np.array(ok)).all())


def save_model_info(workdir: str, enc_cfg: EncoderConfig, tokenizer_dir: str) -> None:
  """WORKDIR/model/: the encoder config and a copy of the tokenizer files, so that a run's checkpoints
  can be exported later without the model folder it started from."""
  out = os.path.join(workdir, MODEL_DIR)
  os.makedirs(out, exist_ok=True)
  for name in hf_io.TOKENIZER_FILES:
    src = os.path.join(tokenizer_dir, name)
    if os.path.exists(src) and os.path.abspath(src) != os.path.abspath(os.path.join(out, name)):
      shutil.copyfile(src, os.path.join(out, name))
  with open(os.path.join(out, "encoder.json"), "w", encoding="utf-8") as f:
    # The attention kernel is the running machine's choice (cuDNN on a GPU), not the model's: stored as XLA,
    # so export and evaluation load the run anywhere.
    json.dump(dataclasses.asdict(enc_cfg.replace(attention_impl="xla")), f, indent=2)
    f.write("\n")


def load_model_info(workdir: str) -> tuple[EncoderConfig, str]:
  """(encoder config, tokenizer folder) written by `save_model_info`."""
  path = os.path.join(workdir, MODEL_DIR, "encoder.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing: not a workdir written by `python -m me5_jax.train`")
  with open(path, encoding="utf-8") as f:
    return EncoderConfig(**json.load(f)), os.path.dirname(path)
