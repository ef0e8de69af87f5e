"""Is the compiled generation program of an older commit the same as the working tree's?

    python benchmarks/generate_hlo.py --against <rev> [--batch 1 8] [--config ../shared/bench/bench_s.json]

Compiles `generate` (prefill + the cached decode loop) of the bench model at each batch size,
once in a temporary worktree of <rev> and once here, and compares XLA's optimized HLO with the
source locations stripped. Identical programs run at the same speed, so this settles a timing
difference that a noisy machine cannot (the wall-clock side is generate_before_after.sh).
Prints "identical" per batch size, or the first lines of the difference; exits 1 if any differs.
Needs no weights: parameters are zeros, nothing is run.
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LOCATION = re.compile(r"^\d+ (\{file_name_id|\{file_location_id|\")")  # the file / frame tables
_STRIP = ((re.compile(r", metadata=\{[^}]*\}"), ""),            # source metadata
          (re.compile(r",? ?stack_frame_id=\d+"), ""),             # frame references
          (re.compile(r"(?<=[A-Za-z_])(\w*)\.\d+\b"), r"\1"))     # name suffixes: add.12 -> add


def canonical_hlo(bench_path: str, batch: int) -> str:
    """The optimized HLO of the checkout on sys.path, locations and name suffixes stripped."""
    import jax
    import numpy as np

    import vlm_jax
    from vlm_jax.inference import generate as gen
    from vlm_jax.models.vlm import init_params

    # the compared checkout's own mapping of the bench JSON (the one on PYTHONPATH)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(vlm_jax.__file__)), "benchmarks"))
    from train_throughput import bench_model_config

    bench = json.load(open(bench_path))
    model_config = bench_model_config(bench, "float32")
    shapes = jax.eval_shape(lambda: init_params(model_config, jax.random.key(0)))
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    settings, n_image = bench["generate"], bench["num_image_tokens"]
    ids = np.zeros((batch, n_image + settings["prompt_text_len"]), np.int32)
    ids[:, :n_image] = model_config.image_token_id
    size = bench["image_size"]
    images = np.zeros((batch, 1, size, size, 3), np.float32)

    compiled = {}
    real = gen._generate

    def capture(*args):  # the jitted function's own arguments, as generate() builds them
        compiled["text"] = real.lower(*args).compile().as_text()
        raise _Captured

    gen._generate = capture
    try:
        gen.generate(model_config, params, ids, np.full((batch,), ids.shape[1], np.int32), images,
                     settings["new_tokens"])
    except _Captured:
        pass
    finally:
        gen._generate = real
    lines = [line for line in compiled["text"].splitlines() if not _LOCATION.match(line)]
    text = "\n".join(lines)
    for pattern, replacement in _STRIP:
        text = pattern.sub(replacement, text)
    return text


class _Captured(Exception):
    pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", help="the older commit (omit: print this checkout's HLO)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--config", default=os.path.join(ROOT, "..", "shared", "bench", "bench_s.json"))
    parser.add_argument("--dump", help=argparse.SUPPRESS)  # internal: write this checkout's HLO here
    args = parser.parse_args()
    if args.dump:
        with open(args.dump, "w") as f:
            json.dump({str(b): canonical_hlo(args.config, b) for b in args.batch}, f)
        return 0
    if not args.against:
        for b in args.batch:
            print(canonical_hlo(args.config, b))
        return 0
    if not os.path.isfile(args.config):
        parser.error(f"--config {args.config}: no such file (the bench JSON, ../shared/bench/)")
    if subprocess.run(["git", "-C", ROOT, "rev-parse", "-q", "--verify", f"{args.against}^{{commit}}"],
                      capture_output=True).returncode:
        parser.error(f"--against {args.against}: not a commit of {ROOT}")
    tmp = tempfile.mkdtemp()
    before = os.path.join(tmp, "before")
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "-f", "-q", before, args.against], check=True)
    try:
        texts = {}
        for side, checkout in (("before", before), ("after", ROOT)):
            out = os.path.join(tmp, f"{side}.json")
            env = {**os.environ, "PYTHONPATH": checkout, "HF_HUB_OFFLINE": "1"}
            subprocess.run([sys.executable, os.path.abspath(__file__), "--dump", out,
                            "--config", os.path.abspath(args.config), "--batch",
                            *map(str, args.batch)], env=env, check=True, cwd=checkout)
            texts[side] = json.load(open(out))
    finally:
        subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", before], check=False)
    differs = False
    for b in args.batch:
        old, new = texts["before"][str(b)], texts["after"][str(b)]
        if old == new:
            print(f"batch {b}: identical ({len(new.splitlines())} HLO lines)")
            continue
        differs = True
        diff = list(difflib.unified_diff(old.splitlines(), new.splitlines(), args.against, "HEAD",
                                         lineterm="", n=1))
        print(f"batch {b}: differs ({len(diff)} diff lines); the first 40:")
        print("\n".join(diff[:40]))
    return 1 if differs else 0


if __name__ == "__main__":
    sys.exit(main())
