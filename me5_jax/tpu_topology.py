"""TPU slices by the names they are sold under (v5e-16, v5p-256, v6e-64), as devices that XLA:TPU can compile
for on a host without TPUs: `jax.experimental.topologies` with libtpu (the `tpu-aot` extra), no chips needed.

Accepted names: `GEN-N` with GEN in v5e, v5p, v6e and N as Google counts it (v5e/v6e: chips; v5p:
TensorCores, two per chip, so v5p-256 is 128 chips in a 4x4x8 torus), or libtpu's own `GEN:AxB[xC]` chip
grid (`v5e:4x4`, `v5p:4x4x8`). One jax device per chip (v5p's two cores are one megacore device).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import re

from me5_jax.metric_writer import PEAK_FLOPS


@dataclasses.dataclass(frozen=True)
class Generation:
  device_kind: str          # jax's device_kind, which also keys metric_writer.PEAK_FLOPS
  hbm_gib: float            # per chip
  cores_per_chip: int       # what the N of a slice name counts
  grids: dict[int, str]     # chips → the standard slice shape

  @property
  def peak_flops(self) -> float:
    return PEAK_FLOPS[self.device_kind]


_GRIDS_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_GRIDS_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
             512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16", 8960: "16x20x28"}
GENERATIONS = {
    "v5e": Generation("TPU v5 lite", 16, 1, _GRIDS_2D),
    "v5p": Generation("TPU v5", 95, 2, _GRIDS_3D),
    "v6e": Generation("TPU v6 lite", 32, 1, _GRIDS_2D),
}


@dataclasses.dataclass(frozen=True)
class Slice:
  name: str                 # as given
  generation: Generation
  grid: str                 # chip grid, e.g. "4x4x8"
  chips: int

  @property
  def libtpu_name(self) -> str:
    return f"{next(k for k, g in GENERATIONS.items() if g is self.generation)}:{self.grid}"


def parse(name: str) -> Slice:
  """`v5p-256` or `v5p:4x4x8` → Slice; a ValueError naming the accepted forms otherwise."""
  forms = (f"accepted: GEN-N (GEN in {', '.join(GENERATIONS)}; e.g. v5e-16, v5p-256, v6e-64) "
           "or GEN:AxB[xC] (e.g. v5e:4x4, v5p:4x4x8)")
  m = re.fullmatch(r"(v\d[a-z])([-:])([\dx]+)", name.strip().lower())
  if not m or m.group(1) not in GENERATIONS:
    raise ValueError(f"--topology={name!r}: unknown TPU slice; {forms}")
  gen_name, sep, size = m.groups()
  gen = GENERATIONS[gen_name]
  if sep == ":":
    dims = [int(d) for d in size.split("x") if d]
    if len(dims) != len(next(iter(gen.grids.values())).split("x")) or min(dims) < 1:
      raise ValueError(f"--topology={name!r}: {gen_name} grids have "
                       f"{len(next(iter(gen.grids.values())).split('x'))} dimensions; {forms}")
    chips = 1
    for d in dims:
      chips *= d
    return Slice(name, gen, size, chips)
  if not size.isdigit() or int(size) % gen.cores_per_chip or int(size) // gen.cores_per_chip not in gen.grids:
    sizes = ", ".join(f"{gen_name}-{c * gen.cores_per_chip}" for c in gen.grids)
    raise ValueError(f"--topology={name!r}: {gen_name} slices are {sizes}")
  chips = int(size) // gen.cores_per_chip
  return Slice(name, gen, gen.grids[chips], chips)


def devices(tpu_slice: Slice) -> list:
  """The slice's devices, from libtpu, on any host. A missing libtpu is a one-line error naming the extra."""
  if importlib.util.find_spec("libtpu") is None:
    raise RuntimeError("--topology needs libtpu, which is not installed: pip install -e '.[tpu-aot]' "
                       "(jax[tpu] for the installed jax)")
  # libtpu takes a host-wide lock file when it loads, so without this a second compiling process (or a
  # test next to a run) fails with "Internal error when accessing libtpu multi-process lockfile".
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  topology = topologies.get_topology_desc(topology_name=tpu_slice.libtpu_name, platform="tpu")
  return list(topology.devices)
