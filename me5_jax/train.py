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

import logging
import os
import signal
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from me5_jax import cli, compile_cache, distributed

PROGRAM = "me5_jax.train"  # its `<program>: error:` lines (me5_jax.cli)

config_flags.DEFINE_config_file("config", None, "configs/<name>.py[:arg]", lock_config=True)
flags.DEFINE_string("workdir", None, "run directory: checkpoints, metrics.jsonl, export/")
# Unset, these three come from ME5_COORDINATOR / ME5_NUM_PROCESSES / ME5_PROCESS_ID (me5_jax.distributed).
flags.DEFINE_string("coordinator", None, "host:port of process 0 for multi-process runs off TPU (env ME5_COORDINATOR)")
flags.DEFINE_integer("num_processes", None, "number of processes (env ME5_NUM_PROCESSES, default 1)")
flags.DEFINE_integer("process_id", None, "this process's index (env ME5_PROCESS_ID, default 0)")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS
log = logging.getLogger("me5_jax.train")


class TrainError(Exception):
  """Why the run cannot start or go on, in one line (a bad config key or file, a non-finite step).
  `main` prints it as `me5_jax.train: error: ...` and exits with `status` (`me5_jax.cli`: 2 for bad input,
  1 for a failure while running); in-process callers catch it."""

  def __init__(self, message: str, status: int = cli.BAD_INPUT):
    super().__init__(message)
    self.status = status


def main(argv) -> None:
  del argv
  distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
  import jax
  # absl's handler already sits on the root logger (so basicConfig alone would do nothing): replace it.
  logging.basicConfig(level=logging.INFO if jax.process_index() == 0 else logging.WARNING, force=True,
                      format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
  logging.getLogger("absl").setLevel(logging.WARNING)
  compile_cache.enable()
  try:
    train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except TrainError as e:
    sys.exit(cli.error(PROGRAM, e, e.status))


def train_and_evaluate(config, workdir: str) -> None:
  """The whole run in this process: resume or initialise, train to `config.total_steps` (or to a SIGTERM),
  evaluate, export. Call it after `jax.distributed` is initialised (multi-process) and before anything
  else has picked devices; raises TrainError for bad input and non-finite steps.

  The loop never waits on the device between steps: step n+1 is dispatched before step n's metrics are
  read (they are read, checked for finiteness and logged one step late), and the next global batch is
  already on the devices (`inputs.DeviceFeed`). It waits only where it must: before a checkpoint (that
  step's loss must be finite before anything of it is saved), an evaluation, the end of a profile, and, in
  multi-process runs, where the processes agree on a SIGTERM (log and checkpoint steps, so every process
  stops at the same step).
  """
  import jax
  import numpy as np
  from jax.experimental import multihost_utils

  from me5_jax import checkpoint, config as config_lib, dispatch, evals, export, inputs, profiling, sharding, train_step
  from me5_jax.metric_writer import MetricWriter, batch_flops, peak_flops
  from me5_jax.tokenize import Tokenizer

  is_main = jax.process_index() == 0
  if "://" in workdir:  # os.path would quietly make a local folder named "gs:" on every host
    raise TrainError(f"--workdir {workdir}: URLs are not supported; every process needs the same directory, "
                     "e.g. a bucket mounted with gcsfuse (launch/tpu_pod.sh --workdir gs://... mounts it on every "
                     "worker) or an NFS share")
  workdir = os.path.abspath(workdir)
  # ================================================================================ Config & mesh
  try:  # bad input: one line naming the key or file, before anything is written or compiled
    config_lib.validate(config)
    profile = profiling.parse_steps(config.profile_steps)
    mesh = sharding.make_mesh(config)
    train_step.check_config(config, mesh)  # batch vs mesh, GradCache chunking
    model_dir, enc_cfg, load_params = inputs.model_source(config)
    tokenizer_dir = config.tokenizer or model_dir
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    enc_cfg = train_step.encoder_config(enc_cfg, config)
    # ============================================================================== Input
    pipeline = inputs.input_pipeline(config, tokenizer, mesh)
  except (ValueError, KeyError, FileNotFoundError) as e:
    raise TrainError(e.args[0] if isinstance(e, KeyError) else str(e)) from None
  log.info("mesh %s over %d devices in %d processes (%s); attention %s, attention dropout %g%s",
           dict(mesh.shape), jax.device_count(), jax.process_count(), jax.devices()[0].device_kind,
           enc_cfg.attention_impl, enc_cfg.attention_dropout,
           " (softmax with dropout while training)" if enc_cfg.attention_dropout else "")
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
      raise TrainError(str(e)) from None
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
  multi = jax.process_count() > 1

  def run_evals(step: int, tag: str) -> None:
    results = evaluator(state.params, step)
    if results:
      writer.write(step, results, prefix="eval/")
      log.info("eval %s step %d: %s", tag, step, evaluator.summary(results))

  def stop_non_finite(step: int, what: str) -> None:
    raise TrainError(f"{what} at step {step}: stopping. The newest checkpoint is step "
                     f"{max(ckpt.steps(), default=0)} in {ckpt.directory}; lower learning_rate or check the data",
                     cli.FAILED)

  timer = {"t": time.time(), "step": start_step, "flops": 0.0}

  def finish(done) -> None:
    """Reads a dispatched step's metrics (with 2 steps in flight, the device has the next one queued by
    now), stops on a non-finite loss or gradient norm, logs."""
    step, metrics, item = done
    metrics = jax.device_get(metrics)
    if not (np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])):
      stop_non_finite(step, f"loss {metrics['loss']}, gradient norm {metrics['grad_norm']}")
    timer["flops"] += item.flops
    if step % config.log_every_steps == 0 or step == config.total_steps:
      elapsed = time.time() - timer["t"]
      dt = elapsed / (step - timer["step"])
      rates = {"seq_per_s": seqs_per_step / dt, "step_time_s": dt,
               "mfu": timer["flops"] / elapsed / (peak * jax.device_count()) if peak else None}
      timer.update(t=time.time(), step=step, flops=0.0)
      writer.write(step, {**{k: float(v) for k, v in metrics.items()}, "lr": float(metrics["learning_rate"]),
                          **rates, "bad_records": item.bad_records})
      writer.console(step, config.total_steps, metrics, rates)

  if start_step == 0:
    run_evals(0, "before training")

  # ================================================================================ Loop
  stop, tracing = {"signal": None}, False
  in_flight = dispatch.InFlight(config.steps_in_flight or dispatch.max_in_flight(), finish=finish)
  previous_handler = signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))
  feed = None
  try:
    feed = inputs.DeviceFeed(pipeline, mesh, lambda b: batch_flops(b, enc_cfg, jax.process_count()),
                             depth=config.prefetch_batches, read_workers=config.read_workers)
    step = start_step
    log.info("training steps %d → %d, global batch %d, at most %d step(s) in flight", start_step,
             config.total_steps, config.batch_size, in_flight.limit)
    while step < config.total_steps:
      if profile and step + 1 == profile[0]:
        jax.profiler.start_trace(os.path.join(workdir, "profile"))
        tracing = True
      item = feed.pop()
      in_flight.admit()  # reads (finishes) the previous step's metrics where the bound says so
      state, metrics = step_fn(state, item.batch)  # dispatched; runs while the host goes on
      step += 1
      in_flight.add((step, metrics, item))
      if step < config.total_steps:
        feed.fill()  # the next batch: built and copied to the devices while this step runs
      checkpoint_due = step % config.checkpoint_every_steps == 0 or step == config.total_steps
      eval_due = bool(config.eval_every_steps) and step % config.eval_every_steps == 0 and step < config.total_steps
      preempted = stop["signal"] is not None
      if multi:  # every process must stop at the same step; agreeing is a collective, so only where we sync
        if checkpoint_due or step % config.log_every_steps == 0:
          preempted = bool(multihost_utils.process_allgather(np.array(preempted)).any())
        else:
          preempted = False
      profile_ends = tracing and (step == profile[0] + profile[1] - 1 or step == config.total_steps)
      if checkpoint_due or preempted or eval_due or profile_ends:
        in_flight.drain()  # this step's loss and gradient must be finite before anything of it is saved
      if profile_ends:
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        tracing = False
        log.info("profile of steps %d-%d written to %s", profile[0], step, os.path.join(workdir, "profile"))
      if checkpoint_due or preempted:
        if not all_finite(state.params):  # finite loss and gradients, but an update overflowed
          stop_non_finite(step, "non-finite parameters")
        ckpt.save(step, state, item.data_state)
      if preempted and step < config.total_steps:
        log.warning("SIGTERM at step %d: saved a checkpoint, exiting", step)
        writer.close()
        return
      if eval_due:
        run_evals(step, "during training")
    in_flight.drain()
  except BaseException:
    writer.close()
    raise
  finally:  # also on an error (a non-finite step, an unexpected exception): the input thread stops and
    # earlier good saves complete; nothing of a failed step is saved
    signal.signal(signal.SIGTERM, previous_handler)
    if tracing:  # stopped early (non-finite step, SIGTERM): the trace of the steps so far
      jax.profiler.stop_trace()
    if feed is not None:
      feed.close()
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
  app.run(main, flags_parser=cli.absl_flags_parser(PROGRAM))
