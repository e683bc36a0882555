"""Encoder sizes of the mE5 family in one table, and the mapping to/from Hugging Face `config.json`.

Two architectures share one Flax module (`me5_jax.encoder`): BERT (mE5-small, MiniLM) and XLM-RoBERTa
(mE5-base/large). They differ only in the facts recorded here: LayerNorm epsilon, the padding id, how
position ids are counted, and the token-type vocabulary. Everything else reads an `EncoderConfig`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

ARCHS = ("bert", "xlmr")
HF_MODEL_TYPES = {"bert": "bert", "xlm-roberta": "xlmr", "roberta": "xlmr"}
REMAT_POLICIES = ("none", "full", "dots")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash")  # config key attention_impl; EncoderConfig holds the last three


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """Static description of an encoder. Hashable, so it can be a static jit argument."""
  arch: str = "bert"
  vocab_size: int = 250037
  hidden_size: int = 384
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 1536
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  pad_token_id: int = 0
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  add_pooler: bool = False
  dtype: str = "float32"        # compute dtype of activations and matmuls
  param_dtype: str = "float32"  # dtype the master parameters are stored in
  remat: str = "none"           # rematerialisation of each layer: none | full | dots
  attention_impl: str = "xla"   # xla | cudnn (jax.nn.dot_product_attention) | splash (me5_jax.splash, TPU)

  def __post_init__(self):
    if self.arch not in ARCHS:
      raise ValueError(f"encoder arch must be one of {ARCHS}, got {self.arch!r}")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
    if self.attention_impl not in ATTENTION_IMPLS[1:]:
      raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS[1:]}, got {self.attention_impl!r}")

  @property
  def position_offset(self) -> int:
    """XLM-R counts positions from padding_idx + 1 (and pads at padding_idx); BERT counts from 0."""
    return self.pad_token_id + 1 if self.arch == "xlmr" else 0

  @property
  def max_tokens(self) -> int:
    """Longest input the position table supports."""
    return self.max_position_embeddings - self.position_offset

  def replace(self, **kw: Any) -> "EncoderConfig":
    return dataclasses.replace(self, **kw)

  def num_params(self) -> int:
    d, f, n = self.hidden_size, self.intermediate_size, self.num_layers
    emb = (self.vocab_size + self.max_position_embeddings + self.type_vocab_size) * d + 2 * d
    layer = 4 * (d * d + d) + 2 * d * f + f + d + 4 * d
    return emb + n * layer + (d * d + d if self.add_pooler else 0)


_XLMR = dict(arch="xlmr", vocab_size=250002, max_position_embeddings=514, type_vocab_size=1,
             layer_norm_eps=1e-5, pad_token_id=1)

VARIANTS: dict[str, EncoderConfig] = {
    # mE5-small: BERT body (Multilingual-MiniLM-L12-H384 init) over the XLM-R vocabulary.
    "small": EncoderConfig(),
    "base": EncoderConfig(**_XLMR, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
    "large": EncoderConfig(**_XLMR, hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096),
    # Tiny sizes for tests: few layers, d <= 128, small vocab, so CPU compiles stay in seconds.
    "tiny-bert": EncoderConfig(vocab_size=1000, hidden_size=64, num_layers=2, num_heads=4,
                               intermediate_size=128, max_position_embeddings=128),
    "tiny-xlmr": EncoderConfig(**{**_XLMR, "vocab_size": 1000, "max_position_embeddings": 130},
                               hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128),
}


def get_variant(name: str, **overrides: Any) -> EncoderConfig:
  if name not in VARIANTS:
    raise KeyError(f"unknown encoder variant {name!r}; known: {sorted(VARIANTS)}")
  return VARIANTS[name].replace(**overrides)


def from_hf_config(hf: dict[str, Any], source: str = "config.json") -> EncoderConfig:
  """Builds an EncoderConfig from a parsed HF `config.json` of a BERT or XLM-R model."""
  model_type = hf.get("model_type")
  if model_type not in HF_MODEL_TYPES:
    raise ValueError(f"{source}: model_type {model_type!r} is not supported; "
                     f"me5_jax loads {sorted(HF_MODEL_TYPES)}")
  act = hf.get("hidden_act", "gelu")
  if act != "gelu":
    raise ValueError(f"{source}: hidden_act {act!r} is not supported (only exact 'gelu')")
  missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                         "intermediate_size", "max_position_embeddings") if k not in hf]
  if missing:
    raise ValueError(f"{source}: missing keys {missing}")
  arch = HF_MODEL_TYPES[model_type]
  return EncoderConfig(
      arch=arch,
      vocab_size=hf["vocab_size"],
      hidden_size=hf["hidden_size"],
      num_layers=hf["num_hidden_layers"],
      num_heads=hf["num_attention_heads"],
      intermediate_size=hf["intermediate_size"],
      max_position_embeddings=hf["max_position_embeddings"],
      type_vocab_size=hf.get("type_vocab_size", 2),
      layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
      pad_token_id=hf.get("pad_token_id", 1 if arch == "xlmr" else 0),
      hidden_dropout=hf.get("hidden_dropout_prob", 0.1),
      attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
  )


def to_hf_config(cfg: EncoderConfig) -> dict[str, Any]:
  """The `config.json` contents transformers needs to rebuild this encoder."""
  is_xlmr = cfg.arch == "xlmr"
  return {
      "architectures": ["XLMRobertaModel" if is_xlmr else "BertModel"],
      "model_type": "xlm-roberta" if is_xlmr else "bert",
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "intermediate_size": cfg.intermediate_size,
      "hidden_act": "gelu",
      "hidden_dropout_prob": cfg.hidden_dropout,
      "attention_probs_dropout_prob": cfg.attention_dropout,
      "max_position_embeddings": cfg.max_position_embeddings,
      "type_vocab_size": cfg.type_vocab_size,
      "initializer_range": 0.02,
      "layer_norm_eps": cfg.layer_norm_eps,
      "pad_token_id": cfg.pad_token_id,
      "bos_token_id": 0,
      "eos_token_id": 2,
      "position_embedding_type": "absolute",
      "torch_dtype": "float32",
  }
