"""Skipping bad examples: the one exception every source and transform raises for a bad record."""
from __future__ import annotations


class SkipExample(Exception):
    """This record cannot be used. `reason` is a short stable key that the pipeline counts
    (e.g. "image_corrupt", "image_missing", "path_outside_root", "json_malformed",
    "too_long"); `detail` says which file/row and why, for the logs."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
