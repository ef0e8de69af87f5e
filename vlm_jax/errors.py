"""The errors a user can cause, one type per kind; `vlm-jax` prints each as one line and exits
with its `exit_code` (a traceback only with `--debug`).

    ConfigError       a config file, a config field or an override          exit 2
    DataError         a data file or source that cannot be read              exit 2
    CheckpointError   a checkpoint, model directory or workdir               exit 2
    ConversionError   an HF directory to import, or an export target         exit 2
    InputError        a command-line flag, a request, a prompt or an image   exit 2
    TrainingStopped   a run stopped on purpose (too many bad examples, ...)  exit 3
    ExportMismatch    an export disagrees with ours in transformers          exit 3

The first five are also `ValueError`s, so library callers that catch ValueError keep working.
Every message names the field (its full config path), the flag or the file at fault.
Anything else that escapes is a bug in vlm_jax and keeps its traceback.
"""
from __future__ import annotations


class VlmJaxError(Exception):
    """Base of the errors the CLI reports in one line: `vlm-jax CMD: LABEL: message`."""
    exit_code = 2
    label = "error"


class ConfigError(VlmJaxError, ValueError):
    """A config file, field or override is wrong; the message names its dotted path."""


class DataError(VlmJaxError, ValueError):
    """A data source or file cannot be used (missing, unreadable, not what its kind expects)."""


class CheckpointError(VlmJaxError, ValueError):
    """A checkpoint, model directory or workdir cannot be used as asked."""


class ConversionError(VlmJaxError, ValueError):
    """An HF directory cannot be imported, or an export cannot be written where asked."""


class InputError(VlmJaxError, ValueError):
    """A command-line flag, request file, prompt or image given to a command is unusable."""


class TrainingStopped(VlmJaxError, RuntimeError):
    """The run stopped itself (e.g. too many skipped examples); the last good checkpoint is kept."""
    exit_code = 3
    label = "stopped"


class ExportMismatch(VlmJaxError, RuntimeError):
    """The exported model, loaded in transformers, disagrees with ours; nothing was written."""
    exit_code = 3
    label = "self-check FAILED"
