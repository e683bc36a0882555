"""Batches built by worker processes, in the order and with the state of the InputPipeline alone.

    with ReadWorkers(pipeline, num_workers=4) as it:   # same API as the pipeline: next, get_state, ...
      batch = next(it)

Why our own processes rather than grain's DataLoader: the mixture's plan for step t depends on the
per-source counts consumed by every earlier step (data_pipelines.mixture), so plans are made here, in step
order, from the pipeline's sampler (hashes over a few thousand rows: cheap). What costs, reading and
decoding records, checking them, joining prefix and ids or tokenizing, padding or packing and hashing, is a
pure function of the plan (`InputPipeline.build`), so any worker can build any step. Workers take plans
from one queue (whoever is free) and the batches are handed out in step order; agreeing shapes with other
hosts and counting skipped records (`InputPipeline.finish`) stay in this process, in step order. So the
batches, `get_state()` and `bad_records` are those of the pipeline alone, for any number of workers and
hosts, and resuming from a saved state is exact.

Workers are spawned (not forked: the parent runs JAX's threads) and each gets a copy of the pipeline
(sources reopen their files; `InputPipeline.__getstate__`). A worker that dies or fails makes `next` raise,
naming it, instead of waiting forever.
"""
from __future__ import annotations

import collections
import logging
import multiprocessing
import queue
import time
import traceback

from data_pipelines.input_pipeline import BatchesAhead, InputPipeline

log = logging.getLogger(__name__)
POLL_S = 1.0  # how often a wait for a batch checks that the workers are alive


def _work(pipeline: InputPipeline, tasks, results) -> None:
  """A worker's loop: (step number, plan) → (step number, local batch, skipped records, error text), until
  told to stop (None) or its parent is gone (a SIGKILLed trainer must not leave workers behind)."""
  parent = multiprocessing.parent_process()
  while True:
    try:
      task = tasks.get(timeout=POLL_S)
    except queue.Empty:
      if parent is not None and not parent.is_alive():
        return
      continue
    if task is None:
      return
    number, plan = task
    try:
      results.put((number, *pipeline.build(plan), None))
    except Exception:  # noqa: BLE001 -- handed to the consumer, which raises it
      results.put((number, None, None, traceback.format_exc()))


class ReadWorkers(BatchesAhead):
  """`num_workers` processes building the pipeline's batches, up to `depth` per worker ahead of the step.
  Restore state into the InputPipeline before wrapping it."""

  def __init__(self, pipeline: InputPipeline, num_workers: int, depth: int = 2):
    if num_workers < 1:
      raise ValueError(f"read workers must be >= 1, got {num_workers}")
    self.pipeline = pipeline
    self._ahead = num_workers * depth
    context = multiprocessing.get_context("spawn")
    self._tasks, self._results = context.Queue(), context.Queue()
    self._workers = [context.Process(target=_work, args=(pipeline, self._tasks, self._results),
                                     name=f"read_worker_{i}", daemon=True) for i in range(num_workers)]
    for worker in self._workers:
      worker.start()
    log.info("%d read worker processes (pids %s), %d batches ahead", num_workers,
             " ".join(str(w.pid) for w in self._workers), self._ahead)
    self._planned = collections.deque()  # (number, state and epochs after it) of the plans sent, oldest first
    self._done: dict[int, tuple] = {}    # results that came before their turn
    self._sent = 0
    self._report = self._snapshot()
    self._error: Exception | None = None

  def _send(self) -> None:
    while len(self._planned) < self._ahead:
      plan = self.pipeline.sampler.next_plan()
      self._tasks.put((self._sent, plan))
      self._planned.append((self._sent, self.pipeline.get_state(), self.pipeline.epochs()))
      self._sent += 1

  def _result(self, number: int) -> tuple:
    while number not in self._done:
      try:
        got = self._results.get(timeout=POLL_S)
      except queue.Empty:
        dead = [w for w in self._workers if not w.is_alive()]
        if dead:
          raise RuntimeError(f"read worker {dead[0].name} exited (status {dead[0].exitcode}) without "
                             "handing over a batch") from None
        continue
      self._done[got[0]] = got[1:]
    return self._done.pop(number)

  def __next__(self) -> dict:
    if self._error is not None:
      raise self._error
    try:
      self._send()
      number, state, epochs = self._planned.popleft()
      batch, bad, error = self._result(number)
      if error is not None:
        raise RuntimeError(f"read worker failed building batch {number}:\n{error}")
    except Exception as e:
      self._error = e
      raise
    batch = self.pipeline.finish(batch, bad)
    self._report = (state, self.pipeline.bad_records, epochs)
    return batch

  def close(self, timeout_s: float = 30.0) -> None:
    """Stops the workers (each finishes the batch it is building, whose result is dropped: a worker
    cannot exit before its results are read); terminates those still running after `timeout_s`."""
    for _ in self._workers:
      self._tasks.put(None)
    deadline = time.monotonic() + timeout_s
    while any(w.is_alive() for w in self._workers) and time.monotonic() < deadline:
      try:
        self._results.get(timeout=0.1)
      except queue.Empty:
        pass
    for worker in self._workers:
      if worker.is_alive():
        log.warning("read worker %s still running after %.0f s; terminating it", worker.name, timeout_s)
        worker.terminate()
      worker.join(5)
    self._tasks.cancel_join_thread()
    self._results.cancel_join_thread()
