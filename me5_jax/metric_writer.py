"""Training metrics: `WORKDIR/metrics.jsonl` (one JSON object per logged step), TensorBoard event files,
and a console line with throughput, MFU and ETA. Silent on every process but 0."""
from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from typing import Any, Mapping

from data_pipelines import batch as batch_contract
from me5_jax.variants import EncoderConfig

log = logging.getLogger("me5_jax.train")
_TB_ILLEGAL = re.compile(r"[^\w/.-]")  # TensorBoard tag characters; "p@1/de:e" → "p_1/de_e"

# Dense bf16 peak FLOP/s per device, for the MFU estimate; unknown kinds (CPU) report no MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
              "TPU v5p": 459e12, "TPU v5": 459e12, "TPU v6 lite": 918e12}


def peak_flops(device) -> float:
  kind = getattr(device, "device_kind", "")
  return next((v for k, v in PEAK_FLOPS.items() if k in kind), 0.0)


def flops_per_sequence(cfg: EncoderConfig, seq_len: int) -> float:
  """Training FLOPs (forward + backward = 3× forward) of one sequence: 2 per weight per token for the
  matmuls (embedding lookups are free) plus the attention score and context matmuls."""
  d, f, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
  matmul_params = n * (4 * d * d + 2 * d * f)
  forward = 2 * matmul_params * seq_len + n * 4 * seq_len * seq_len * d
  return 3.0 * forward


def batch_flops(batch, cfg: EncoderConfig, process_count: int = 1) -> float:
  """Training FLOPs of the rows a (host-local) batch really encodes, packed or bucketed, on every host."""
  return process_count * sum(x.size // x.shape[-1] * flops_per_sequence(cfg, x.shape[-1])
                             for x in batch_contract.token_arrays(batch))


class MetricWriter:
  def __init__(self, workdir: str, enabled: bool = True, start_step: int = 0):
    """`start_step`: the step the run starts (or resumes) from. Records of later steps, written by a run
    that was killed after that step's checkpoint, are dropped, so every step appears once."""
    self.enabled = enabled
    self.t0, self.step0 = time.time(), None
    if not enabled:
      return
    path = os.path.join(workdir, "metrics.jsonl")
    kept = []
    if start_step and os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        kept = [line for line in f if line.endswith("\n") and json.loads(line)["step"] <= start_step]
    self.jsonl = open(path, "w", encoding="utf-8")
    self.jsonl.writelines(kept)
    self.tb = _summary_writer(os.path.join(workdir, "tensorboard"), purge_step=start_step + 1 if start_step else None)

  def write(self, step: int, metrics: Mapping[str, Any], prefix: str = "") -> None:
    if not self.enabled:
      return
    flat = _flatten(metrics, prefix)
    self.jsonl.write(json.dumps({"step": step, **flat}) + "\n")
    self.jsonl.flush()
    for k, v in flat.items():
      if isinstance(v, (int, float)) and not isinstance(v, bool):
        self.tb.add_scalar(_TB_ILLEGAL.sub("_", k), v, step)
    self.tb.flush()

  def console(self, step: int, total: int, metrics: Mapping[str, Any], rates: Mapping[str, Any]) -> None:
    if self.step0 is None:
      self.step0, self.t0 = step, time.time()
      eta = ""
    else:
      per_step = (time.time() - self.t0) / max(step - self.step0, 1)
      eta = f" eta {_duration(per_step * (total - step))}"
    mfu = f" mfu {rates['mfu']:.1%}" if rates.get("mfu") else ""
    log.info("step %d/%d loss %.4f acc %.3f lr %.2e gnorm %.3f | %.1f seq/s %.2fs/step%s%s", step, total,
             metrics["loss"], metrics.get("accuracy", float("nan")), metrics["learning_rate"],
             metrics["grad_norm"], rates["seq_per_s"], rates["step_time_s"], mfu, eta)

  def close(self) -> None:
    if self.enabled:
      self.jsonl.close()
      self.tb.close()


def _summary_writer(logdir: str, purge_step: int | None):
  """tensorboardX's SummaryWriter. tensorboardX imports torch when it is installed (seconds of startup),
  only to accept torch tensors, which we never pass: torch is hidden while it imports, unless loaded."""
  hide = "torch" not in sys.modules
  if hide:
    sys.modules["torch"] = None  # makes `import torch` raise ImportError
  try:
    from tensorboardX import SummaryWriter
  finally:
    if hide:
      del sys.modules["torch"]
  return SummaryWriter(logdir, purge_step=purge_step)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _duration(seconds: float) -> str:
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
