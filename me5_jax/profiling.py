"""jax.profiler traces on demand, and the top operations of a trace by device time.

`trace(dir)` writes a trace viewable in TensorBoard's profile plugin or Perfetto (`DIR/plugins/profile/
<run>/*.xplane.pb`, plus a Perfetto `*.trace.json.gz` when `perfetto=True`). `top_ops(dir)` reads it back
with `jax.profiler.ProfileData`: on an accelerator it sums the events of the device planes' "XLA Ops"
lines, on CPU the host events that carry an `hlo_op` stat (XLA:CPU runs each op as a thunk on a host
thread), so the same summary serves the GPU benchmark and a CPU profile.
"""
from __future__ import annotations

import collections
import contextlib
import glob
import os

import jax


@contextlib.contextmanager
def trace(log_dir: str, perfetto: bool = False):
  """Everything dispatched inside, and finished before the end, lands in the trace (block inside)."""
  os.makedirs(log_dir, exist_ok=True)
  jax.profiler.start_trace(log_dir, create_perfetto_trace=perfetto)
  try:
    yield
  finally:
    jax.profiler.stop_trace()


def parse_steps(spec: str) -> tuple[int, int] | None:
  """"START,COUNT" (the `profile_steps` config key) → (first step, number of steps); "" → None."""
  if not spec:
    return None
  try:
    start, count = (int(x) for x in spec.split(","))
  except ValueError:
    raise ValueError(f"config key profile_steps={spec!r}: expected \"START,COUNT\", e.g. \"10,3\"") from None
  if start < 1 or count < 1:
    raise ValueError(f"config key profile_steps={spec!r}: START (a step number, from 1) and COUNT must be >= 1")
  return start, count


def top_ops(log_dir: str) -> list[tuple[str, float, int]]:
  """[(op name, total ms, count)] over the newest trace under log_dir, most time first."""
  files = sorted(glob.glob(os.path.join(log_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
  if not files:
    raise FileNotFoundError(f"no *.xplane.pb trace under {log_dir}")
  profile = jax.profiler.ProfileData.from_file(files[-1])
  total_ns: dict[str, float] = collections.defaultdict(float)
  count: dict[str, int] = collections.Counter()
  # Accelerator planes with op timelines; others named /device: carry none (libtpu adds a "/device:CUSTOM:
  # Megascale Trace" plane to every trace once it is loaded, also on a CPU run).
  device_planes = [p for p in profile.planes
                   if p.name.startswith("/device:") and any(line.name == "XLA Ops" for line in p.lines)]
  for plane in device_planes or profile.planes:
    for line in plane.lines:
      if device_planes and line.name != "XLA Ops":
        continue
      for event in line.events:
        if not device_planes and not any(k == "hlo_op" for k, _ in event.stats):
          continue
        total_ns[event.name] += event.duration_ns
        count[event.name] += 1
  ranked = sorted(total_ns, key=total_ns.get, reverse=True)
  return [(name, total_ns[name] / 1e6, count[name]) for name in ranked]


def format_top_ops(ops: list[tuple[str, float, int]], n: int = 20) -> str:
  total = sum(ms for _, ms, _ in ops) or 1.0
  lines = [f"{'ms':>10} {'share':>6} {'count':>6}  op (of {total:.1f} ms of ops)"]
  lines += [f"{ms:10.2f} {ms / total:6.1%} {c:6d}  {name}" for name, ms, c in ops[:n]]
  return "\n".join(lines)
