"""Input pipelines for me5_jax: TFDS builders from users' files, a Bible translation source, and the
read side used in training (no TensorFlow on it).

Build: `python -m data_pipelines.build --source NAME --files F... --data-dir DIR` (builders.build).
Read:  `open_source(data_dir, name, split)` → random-access records (source.py).
"""
from data_pipelines.source import DATASETS, Source, dataset_path, open_source

__all__ = ["DATASETS", "Source", "dataset_path", "open_source"]
