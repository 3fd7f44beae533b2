"""What the entry points do with a command line before absl parses it.

absl's own ``--help`` exits with status 1 and prints only the flags; ``exit_on_help``
prints the entry point's docstring, the values its flags allow and its flags, and
exits with 0. ``check_config_overrides`` refuses ``--config.<field>`` without
``--config``, which absl would report as an unknown flag.
"""
from __future__ import annotations

import sys
from typing import Mapping, Sequence

from absl import flags

HELP_FLAGS = ("--help", "-h", "-?", "--helpshort", "--helpfull")


def allowed_values(values: Mapping[str, Sequence[str] | str]) -> str:
  """'Allowed values:' and one line per flag or field: its choices, comma-separated."""
  lines = [f"  {name}: {v if isinstance(v, str) else ', '.join(map(str, v))}"
           for name, v in values.items()]
  return "Allowed values:\n" + "\n".join(lines)


def exit_on_help(argv: Sequence[str], doc: str, module_name: str, allowed: str = "") -> None:
  """With a help flag in ``argv``: print ``doc``, ``allowed`` and the flags of
  ``module_name`` (all flags for --helpfull) on stdout and exit with status 0."""
  asked = [arg for arg in argv[1:] if arg in HELP_FLAGS]
  if not asked:
    return
  if "--helpfull" in asked:
    flag_text = flags.FLAGS.get_help()
  else:  # run as a script, absl files the flags under the script's path
    name = sys.argv[0] if module_name == "__main__" else module_name
    flag_text = flags.FLAGS.module_help(name)
  parts = [doc.strip(), allowed, "Flags (--helpfull: every flag):\n" + flag_text]
  print("\n\n".join(p for p in parts if p), flush=True)
  sys.exit(0)


def check_config_overrides(argv: Sequence[str], configs: Sequence[str]) -> None:
  """ValueError when ``argv`` overrides config fields (--config.x=...) without --config."""
  if any(arg == "--config" or arg.startswith("--config=") for arg in argv[1:]):
    return
  overrides = [arg.split("=", 1)[0] for arg in argv[1:]
               if arg.startswith(("--config.", "--noconfig."))]
  if overrides:
    raise ValueError(f"{overrides[0]} overrides a field of the training config, but no "
                     f"--config names it: add --config=NAME, one of {list(configs)}, or "
                     "--config=PATH to a config file")
