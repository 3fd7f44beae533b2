"""Training configs, one ml_collections file per architecture (``get_config()`` each).

``--config=NAME`` names a file here (experiments/configs/NAME.py); a path to
any config file works too.
"""
from __future__ import annotations

import importlib.util
import os

import ml_collections

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))
_NOT_CONFIGS = ("__init__", "base")


def available() -> list[str]:
  """Names accepted by --config (the architecture files in this folder)."""
  return sorted(f[:-3] for f in os.listdir(CONFIG_DIR)
                if f.endswith(".py") and f[:-3] not in _NOT_CONFIGS)


def resolve(value: str) -> str:
  """'laLTE' -> '.../experiments/configs/laLTE.py'; a file path (optionally ':arg') as is."""
  name, sep, arg = value.partition(":")
  if os.path.isfile(name):
    return value
  if name in available():
    return os.path.join(CONFIG_DIR, name + ".py") + sep + arg
  raise ValueError(f"unknown config {name!r}: neither a config file nor one of the configs "
                   f"{available()} in {CONFIG_DIR}")


def load(path: str) -> ml_collections.ConfigDict:
  """get_config() of a config file ('path.py' or 'path.py:arg')."""
  path, _, arg = path.partition(":")
  spec = importlib.util.spec_from_file_location("_train_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def check_field(config: ml_collections.ConfigDict, dotted: str) -> None:
  """Raise ValueError listing the valid names unless ``config`` has the field 'a.b.c'."""
  node, seen = config, []
  for key in dotted.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or key not in node:
      where = "config" + "".join(f".{k}" for k in seen)
      valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      raise ValueError(f"unknown config field {dotted!r}: {where} has no field {key!r}; "
                       f"valid fields of {where}: {valid}")
    node, seen = node[key], seen + [key]


def resolve_command_line(argv: list[str]) -> list[str]:
  """argv with ``--config=NAME`` replaced by its file; every ``--config.x.y`` checked to exist.

  ml_collections only knows file paths and reports an unknown override field
  with a traceback; this runs before flag parsing to give a plain message.
  """
  argv = list(argv)
  index = None
  for i, arg in enumerate(argv):
    if arg == "--config" and i + 1 < len(argv):
      argv[i:i + 2] = [f"--config={argv[i + 1]}"]
    if argv[i].startswith("--config="):
      index = i
  if index is None:
    return argv
  path = resolve(argv[index].split("=", 1)[1])
  argv[index] = f"--config={path}"
  config = load(path)
  for arg in argv[1:]:
    name = arg.split("=", 1)[0]
    for prefix in ("--config.", "--noconfig."):
      if name.startswith(prefix):
        check_field(config, name[len(prefix):])
  return argv
