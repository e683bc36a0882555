"""`python -m me5_jax.train --config configs/<size>.py[:stage] --workdir DIR [--config.key=value ...]`

One linear loop: distributed → config → mesh → model source → input → sharded state → step → loop
(metrics, checkpoints, evals) → export. The same command runs on a TPU pod (every worker runs it), on a
GPU box and on CPU with simulated devices (`ME5_CPU_DEVICES=8`).

Resume order: the newest restorable checkpoint in WORKDIR/checkpoints, else `init_checkpoint` (an HF
folder), else a fresh init of `model_variant`. SIGTERM (preemption) saves a checkpoint of the current
step and exits 0. A non-finite loss or gradient norm (or parameters, checked before each save) stops the
run with exit status 1 naming the step; nothing of that step is saved.

WORKDIR gets config.json (the resolved config), model/ (encoder config + tokenizer files, for
`me5_jax.export`), checkpoints/, metrics.jsonl, tensorboard/ and, at the end, export/.
"""
from __future__ import annotations

import glob
import logging
import os
import re
import signal
import sys
import time

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "configs/<name>.py[:arg]", lock_config=True)
flags.DEFINE_string("workdir", None, "run directory: checkpoints, metrics.jsonl, export/")
flags.DEFINE_string("coordinator", os.environ.get("ME5_COORDINATOR", ""),
                    "host:port of process 0 for multi-process runs off TPU (env ME5_COORDINATOR)")
flags.DEFINE_integer("num_processes", int(os.environ.get("ME5_NUM_PROCESSES", "1")),
                     "number of processes (env ME5_NUM_PROCESSES)")
flags.DEFINE_integer("process_id", int(os.environ.get("ME5_PROCESS_ID", "0")),
                     "this process's index (env ME5_PROCESS_ID)")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS
log = logging.getLogger("me5_jax.train")


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parser; an override of a key the config lacks becomes one line naming it (ml_collections
  raises a bare KeyError/AttributeError from inside the parser)."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    key = re.findall(r"\w+", str(e))[0]
    arg = next((a.split("=")[0] for a in argv if a.startswith("--config.") and key in a.split("=")[0].split(".")),
               "--config")
    hint = re.search(r'Did you mean "([^"]+)"', str(e))
    sys.exit(f"FATAL Flags parsing error: {arg}: the config has no key {key!r}"
             + (f"; did you mean {hint[1]!r}?" if hint else ""))


# ================================================================================== Distributed
def init_distributed() -> None:
  """Must run before anything touches a JAX backend."""
  import jax
  if os.environ.get("ME5_CPU_DEVICES"):
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", int(os.environ["ME5_CPU_DEVICES"]))
  if FLAGS.coordinator:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
  elif os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("CLOUD_TPU_TASK_ID") or _on_tpu_vm():
    jax.distributed.initialize()  # a TPU VM or pod slice describes itself (metadata server or env)


def _on_tpu_vm() -> bool:
  """TPU chips attached, as JAX's own cluster detection sees them: /dev/accel* (TPU v2-v4) or /dev/vfio/N
  (v5e and later), with libtpu installed. A GCE TPU VM sets no environment variable to say so."""
  import importlib.util
  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")) and bool(importlib.util.find_spec("libtpu"))


def main(argv) -> None:
  del argv
  init_distributed()
  import jax
  import numpy as np
  from jax.experimental import multihost_utils

  from me5_jax import checkpoint, config as config_lib, evals, export, inputs, sharding, train_step
  from me5_jax.metric_writer import MetricWriter, flops_per_sequence, peak_flops
  from me5_jax.tokenize import Tokenizer

  # absl's handler already sits on the root logger (so basicConfig alone would do nothing): replace it.
  logging.basicConfig(level=logging.INFO if jax.process_index() == 0 else logging.WARNING, force=True,
                      format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
  logging.getLogger("absl").setLevel(logging.WARNING)
  is_main = jax.process_index() == 0

  # ================================================================================ Config & mesh
  config, workdir = FLAGS.config, os.path.abspath(FLAGS.workdir)
  try:  # bad input: one line naming the key or file, before anything is written or compiled
    if "://" in FLAGS.workdir:  # os.path would quietly make a local folder named "gs:" on every host
      raise ValueError(f"--workdir {FLAGS.workdir}: URLs are not supported; every process needs the same "
                       "directory, e.g. a bucket mounted with gcsfuse (launch/tpu_pod.sh --workdir gs://... "
                       "mounts it on every worker) or an NFS share")
    config_lib.validate(config)
    mesh = sharding.make_mesh(config)
    train_step.check_config(config, mesh)  # batch vs mesh, GradCache chunking
    model_dir, enc_cfg, load_params = inputs.model_source(config)
    tokenizer_dir = config.tokenizer or model_dir
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    # ============================================================================== Input
    pipeline = inputs.input_pipeline(config, tokenizer, mesh)
  except (ValueError, KeyError, FileNotFoundError) as e:
    sys.exit(f"me5_jax.train: {e.args[0] if isinstance(e, KeyError) else e}")
  enc_cfg = train_step.encoder_config(enc_cfg, config)
  log.info("mesh %s over %d devices in %d processes (%s)", dict(mesh.shape), jax.device_count(),
           jax.process_count(), jax.devices()[0].device_kind)
  os.makedirs(workdir, exist_ok=True)
  if is_main:
    config_lib.save(config, os.path.join(workdir, "config.json"))
    checkpoint.save_model_info(workdir, enc_cfg, tokenizer_dir)

  # ================================================================================ State
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints)
  abstract_state = train_step.abstract_train_state(enc_cfg, config, mesh)
  restored = ckpt.restore_latest(abstract_state)
  if restored:
    start_step, state, data_state = restored
    pipeline.set_state(data_state)
    log.info("resumed from %s at step %d", ckpt.directory, start_step)
  else:
    start_step = 0
    try:
      host_params = load_params()
    except (ValueError, FileNotFoundError) as e:  # e.g. a tensor the config wants is not in the checkpoint
      sys.exit(f"me5_jax.train: {e}")
    state = train_step.init_train_state(enc_cfg, config, mesh, host_params)
    del host_params
    log.info("initialised from %s", model_dir or f"scratch ({config.model_variant})")
  step_fn = train_step.make_train_step(enc_cfg, config, mesh)
  all_finite = jax.jit(lambda tree: jax.tree.reduce(lambda a, x: a & jax.numpy.isfinite(x).all(), tree, True))

  # ================================================================================ Evals & logging
  writer = MetricWriter(workdir, enabled=is_main, start_step=start_step)
  evaluator = evals.Evaluator(config, tokenizer, enc_cfg, workdir)
  seqs_per_step = config.batch_size * (2 + config.num_hard_negatives)
  peak = config.peak_flops_per_device or peak_flops(jax.devices()[0])

  def batch_flops(batch) -> float:
    """Training FLOPs of the rows this batch really encodes (bucketed or packed), on every host."""
    rows = [batch["packed_ids"]] if "packed_ids" in batch else [batch["query_ids"], batch["passage_ids"]]
    return jax.process_count() * sum(x.size // x.shape[-1] * flops_per_sequence(enc_cfg, x.shape[-1]) for x in rows)

  def run_evals(step: int, tag: str) -> None:
    results = evaluator(state.params, step)
    if results:
      writer.write(step, results, prefix="eval/")
      log.info("eval %s step %d: %s", tag, step, evaluator.summary(results))

  def stop_non_finite(step: int, what: str) -> None:
    ckpt.close()  # lets earlier (good) saves finish; nothing of this step is saved
    writer.close()
    sys.exit(f"me5_jax.train: {what} at step {step}: stopping. The newest checkpoint is step "
             f"{max(ckpt.steps(), default=0)} in {ckpt.directory}; lower learning_rate or check the data")

  if start_step == 0:
    run_evals(0, "before training")

  # ================================================================================ Loop
  stop = {"signal": None}
  signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))
  batch = next(pipeline)
  step, t_last, step_last, flops_since_log = start_step, time.time(), start_step, 0.0
  log.info("training steps %d → %d, global batch %d", start_step, config.total_steps, config.batch_size)
  while step < config.total_steps:
    state, metrics = step_fn(state, sharding.shard_batch(batch, mesh))
    flops_since_log += batch_flops(batch)
    step += 1
    data_state = pipeline.get_state()  # position after `step` batches: saved with this step's state
    if step < config.total_steps:
      batch = next(pipeline)  # host work overlaps the device's step
    metrics = jax.device_get(metrics)
    if not (np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])):
      stop_non_finite(step, f"loss {metrics['loss']}, gradient norm {metrics['grad_norm']}")
    if step % config.log_every_steps == 0 or step == config.total_steps:
      elapsed = time.time() - t_last
      dt = elapsed / (step - step_last)
      rates = {"seq_per_s": seqs_per_step / dt, "step_time_s": dt,
               "mfu": flops_since_log / elapsed / (peak * jax.device_count()) if peak else None}
      t_last, step_last, flops_since_log = time.time(), step, 0.0
      writer.write(step, {**{k: float(v) for k, v in metrics.items()}, "lr": float(metrics["learning_rate"]),
                          **rates, "bad_records": pipeline.bad_records})
      writer.console(step, config.total_steps, metrics, rates)
    preempted = stop["signal"] is not None
    if jax.process_count() > 1:  # every process must stop at the same step
      preempted = bool(multihost_utils.process_allgather(np.array(preempted)).any())
    if step % config.checkpoint_every_steps == 0 or step == config.total_steps or preempted:
      if not all_finite(state.params):  # finite loss and gradients, but an update overflowed
        stop_non_finite(step, "non-finite parameters")
      ckpt.save(step, state, data_state)
    if preempted and step < config.total_steps:
      log.warning("SIGTERM at step %d: saved a checkpoint, exiting", step)
      ckpt.close()
      writer.close()
      return
    if config.eval_every_steps and step % config.eval_every_steps == 0 and step < config.total_steps:
      run_evals(step, "during training")
  ckpt.close()
  run_evals(step, "after training")

  # ================================================================================ Export
  if config.export_at_end:
    params = multihost_utils.process_allgather(state.params, tiled=True)
    if is_main:
      out = export.save(params, enc_cfg, config, tokenizer_dir, os.path.join(workdir, "export"))
      log.info("exported HF + sentence-transformers model to %s", out)
  writer.close()


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
