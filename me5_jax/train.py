"""`python -m me5_jax.train --config configs/<size>.py[:stage] --workdir DIR [--config.key=value ...]`

One linear loop: distributed → config → mesh → model source → input → sharded state → step → loop
(metrics, checkpoints, evals) → export. The same command runs on a TPU pod (every worker runs it), on a
GPU box and on CPU with simulated devices (`ME5_CPU_DEVICES=8`).

Resume order: the newest restorable checkpoint in WORKDIR/checkpoints, else `init_checkpoint` (an HF
folder), else a fresh init of `model_variant`. SIGTERM (preemption) saves a checkpoint and exits 0. A
NaN/Inf loss stops the run naming the step before anything from that step is saved.
"""
from __future__ import annotations

import logging
import os
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
  elif os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("CLOUD_TPU_TASK_ID"):
    jax.distributed.initialize()  # a TPU pod slice describes itself


def main(argv) -> None:
  del argv
  init_distributed()
  import jax
  import numpy as np
  from jax.experimental import multihost_utils

  from me5_jax import checkpoint, config as config_lib, evals, hf_io, inputs, sharding, train_step
  from me5_jax.metric_writer import MetricWriter, flops_per_sequence, peak_flops
  from me5_jax.tokenize import Tokenizer

  logging.basicConfig(level=logging.INFO if jax.process_index() == 0 else logging.WARNING,
                      format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
  logging.getLogger("absl").setLevel(logging.WARNING)
  is_main = jax.process_index() == 0

  # ================================================================================ Config
  config, workdir = FLAGS.config, os.path.abspath(FLAGS.workdir)
  config_lib.validate(config)
  os.makedirs(workdir, exist_ok=True)
  if is_main:
    config_lib.save(config, os.path.join(workdir, "config.json"))

  # ================================================================================ Mesh
  mesh = sharding.make_mesh(config)
  log.info("mesh %s over %d devices in %d processes (%s)", dict(mesh.shape), jax.device_count(),
           jax.process_count(), jax.devices()[0].device_kind)

  # ================================================================================ Model source
  model_dir, enc_cfg, host_params = inputs.model_source(config)
  enc_cfg = train_step.encoder_config(enc_cfg, config)
  train_step.check_config(config, mesh)  # batch vs mesh, GradCache chunking: before any data or compile
  tokenizer = Tokenizer.from_dir(config.tokenizer or model_dir)

  # ================================================================================ Input
  pipeline = inputs.input_pipeline(config, tokenizer)

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
    state = train_step.init_train_state(enc_cfg, config, mesh, host_params)
    log.info("initialised from %s", model_dir or f"scratch ({config.model_variant})")
  del host_params
  step_fn = train_step.make_train_step(enc_cfg, config, mesh)

  # ================================================================================ Evals & logging
  writer = MetricWriter(workdir, enabled=is_main)
  evaluator = evals.Evaluator(config, tokenizer, enc_cfg, workdir)
  seqs_per_step = config.batch_size * (2 + config.num_hard_negatives)
  flops_per_step = seqs_per_step * flops_per_sequence(enc_cfg, (config.query_max_length + config.passage_max_length) // 2)
  peak = config.peak_flops_per_device or peak_flops(jax.devices()[0])

  def run_evals(step: int, tag: str) -> None:
    results = evaluator(state.params, step)
    if results:
      writer.write(step, results, prefix="eval/")
      log.info("eval %s step %d: %s", tag, step, evaluator.summary(results))

  if start_step == 0:
    run_evals(0, "before training")

  # ================================================================================ Loop
  stop = {"signal": None}
  signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))
  batch = next(pipeline)
  step, t_last, step_last = start_step, time.time(), start_step
  log.info("training steps %d → %d, global batch %d", start_step, config.total_steps, config.batch_size)
  while step < config.total_steps:
    state, metrics = step_fn(state, sharding.shard_batch(batch, mesh))
    step += 1
    data_state = pipeline.get_state()  # position after `step` batches: saved with this step's state
    if step < config.total_steps:
      batch = next(pipeline)  # host work overlaps the device's step
    metrics = jax.device_get(metrics)
    if not np.isfinite(metrics["loss"]):
      ckpt.close()
      raise FloatingPointError(f"loss is {metrics['loss']} at step {step}: stopping; the last good "
                               f"checkpoint is step {max(ckpt.steps(), default=0)} in {ckpt.directory}")
    if step % config.log_every_steps == 0 or step == config.total_steps:
      dt = (time.time() - t_last) / (step - step_last)
      t_last, step_last = time.time(), step
      rates = {"seq_per_s": seqs_per_step / dt, "step_time_s": dt,
               "mfu": flops_per_step / dt / (peak * jax.device_count()) if peak else None}
      writer.write(step, {**{k: float(v) for k, v in metrics.items()}, "lr": float(metrics["learning_rate"]),
                          **rates, "bad_records": pipeline.bad_records})
      writer.console(step, config.total_steps, metrics, rates)
    if step % config.checkpoint_every_steps == 0 or step == config.total_steps:
      ckpt.save(step, state, data_state)
    if config.eval_every_steps and step % config.eval_every_steps == 0 and step < config.total_steps:
      run_evals(step, "during training")
    preempted = stop["signal"] is not None
    if jax.process_count() > 1:  # every process must stop at the same step
      preempted = bool(multihost_utils.process_allgather(np.array(preempted)).any())
    if preempted and step < config.total_steps:
      log.warning("SIGTERM at step %d: saving a checkpoint and exiting", step)
      ckpt.save(step, state, data_state)
      ckpt.close()
      writer.close()
      return
  ckpt.close()
  run_evals(step, "after training")

  # ================================================================================ Export
  if config.export_at_end:
    params = multihost_utils.process_allgather(state.params, tiled=True)
    if is_main:
      out = hf_io.save_pretrained(params, enc_cfg, os.path.join(workdir, "export"),
                                  tokenizer_dir=config.tokenizer or model_dir,
                                  max_seq_length=config.passage_max_length)
      log.info("exported HF + sentence-transformers model to %s", out)
  writer.close()


if __name__ == "__main__":
  app.run(main)
