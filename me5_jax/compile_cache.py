"""JAX's persistent compilation cache, on by default for the command-line tools.

A CLI compiles the same programs run after run (the train step, one encoder program per length bucket);
on CPU a mE5-small step takes about a minute to compile, which the cache turns into seconds on the next
run. The folder is $JAX_COMPILATION_CACHE_DIR when set, else $ME5_CACHE/jax (default ~/.cache/me5_jax/jax);
ME5_COMPILE_CACHE=0 turns it off.
"""
from __future__ import annotations

import os


def enable() -> str | None:
  """Turns the cache on (before the first compile); returns its folder, or None when turned off."""
  import jax

  from me5_jax import fetch
  if os.environ.get("ME5_COMPILE_CACHE", "1") == "0":
    return None
  folder = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(fetch.cache_dir(), "jax")
  jax.config.update("jax_compilation_cache_dir", folder)
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  return folder
