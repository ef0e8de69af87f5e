"""Parameter groups: `(regex, value)` rules over '/'-joined param paths, first full match wins.

One idiom (big_vision's) serves freezing, learning-rate multipliers and weight-decay masks:

    rules = [("vision_tower/.*", 0.1),   # trains at 0.1x the learning rate
             ("llm/.*", 1.0),
             (".*", None)]               # None = frozen

Paths are the param tree's dict keys joined with '/', e.g. 'llm/layers/attention/q/kernel'.
A param that no rule matches is an error (listing the paths), never a silent default.
Trees here are plain nested dicts (what Flax Linen `init` returns), so a subset of a tree is a
nested dict holding only some of the leaves and `merge_trees` puts subsets back together.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import flax.linen as nn
from flax import traverse_util

from vlm_jax.errors import ConfigError

Rules = Sequence[tuple[str, Any]]
_IS_BOXED = lambda x: isinstance(x, nn.LogicallyPartitioned)  # noqa: E731


def normalize_rules(rules: Any, where: str = "param_groups") -> tuple[tuple[str, Any], ...]:
    """Rules from a config (lists of [regex, value] pairs) as a tuple of (regex, value) pairs,
    refusing malformed entries and regexes that do not compile."""
    out = []
    for i, rule in enumerate(rules or ()):
        if not isinstance(rule, (tuple, list)) or len(rule) != 2 or not isinstance(rule[0], str):
            raise ConfigError(f"{where}[{i}]={rule!r}: each rule is a (regex, value) pair")
        try:
            re.compile(rule[0])
        except re.error as e:
            raise ConfigError(f"{where}[{i}]: regex {rule[0]!r} does not compile: {e}") from e
        out.append((rule[0], rule[1]))
    return tuple(out)


def flatten(tree: Any) -> dict[str, Any]:
    """{'a/b/c': leaf} for a nested dict (boxed nn.LogicallyPartitioned leaves stay whole)."""
    if not isinstance(tree, dict):
        raise TypeError(f"expected a nested dict of params, got {type(tree).__name__}")
    return traverse_util.flatten_dict(tree, sep="/", is_leaf=lambda _, x: _IS_BOXED(x))


def unflatten(flat: dict[str, Any]) -> dict:
    return traverse_util.unflatten_dict(flat, sep="/")


def match_groups(params: Any, rules: Rules) -> Any:
    """A tree shaped like `params` holding, per leaf, the value of the first rule whose regex
    fully matches the leaf's path. Raises ValueError listing every unmatched path."""
    rules = normalize_rules(rules)
    compiled = [(re.compile(pattern), value) for pattern, value in rules]
    values, unmatched = {}, []
    for path in flatten(params):
        for pattern, value in compiled:
            if pattern.fullmatch(path):
                values[path] = value
                break
        else:
            unmatched.append(path)
    if unmatched:
        shown = "\n  ".join(unmatched[:20]) + ("\n  ..." if len(unmatched) > 20 else "")
        raise ConfigError(f"{len(unmatched)} param(s) match no rule of {[p for p, _ in rules]}; "
                          f"add a rule (e.g. ('.*', None)) covering:\n  {shown}")
    return unflatten(values)


def split_tree(tree: Any, keep: Callable[[str], bool]) -> tuple[dict, dict]:
    """(leaves whose path satisfies `keep`, the other leaves), both nested dicts."""
    flat = flatten(tree)
    kept = {p: v for p, v in flat.items() if keep(p)}
    rest = {p: v for p, v in flat.items() if not keep(p)}
    return unflatten(kept), unflatten(rest)


def merge_trees(*trees: dict) -> dict:
    """Union of disjoint nested dicts (inverse of `split_tree`)."""
    merged: dict[str, Any] = {}
    for tree in trees:
        flat = flatten(tree)
        overlap = merged.keys() & flat.keys()
        if overlap:
            raise ValueError(f"merge_trees: path(s) present twice: {sorted(overlap)[:5]}")
        merged.update(flat)
    return unflatten(merged)


def map_with_path(fn: Callable[[str, Any], Any], tree: Any) -> dict:
    """`fn(path, leaf)` over a nested dict, keeping the structure."""
    return unflatten({p: fn(p, v) for p, v in flatten(tree).items()})

