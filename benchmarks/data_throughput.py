"""Data-loader throughput: the full pipeline against a plain PIL decode + resize loop, same files.

    python benchmarks/data_throughput.py --num-images 512 --out /tmp/data_throughput.json

Writes N 640x480 JPEGs (varied content: gradients, shapes, noise) in two layouts, a LLaVA JSON
file + image folder and WebDataset tar shards, then measures examples/s of
  * the plain loop: open, decode, RGB, bicubic resize to 224, normalise to [-1, 1], one by one;
  * the full pipeline: source -> decode -> resize -> chat template -> tokens -> pack -> batch,
    for each layout (the first pass over the files warms the page cache for both).
Prints both rates and pipeline / plain; the JSON holds them with the settings used.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tarfile
import tempfile
import time

from absl import flags

if not flags.FLAGS.is_parsed():  # grain workers need parsed absl flags outside absl.app.run
    flags.FLAGS.mark_as_parsed()

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from vlm_jax.data.images import decode_image, preprocess_image  # noqa: E402
from vlm_jax.data.pipeline import DataConfig, build_pipeline  # noqa: E402
from vlm_jax.data.tokenizer import train_word_tokenizer  # noqa: E402

WIDTH, HEIGHT = 640, 480
COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
SHAPES = ["circle", "square"]


def make_image(rng: np.random.Generator) -> tuple[Image.Image, str]:
    """A 640x480 photo-like image (gradient + noise + shapes) and a caption describing it."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    start, end = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * x / WIDTH + np.sin(angle) * y / HEIGHT + 1.0) / 2.0
    pixels = start + ramp[..., None] * (end - start) + rng.normal(0, 12, (HEIGHT, WIDTH, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    words = []
    for _ in range(int(rng.integers(1, 6))):
        color, shape = COLORS[rng.integers(len(COLORS))], SHAPES[rng.integers(len(SHAPES))]
        cx, cy, r = rng.integers(40, WIDTH - 40), rng.integers(40, HEIGHT - 40), rng.integers(15, 90)
        box = (cx - r, cy - r, cx + r, cy + r)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=color)
        words.append(f"a {color} {shape}")
    return image, "an image with " + ", ".join(words)


def write_dataset(directory: str, num_images: int, images_per_shard: int = 128) -> dict:
    """JPEGs + LLaVA JSON + WebDataset tars under `directory`; returns their paths and the texts."""
    rng = np.random.default_rng(0)
    image_dir = os.path.join(directory, "images")
    os.makedirs(image_dir)
    rows, texts, shards = [], [], []
    tar = None
    for index in range(num_images):
        image, caption = make_image(rng)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        jpeg = buffer.getvalue()
        name = f"{index:06d}"
        with open(os.path.join(image_dir, name + ".jpg"), "wb") as handle:
            handle.write(jpeg)
        conversation = [{"from": "human", "value": "<image>\nDescribe the image."},
                        {"from": "gpt", "value": caption + "."}]
        rows.append({"id": name, "image": f"images/{name}.jpg", "conversations": conversation})
        texts.append("Describe the image. " + caption + ".")
        if index % images_per_shard == 0:
            if tar is not None:
                tar.close()
            shards.append(os.path.join(directory, f"shard-{len(shards):05d}.tar"))
            tar = tarfile.open(shards[-1], "w")
        _add_to_tar(tar, name + ".jpg", jpeg)
        _add_to_tar(tar, name + ".json", json.dumps({"conversations": conversation}).encode())
        _add_to_tar(tar, name + ".txt", (caption + ".").encode())
    tar.close()
    json_path = os.path.join(directory, "llava.json")
    with open(json_path, "w") as handle:
        json.dump(rows, handle)
    image_paths = [os.path.join(image_dir, f"{i:06d}.jpg") for i in range(num_images)]
    return {"json": json_path, "shards": shards, "image_paths": image_paths, "texts": texts}


def _add_to_tar(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def plain_loop_rate(image_paths: list[str], image_size: int) -> float:
    """Images/s of the simplest correct loader: read, decode, RGB, resize, normalise, in a loop."""
    start = time.perf_counter()
    for path in image_paths:
        with open(path, "rb") as handle:
            pixels = preprocess_image(decode_image(handle.read()), image_size)
        assert pixels.shape == (image_size, image_size, 3)
    return len(image_paths) / (time.perf_counter() - start)


def pipeline_rate(cfg: DataConfig, tokenizer, num_examples: int) -> tuple[float, dict]:
    """Examples/s of the full pipeline over one epoch (counted from the batches' segments)."""
    start = time.perf_counter()
    iterator = build_pipeline(cfg, tokenizer, process_index=0, process_count=1)
    num_segments = 0
    num_batches = 0
    image_bytes, image_dtype = 0, None
    for batch in iterator:
        num_segments += int(sum(len(np.unique(row[row > 0])) for row in batch["segment_ids"]))
        num_batches += 1
        image_bytes += batch["images"].nbytes
        image_dtype = str(batch["images"].dtype)
    elapsed = time.perf_counter() - start
    iterator.close()
    if num_segments != num_examples:
        raise RuntimeError(f"the pipeline yielded {num_segments} examples, expected {num_examples}; "
                           f"skips: {iterator.skip_counts()}")
    return num_segments / elapsed, {"batches": num_batches, "seconds": elapsed,
                                    "image_bytes_per_batch": image_bytes / max(num_batches, 1),
                                    "image_dtype": image_dtype}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--num-image-tokens", type=int, default=196)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--read-threads", type=int, default=2)
    parser.add_argument("--prefetch", type=int, default=16)
    parser.add_argument("--worker-count", type=int, default=0)
    parser.add_argument("--template", default="vicuna")
    parser.add_argument("--repeats", type=int, default=3,
                        help="alternate plain / pipeline runs this many times; report medians "
                             "(other processes on a shared machine make single runs noisy)")
    parser.add_argument("--layouts", default="llava_json,webdataset",
                        help="comma-separated subset of: llava_json, webdataset")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="data_throughput_") as directory:
        data = write_dataset(directory, args.num_images)
        tokenizer = train_word_tokenizer(data["texts"], vocab_size=512)
        common = dict(task="instruct", template=args.template, seq_len=args.seq_len,
                      image_size=args.image_size, num_image_tokens=args.num_image_tokens,
                      batch_size=args.batch_size, packing=True, num_epochs=1,
                      max_images_per_row=max(1, args.seq_len // args.num_image_tokens),
                      read_threads=args.read_threads, prefetch_buffer_size=args.prefetch,
                      worker_count=args.worker_count, seed=0)
        layouts = {
            "llava_json": DataConfig(sources=({"kind": "llava_json", "options": {"path": data["json"]}},),
                                     **common),
            "webdataset": DataConfig(sources=({"kind": "webdataset",
                                               "options": {"shards": data["shards"]}},), **common),
        }
        for layout in args.layouts.split(","):
            if layout not in layouts:
                raise ValueError(f"--layouts entry {layout!r}; supported: {tuple(layouts)}")
        plain_loop_rate(data["image_paths"][:32], args.image_size)  # warm the page cache
        plain_rates, pipeline_rates = [], {layout: [] for layout in args.layouts.split(",")}
        infos = {}
        for _ in range(args.repeats):  # interleaved, so a busy neighbour slows both alike
            plain_rates.append(plain_loop_rate(data["image_paths"], args.image_size))
            for layout in pipeline_rates:
                rate, infos[layout] = pipeline_rate(layouts[layout], tokenizer, args.num_images)
                pipeline_rates[layout].append(rate)
        plain = float(np.median(plain_rates))
        results = {"num_images": args.num_images, "image_size": args.image_size,
                   "settings": vars(args), "cpu_count": os.cpu_count(),
                   "load_average_1min": os.getloadavg()[0], "python": platform.python_version(),
                   # numpy madvises >= 4 MB arrays for huge pages; with THP defrag=madvise a
                   # fresh batch buffer can then fault slowly (NUMPY_MADVISE_HUGEPAGE=0 turns it off)
                   "NUMPY_MADVISE_HUGEPAGE": os.environ.get("NUMPY_MADVISE_HUGEPAGE"),
                   "plain_loop_images_per_s": plain, "plain_loop_runs": plain_rates,
                   "pipelines": {}}
        print(f"plain PIL decode+resize loop: {plain:8.1f} images/s (median of {args.repeats})")
        for layout, rates in pipeline_rates.items():
            rate = float(np.median(rates))
            info = infos[layout]
            results["pipelines"][layout] = {"examples_per_s": rate, "ratio_to_plain": rate / plain,
                                            "runs": rates, **info}
            print(f"pipeline ({layout:10s}):         {rate:8.1f} examples/s "
                  f"= {rate / plain:.2f} x the plain loop; images {info['image_dtype']}, "
                  f"{info['image_bytes_per_batch'] / 2**20:.1f} MiB per batch to the device")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=2)
    return results


if __name__ == "__main__":
    main()
