"""Joining the processes of a run, the one way for every entry point (train, embed, evaluate, mine).

Off TPU a multi-process run names its coordinator: `--coordinator host:port --num_processes N --process_id
I` (train) or the environment variables ME5_COORDINATOR, ME5_NUM_PROCESSES, ME5_PROCESS_ID (every entry
point); CPU processes then run their collectives over gloo. A TPU VM or pod slice describes itself.
`ME5_CPU_DEVICES=N` gives each process N simulated CPU devices. Call `initialize` before anything touches a
JAX backend.
"""
from __future__ import annotations

import glob
import importlib.util
import os


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Arguments left None come from ME5_COORDINATOR / ME5_NUM_PROCESSES / ME5_PROCESS_ID."""
  import jax
  env = os.environ
  if env.get("ME5_CPU_DEVICES"):
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", int(env["ME5_CPU_DEVICES"]))
  coordinator = env.get("ME5_COORDINATOR", "") if coordinator is None else coordinator
  if coordinator:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator,
                               int(env.get("ME5_NUM_PROCESSES", "1")) if num_processes is None else num_processes,
                               int(env.get("ME5_PROCESS_ID", "0")) if process_id is None else process_id)
  elif env.get("TPU_WORKER_HOSTNAMES") or env.get("CLOUD_TPU_TASK_ID") or _on_tpu_vm():
    jax.distributed.initialize()  # a TPU VM or pod slice describes itself (metadata server or env)


def _on_tpu_vm() -> bool:
  """TPU chips attached, as JAX's own cluster detection sees them: /dev/accel* (TPU v2-v4) or /dev/vfio/N
  (v5e and later), with libtpu installed. A GCE TPU VM sets no environment variable to say so."""
  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")) and bool(importlib.util.find_spec("libtpu"))
