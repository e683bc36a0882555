"""The collectives of a compiled XLA program, read from its optimized HLO text, counted per executed step.

XLA's `cost_analysis()` counts a while loop's body once, and so would a plain grep of the HLO; GradCache's
chunk loops (`lax.map`, `lax.scan`) run their bodies once per chunk. Each computation here gets a
multiplicity: ENTRY runs once, a while body runs its trip count times its caller's multiplicity (the trip
count is the bound in the loop's condition, `i < N`, which is how `lax.scan`/`lax.map` lower), and every
other called computation (fusions, reducers, branches) runs as often as its caller. Async pairs are counted
at their `-start` op. Bytes are the op's output per device (for an all-gather: the gathered array).
"""
from __future__ import annotations

import collections
import dataclasses
import re

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) .*\{$")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%\S+ = (.+?) ([a-z][a-z0-9-]*)\(")
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16)\[([\d,]*)\]")
_CALLEE = re.compile(r"\b(condition|body|calls|to_apply)=%([\w.-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")


@dataclasses.dataclass
class Collective:
  """One kind's ops: `static` in the program text, `executed` per step (loops unrolled), bytes per step."""
  static: int = 0
  executed: int = 0
  bytes_per_step: int = 0
  in_loops: int = 0  # executions per step that come from inside while loops


def _array_bytes(shape_text: str) -> list[int]:
  out = []
  for dtype, dims in _ARRAY.findall(shape_text):
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    out.append(n * _DTYPE_BYTES.get(dtype, 4))
  return out


def _parse(hlo_text: str):
  """computation name → (its lines, is ENTRY)."""
  comps, name = {}, None
  for line in hlo_text.splitlines():
    m = _COMPUTATION.match(line)
    if m:
      name = m.group(1)
      comps[name] = ([], line.startswith("ENTRY"))
    elif name is not None and line.startswith("  "):
      comps[name][0].append(line)
  return comps


def _trip_count(condition_lines: list[str]) -> int:
  """The N of a `i < N` loop condition: the largest integer constant in it (1 if there is none)."""
  consts = [int(c) for line in condition_lines for c in re.findall(r"s32\[\](?:\{[^}]*\})? constant\((\d+)\)", line)]
  return max(consts, default=1)


def _calls(comps) -> dict[str, list[tuple[str, int]]]:
  """computation → [(callee, runs of the callee per run of this computation)]."""
  edges = {}
  for name, (lines, _) in comps.items():
    edges[name] = []
    for line in lines:
      callees = {callee: role for role, callee in _CALLEE.findall(line)}
      for branch in _BRANCHES.findall(line):
        callees.update((callee, "branch") for callee in re.findall(r"%([\w.-]+)", branch))
      cond = next((c for c, role in callees.items() if role == "condition"), None)
      trips = _trip_count(comps[cond][0]) if " while(" in line and cond in comps else 1
      edges[name] += [(c, trips if role == "body" else 1) for c, role in callees.items() if c in comps]
  return edges


def multiplicities(hlo_text: str) -> dict[str, int]:
  """How many times each computation runs per execution of the program."""
  comps = _parse(hlo_text)
  edges = _calls(comps)
  callers = collections.Counter(c for calls in edges.values() for c, _ in calls)
  mult = collections.Counter({name: 1 for name, (_, entry) in comps.items() if entry})
  ready = [name for name in comps if not callers[name]]
  while ready:  # Kahn's order: a computation is final once all its callers have added to it
    name = ready.pop()
    for callee, times in edges[name]:
      mult[callee] += mult[name] * times
      callers[callee] -= 1
      if not callers[callee]:
        ready.append(callee)
  return dict(mult)


def collectives(hlo_text: str) -> dict[str, Collective]:
  """Per kind of collective: static ops, executions and bytes per step (see the module docstring)."""
  comps, mult = _parse(hlo_text), multiplicities(hlo_text)
  out = {kind: Collective() for kind in KINDS}
  for name, (lines, entry) in comps.items():
    times = mult.get(name, 0)
    for line in lines:
      m = _INSTRUCTION.match(line)
      if not m:
        continue
      shape, op = m.groups()
      kind = op.removesuffix("-start")
      if kind not in out or op.endswith("-done"):
        continue
      sizes = _array_bytes(shape)
      # all-gather-start / collective-permute-start return (operand, output, ...): the output is the 2nd.
      nbytes = sizes[1] if op in ("all-gather-start", "collective-permute-start") and len(sizes) > 1 else sum(sizes)
      c = out[kind]
      c.static += 1
      c.executed += times
      c.bytes_per_step += times * nbytes
      if not entry and times > 1:
        c.in_loops += times
  return out


def output_shapes(hlo_text: str, kind: str) -> list[str]:
  """The output types of every `kind` op in the program, e.g. ['f32[32,2,64]{...}', ...] (for tests)."""
  shapes = []
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.match(line)
    if m and m.group(2).removesuffix("-start") == kind:
      shapes.append(m.group(1))
  return shapes


def table(stats: dict[str, Collective]) -> str:
  rows = [f"  {'collective':20s}{'in HLO':>8s}{'per step':>10s}{'in loops':>10s}{'MiB/step':>12s}"]
  for kind, c in stats.items():
    if c.static:
      rows.append(f"  {kind:20s}{c.static:8d}{c.executed:10d}{c.in_loops:10d}{c.bytes_per_step / 2**20:12.1f}")
  return "\n".join(rows)
