"""The suite fails fast: every test runs under pytest-timeout's limit (setup.cfg [tool:pytest]), and a stuck
test fails naming itself and printing the stacks of its threads instead of hanging the run."""
import os
import subprocess
import sys
import threading

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(not os.environ.get("ME5_STUCK_TEST"), reason="deliberately stuck: set ME5_STUCK_TEST=1 to run")
@pytest.mark.timeout(5)
def test_deliberately_stuck():
  threading.Event().wait()  # never set: what a lost collective looks like from Python


def test_the_suite_has_a_default_time_limit(pytestconfig):
  assert float(pytestconfig.getini("timeout")) > 0 and pytestconfig.getini("timeout_method") == "thread"


def test_a_stuck_test_fails_under_its_limit_naming_itself_with_thread_stacks():
  out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        f"{__file__}::test_deliberately_stuck"], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "ME5_STUCK_TEST": "1"}, timeout=120)
  text = out.stdout + out.stderr
  assert out.returncode != 0
  assert "TIMEOUT: tests/test_time_limits.py::test_deliberately_stuck still running after its 5 s limit" in text
  assert "Stack of MainThread" in text and "threading.Event().wait()" in text
