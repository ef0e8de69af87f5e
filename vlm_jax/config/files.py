"""Config files: a small python file under configs/ with `get_config(arg) -> ConfigDict`.

`path/to/config.py:phase=align,res=64` names the file and its argument (read it with
`vlm_jax.config.parse_arg`). Config files may import each other as `configs.x` from the
repository root, which is put on `sys.path` while one loads.
"""
from __future__ import annotations

import importlib.util
import os
import sys

import ml_collections

from vlm_jax.errors import ConfigError


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """`path/to/config.py[:arg]` -> the ConfigDict its `get_config(arg)` returns."""
    path, _, arg = spec.partition(":")
    module = load_module(path)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} has no get_config(arg) function")
    try:
        return module.get_config(arg or None)
    except ConfigError:
        raise
    except (ValueError, KeyError, TypeError) as e:  # a bad argument, found by the file's own code
        raise ConfigError(f"config file {spec}: {type(e).__name__}: {e}") from e


def load_module(path: str):
    """The python module at `path`, executed; a missing file, a syntax error or a failed import
    is a ConfigError naming the file (and line)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist"
                          + (" (it is a directory)" if os.path.isdir(path) else ""))
    _put_repository_root_on_path(path)
    name = "vlm_jax_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ConfigError(f"config file {path} line {e.lineno}: syntax error: {e.msg}") from None
    except ImportError as e:
        raise ConfigError(f"config file {path}: {e}") from e
    return module


def _put_repository_root_on_path(path: str) -> None:
    """`configs/x.py` may `from configs import tiny`: the directory holding `configs/` goes on
    sys.path, as it is when running from the repository root."""
    parts = os.path.abspath(path).split(os.sep)
    if "configs" in parts[:-1]:
        index = len(parts) - 1 - parts[::-1].index("configs", 1)
        root = os.sep.join(parts[:index]) or os.sep
        if root not in sys.path:
            sys.path.insert(0, root)
