"""One bound on the device executions a loop has dispatched and not yet finished, which every loop that
dispatches jitted work obeys (the trainer, in-loop evaluation and inference through `Embedder`, the
benchmarks).

Why a bound at all: JAX dispatches asynchronously, so a loop that never reads its results queues steps
ahead of the devices without limit. XLA:CPU admits up to 32 executions per device
(`max_inflight_computations_per_device` of its PjRt client) and runs the collectives of a multi-device
program as an in-process rendezvous of the devices' threads; queue more than 32 multi-device executions
and the rendezvous deadlocks: XLA logs "may be stuck" after 20 s and aborts the process after 40 s
(`rendezvous.cc: Termination timeout ... only 2 of them arrived`). Measured on the project's 2-core VM
(jax 0.10.2, 8 simulated devices, `tests/dispatch_probe.py`, run by `tests/test_dispatch.py`): a jitted
step with one all-gather queued 300 times back to back aborted in every try; with at most 1, 2, 16 or 32 in
flight it finished; a one-off copy of the probe without this class's limit check aborted at 33 and 64
(BENCHMARKS.md "loop_gap"). That is what `benchmarks/loop_gap.py --steps 60` hit (its
device-floor loop queued all 60; the 30-step run stayed under 32 and passed).

The bound (`max_in_flight`): 1 on the CPU backend with more than one device in the program (the simulated
devices share the host's cores, so queuing ahead buys nothing there and the loop reads each step before
dispatching the next; the next batch is still built while the step runs), 2 elsewhere (GPU/TPU, and one
CPU device: step n+1 is dispatched before step n's results are read, so host work hides behind the device).
The trainer's config key `steps_in_flight` overrides it (1 or 2).
"""
from __future__ import annotations

import collections
from typing import Any, Callable, Iterable

import jax

XLA_CPU_MAX_IN_FLIGHT = 32  # XLA:CPU's per-device queue; no loop of ours may come near it


def max_in_flight(devices: Iterable[jax.Device] | None = None) -> int:
  """The bound for a loop whose executions run on `devices` (default: all local devices)."""
  devices = list(devices if devices is not None else jax.local_devices())
  return 1 if devices[0].platform == "cpu" and len(devices) > 1 else 2


class InFlight:
  """Dispatched executions not yet finished, at most `limit` of them, the one about to be dispatched
  included. `admit()` before each dispatch finishes the oldest ones (`finish(item)`, e.g. reading a step's
  metrics) until one more fits; `add(item)` after it; `drain()` where the loop must wait for everything."""

  def __init__(self, limit: int, finish: Callable[[Any], None] = jax.block_until_ready):
    if not 1 <= limit <= XLA_CPU_MAX_IN_FLIGHT:
      raise ValueError(f"in-flight limit {limit}: must be 1..{XLA_CPU_MAX_IN_FLIGHT}")
    self.limit, self.finish = limit, finish
    self.items: collections.deque = collections.deque()

  def admit(self) -> None:
    while len(self.items) >= self.limit:
      self.finish(self.items.popleft())

  def add(self, item: Any) -> None:
    self.items.append(item)

  def drain(self) -> None:
    while self.items:
      self.finish(self.items.popleft())
