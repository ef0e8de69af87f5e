"""Image decoding (bytes / PIL / array -> uint8 RGB) and SigLIP preprocessing (-> f32 in [-1, 1]).

`decode_image` is the one gate every image passes: it refuses oversized images from the header
alone (decompression bombs), applies EXIF orientation, and turns any PIL mode into RGB.
`preprocess_image` reproduces HF `SiglipImageProcessor` numerically: PIL bicubic resize of the
uint8 image to S x S (no aspect-ratio preservation, no crop), rescale by 1/255, normalise with
mean = std = 0.5. With `pad_to_square=True` the uint8 image is first centred on a square of
`PAD_COLOR` (LLaVA-1.5's `expand2square`), which keeps its aspect ratio; that is numerically HF
`LlavaImageProcessorPil(do_pad=True, size={"height": S, "width": S}, do_center_crop=False,
resample=3, image_mean=[0.5] * 3, image_std=[0.5] * 3)` (tests/test_images.py checks both).

`preprocess_image` is two steps, `normalize_pixels(resize_image(...))`. The training pipeline
stops after the uint8 `resize_image` (a quarter of the bytes of f32 to the device) and the train
step applies `normalize_pixels` inside jit (`train/step._pixels`), giving the same f32 values
bit for bit; the model itself takes floats in [-1, 1].
"""
from __future__ import annotations

import io
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageOps

from vlm_jax.data.errors import SkipExample

# 64 Mpx: far above any training image (LLaVA / COCO are < 1 Mpx), far below what would hurt a
# data-loader worker (a 20000 x 20000 RGB image alone is 1.2 GB).
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024

# LLaVA-1.5 pads with `tuple(int(x * 255) for x in image_processor.image_mean)`: SigLIP's mean 0.5
# gives int(127.5) = 127, not 128 (the truncation is LLaVA's, and HF's do_pad repeats it).
PAD_COLOR = (127, 127, 127)

# f32[256]: the normalised value of each byte, x * f32(2/255) - 1 in numpy's f32 arithmetic (HF
# computes (x / 255 - 0.5) / 0.5 in float64 then casts; this differs by < 1e-7). The device reads
# these values instead of recomputing them: under jit XLA contracts the multiply and subtract into
# one fused multiply-add (one rounding instead of two), which moves 158 of the 256 values by one
# ulp on the CPU backend (GPU compilers contract by default too). A gather from this table copies
# the host's values, so it is bit-exact on every backend.
def _normalize_on_host(pixels: np.ndarray) -> np.ndarray:
    return pixels.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)


PIXEL_VALUES = _normalize_on_host(np.arange(256, dtype=np.uint8))
PIXEL_VALUES.flags.writeable = False

# Pillow's own errors for unreadable data; anything else is a bug and should propagate.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.UnidentifiedImageError)


def decode_image(data: bytes | Image.Image | np.ndarray, *,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Any image input -> u8[H, W, 3] RGB.

    Raises SkipExample("image_too_large") when width * height > max_pixels (checked on the header,
    before any pixel is decoded) and SkipExample("image_corrupt") for data Pillow cannot decode
    (unknown format, truncated file, bad header).
    """
    if isinstance(data, np.ndarray):
        return _array_to_rgb(data, max_pixels)
    if isinstance(data, (bytes, bytearray, memoryview)):
        image = _open_lazily(bytes(data), max_pixels)
    elif isinstance(data, Image.Image):
        image = data
        _check_size(image.size, max_pixels)
    else:
        raise TypeError(f"decode_image takes bytes, a PIL image or a numpy array, got {type(data)}")
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
    except _DECODE_ERRORS as error:
        raise SkipExample("image_corrupt", f"{type(error).__name__}: {error}") from error
    return pil_to_rgb(image)


def pil_to_rgb(image: Image.Image) -> np.ndarray:
    """A decoded PIL image of any mode -> u8[H, W, 3].

    Transparency is composited onto white (as HF's `convert_to_rgb` does), so a transparent
    logo does not turn into a black square. 16/32-bit integer images are scaled into 0..255
    (Pillow's own convert would clip them, turning most 16-bit images white).
    """
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        wide = np.asarray(image, dtype=np.float64)
        gray = np.clip(np.round(wide / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    has_alpha = "A" in image.getbands() or "transparency" in image.info
    if has_alpha:
        with warnings.catch_warnings():
            # Pillow warns that palette transparency "should be expressed as RGBA"; we do that.
            warnings.simplefilter("ignore", UserWarning)
            rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    if image.mode != "RGB":
        image = image.convert("RGB")  # CMYK, YCbCr, LAB, P, L, 1, F: Pillow's standard matrices
    return np.asarray(image, dtype=np.uint8).copy()


def preprocess_image(rgb: np.ndarray, image_size: int, pad_to_square: bool = False) -> np.ndarray:
    """u8[H, W, 3] -> f32[S, S, 3] in [-1, 1], numerically HF `SiglipImageProcessor`'s output
    (channels-last instead of HF's channels-first); `pad_to_square` first (see `expand_to_square`)."""
    return normalize_pixels(resize_image(rgb, image_size, pad_to_square))


def resize_image(rgb: np.ndarray, image_size: int, pad_to_square: bool = False) -> np.ndarray:
    """u8[H, W, 3] -> u8[S, S, 3]: PIL bicubic resize (after `expand_to_square` with
    `pad_to_square`)."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"resize_image takes u8[H, W, 3], got {rgb.dtype}{list(rgb.shape)}")
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    if pad_to_square:
        rgb = expand_to_square(rgb)
    resized = Image.fromarray(rgb).resize((image_size, image_size), resample=Image.BICUBIC)
    return np.array(resized, dtype=np.uint8)


def normalize_pixels(pixels: np.ndarray | jax.Array) -> np.ndarray | jax.Array:
    """u8[...] -> f32[...] in [-1, 1] (`PIXEL_VALUES[x]`): a numpy array on the host (computed,
    faster than a gather there), a jax array (a gather, also inside jit) otherwise; the same
    values either way."""
    if pixels.dtype != np.uint8:
        raise ValueError(f"normalize_pixels takes uint8 pixels, got {pixels.dtype}")
    if isinstance(pixels, np.ndarray):
        return _normalize_on_host(pixels)  # numpy rounds after each op: the table's values
    return jnp.take(jnp.asarray(PIXEL_VALUES), pixels.astype(jnp.int32), mode="clip")


def expand_to_square(rgb: np.ndarray, color: tuple[int, int, int] = PAD_COLOR) -> np.ndarray:
    """u8[H, W, 3] -> u8[L, L, 3], L = max(H, W): LLaVA-1.5's `expand2square`. The image is pasted
    at offset (L - H) // 2 from the top, (L - W) // 2 from the left (the odd pixel of padding goes
    to the bottom / right), onto `color`."""
    height, width = rgb.shape[:2]
    if height == width:
        return rgb
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    square = np.empty((side, side, 3), np.uint8)
    square[:] = np.asarray(color, np.uint8)
    square[top:top + height, left:left + width] = rgb
    return square


def _open_lazily(data: bytes, max_pixels: int) -> Image.Image:
    """Image.open reads only the header, so the size check costs nothing for a bomb."""
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb warning (> 89 Mpx) is redundant with our explicit check below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise SkipExample("image_too_large", str(error)) from error
    except _DECODE_ERRORS as error:
        raise SkipExample("image_corrupt", f"{type(error).__name__}: {error}") from error
    _check_size(image.size, max_pixels)
    return image


def _check_size(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width * height > max_pixels:
        raise SkipExample("image_too_large", f"{width}x{height} > {max_pixels} pixels")
    if width < 1 or height < 1:
        raise SkipExample("image_corrupt", f"empty image {width}x{height}")


def _array_to_rgb(array: np.ndarray, max_pixels: int) -> np.ndarray:
    """u8[H, W], u8[H, W, 1|3|4] -> u8[H, W, 3] (an already decoded image, e.g. from TFDS)."""
    if array.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8, got {array.dtype}")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(f"image arrays must be [H, W] or [H, W, 1|3|4], got {list(array.shape)}")
    _check_size((array.shape[1], array.shape[0]), max_pixels)
    if array.shape[2] == 1:
        return np.repeat(array, 3, axis=2)
    if array.shape[2] == 4:
        return pil_to_rgb(Image.fromarray(array))
    return np.ascontiguousarray(array)
