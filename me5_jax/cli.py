"""How every command line of the project fails, so scripts and launchers can tell the two kinds apart.

Exit status 2: bad input or usage, i.e. something the user fixes (a flag, a file and its line, a config
key, a model folder); argparse already exits 2 for usage errors. Exit status 1: a failure while running
(a non-finite loss, an index or hub that cannot be reached, a crash). Either way the reason is one line on
stderr, `<program>: error: <message>`, the form argparse uses, where the program is the module run with
`python -m` (`me5_jax.mine`, `data_pipelines.build`, ...).
"""
from __future__ import annotations

import argparse
import re
import sys
from typing import Callable

BAD_INPUT = 2
FAILED = 1


def error(program: str, message: object, status: int = BAD_INPUT) -> int:
  """Prints `<program>: error: <message>` on stderr and returns `status` (for `return` or `sys.exit`)."""
  print(f"{program}: error: {message}", file=sys.stderr, flush=True)
  return status


def parser(program: str, doc: str | None) -> argparse.ArgumentParser:
  """An ArgumentParser whose usage errors read `<program>: error: ...` (exit 2), described by the first
  line of the module docstring `doc`."""
  return argparse.ArgumentParser(prog=program, description=(doc or "").strip().split("\n")[0])


def absl_flags_parser(program: str) -> Callable[[list[str]], list[str]]:
  """A `flags_parser` for `absl.app.run` that fails this way (absl's own prints `FATAL Flags parsing error`
  and exits 1); an override of a key the config lacks names that key (ml_collections raises a bare
  KeyError/AttributeError from inside the parser)."""
  from absl import flags

  def parse(argv: list[str]) -> list[str]:
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      sys.exit(error(program, f"{e} (--helpfull lists the flags)"))
    except (AttributeError, KeyError) as e:
      key = re.findall(r"\w+", str(e))[0]
      arg = next((a.split("=")[0] for a in argv if a.startswith("--config.") and key in a.split("=")[0].split(".")),
                 "--config")
      hint = re.search(r'Did you mean "([^"]+)"', str(e))
      sys.exit(error(program, f"{arg}: the config has no key {key!r}" + (f"; did you mean {hint[1]!r}?" if hint else "")))
  return parse
