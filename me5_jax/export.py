"""Export a training run's checkpoint: `python -m me5_jax.export --workdir DIR --out HF_DIR [--step N]`.

Writes the same Hugging Face + sentence-transformers folder the trainer writes to DIR/export at the end,
for any saved step. It reads only what the trainer left in DIR: config.json (the resolved config, which
fixes the train state's layout, the prefixes and the lengths), model/ (encoder config and tokenizer
files) and checkpoints/. The state is restored onto this machine's devices, whatever mesh trained it
(orbax reshards), read-only: a run still training in DIR is not disturbed. Without --step the newest
checkpoint that restores is used. What is missing (config.json, model/, checkpoints, the step asked
for, with the steps there are) is a one-line error with exit status 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Sequence

from me5_jax import cli

PROGRAM = "me5_jax.export"  # its `<program>: error:` lines (me5_jax.cli)

log = logging.getLogger(__name__)


def save(params: Any, enc_cfg, config, tokenizer_dir: str, out: str) -> str:
  """The export folder of `params` trained with `config` (the trainer calls this too): the run's prefixes
  become the sentence-transformers prompts, its passage length the default max_seq_length."""
  import jax
  from me5_jax import hf_io
  prompts = {name: p for name, p in (("query", config.query_prefix), ("passage", config.passage_prefix)) if p}
  return hf_io.save_pretrained(jax.device_get(params), enc_cfg, out, tokenizer_dir=tokenizer_dir,
                               max_seq_length=config.passage_max_length, prompts=prompts)


def restore_params(workdir: str, step: int | None = None):
  """(step, params, encoder config, run config, tokenizer folder) of a checkpoint in `workdir`."""
  from me5_jax import checkpoint, config as config_lib, sharding, train_step
  config_path = os.path.join(workdir, "config.json")
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{config_path} is missing: not a workdir of `python -m me5_jax.train`")
  config = config_lib.load(config_path)
  enc_cfg, tokenizer_dir = checkpoint.load_model_info(workdir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  ckpt = checkpoint.Checkpointer(ckpt_dir, read_only=True) if os.path.isdir(ckpt_dir) else None
  steps = ckpt.steps() if ckpt else []
  if not steps:
    raise FileNotFoundError(f"{ckpt_dir}: no checkpoints")
  if step is not None and step not in steps:
    raise KeyError(f"{ckpt_dir}: no checkpoint of step {step}; available steps: {steps}")
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = -1, 1, 1  # whatever devices this machine has
  abstract_state = train_step.abstract_train_state(enc_cfg, config, sharding.make_mesh(config))
  try:
    if step is None:
      restored = ckpt.restore_latest(abstract_state)
      if restored is None:
        raise ValueError(f"{ckpt_dir}: none of the checkpoints {steps} restores")
      step, state, _ = restored
    else:
      try:
        state, _ = ckpt.restore(step, abstract_state)
      except Exception as e:  # noqa: BLE001 — orbax/TensorStore errors of a damaged checkpoint
        raise ValueError(f"{ckpt_dir}: step {step} does not restore ({checkpoint.describe_error(e)})") from None
  finally:
    ckpt.close()
  return step, state.params, enc_cfg, config, tokenizer_dir


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  ap = cli.parser(PROGRAM, __doc__)
  ap.add_argument("--workdir", required=True, help="the training run's --workdir")
  ap.add_argument("--out", required=True, help="folder for the HF + sentence-transformers model")
  ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest that restores)")
  return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse_args(argv)
  logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
  log.setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.ERROR)  # orbax explains its read-only mode at length
  try:
    step, params, enc_cfg, config, tokenizer_dir = restore_params(args.workdir, args.step)
  except (FileNotFoundError, KeyError, ValueError) as e:
    return cli.error(PROGRAM, e.args[0] if isinstance(e, KeyError) else e)
  out = save(params, enc_cfg, config, tokenizer_dir, args.out)
  log.info("exported step %d of %s to %s", step, args.workdir, out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
