"""Tests for vlm_jax.data.images: HF SigLIP parity, LLaVA-1.5 pad-to-square (against LLaVA's own
definition and HF's LlavaImageProcessorPil), the uint8 resize + device normalisation split (bit for
bit the host preprocessing), mode conversion, EXIF, bombs, corrupt data."""
import io

import jax
import numpy as np
import pytest
from PIL import Image

from vlm_jax.data.errors import SkipExample
from vlm_jax.data.images import (decode_image, expand_to_square, normalize_pixels, preprocess_image,
                                 resize_image)


def _encode(image: Image.Image, fmt: str, **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def _smooth_rgb(height: int, width: int, seed: int) -> np.ndarray:
    """Gradients plus noise: exercises the bicubic filter everywhere, not just at edges."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    base = np.stack([xs * 255 / max(width - 1, 1), ys * 255 / max(height - 1, 1),
                     (xs + ys) * 127 / max(width + height - 2, 1)], axis=-1)
    return np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)


def _hf_siglip(image, image_size: int) -> np.ndarray:
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
    processor = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    pixels = processor(image, return_tensors="np")["pixel_values"][0]  # f32[3, S, S]
    return pixels.transpose(1, 2, 0)


def _test_images():
    rgb = _smooth_rgb(37, 91, seed=0)
    return {
        "rgb_wide_png": Image.open(io.BytesIO(_encode(Image.fromarray(rgb), "PNG"))),
        "rgb_tall_jpeg": Image.open(io.BytesIO(_encode(
            Image.fromarray(_smooth_rgb(120, 45, seed=1)), "JPEG", quality=90))),
        "rgb_large_square": Image.fromarray(_smooth_rgb(300, 300, seed=2)),
        "gray_L": Image.fromarray(_smooth_rgb(50, 64, seed=3)[:, :, 0]),
        "palette_P": Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16),
        "cmyk_jpeg": Image.open(io.BytesIO(_encode(Image.fromarray(rgb).convert("CMYK"), "JPEG"))),
        "bilevel_1": Image.fromarray(rgb[:, :, 0]).convert("1"),
        "rgba_opaque": Image.fromarray(np.concatenate(
            [rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=-1)),
        "rgba_translucent": Image.fromarray(np.concatenate(
            [rgb, _smooth_rgb(37, 91, seed=4)[:, :, :1]], axis=-1)),
        "gray_alpha_LA": Image.merge("LA", [Image.fromarray(rgb[:, :, 0]),
                                            Image.fromarray(rgb[:, :, 1])]),
        "tiny_1x1": Image.fromarray(np.array([[[200, 10, 30]]], np.uint8)),
    }


@pytest.mark.parametrize("name", sorted(_test_images()))
@pytest.mark.parametrize("image_size", [16, 224])
def test_preprocess_matches_hf_siglip_processor(name, image_size):
    image = _test_images()[name]
    ours = preprocess_image(decode_image(image.copy()), image_size)
    assert ours.shape == (image_size, image_size, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, _hf_siglip(image, image_size), atol=1e-5, rtol=0)


def _llava_expand2square(pil_img: Image.Image, background_color) -> Image.Image:
    """LLaVA-1.5's `expand2square` (llava/mm_utils.py), verbatim."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    else:
        result = Image.new(pil_img.mode, (height, height), background_color)
        result.paste(pil_img, ((height - width) // 2, 0))
        return result


SIGLIP_MEAN = (0.5, 0.5, 0.5)
# (height, width): odd and even sides, wide, tall, square, a 1-pixel-wide strip.
PAD_SHAPES = [(5, 8), (8, 5), (7, 7), (1, 4), (4, 1), (6, 9), (37, 91)]


@pytest.mark.parametrize("height,width", PAD_SHAPES)
def test_expand_to_square_is_llavas_expand2square(height, width):
    rgb = _smooth_rgb(height, width, seed=height * 100 + width)
    background = tuple(int(x * 255) for x in SIGLIP_MEAN)  # LLaVA's own expression: (127,) * 3
    expected = np.asarray(_llava_expand2square(Image.fromarray(rgb), background))
    np.testing.assert_array_equal(expand_to_square(rgb), expected)
    # ... and preprocess_image(pad_to_square=True) is the plain preprocessing of that square.
    np.testing.assert_array_equal(preprocess_image(rgb, 16, pad_to_square=True),
                                  preprocess_image(expected, 16))


def _hf_llava(image, image_size: int) -> np.ndarray:
    """transformers' LLaVA processor set up as LLaVA-1.5 with a SigLIP tower (the kwargs an
    exporter writes to preprocessor_config.json)."""
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
    processor = LlavaImageProcessorPil(
        do_pad=True, size={"height": image_size, "width": image_size}, do_center_crop=False,
        resample=3, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_convert_rgb=True)
    pixels = processor(image, return_tensors="np")["pixel_values"][0]  # f32[3, S, S]
    return pixels.transpose(1, 2, 0)


@pytest.mark.parametrize("height,width", PAD_SHAPES + [(120, 45), (300, 200)])
@pytest.mark.parametrize("image_size", [16, 224])
def test_pad_to_square_matches_hf_llava_processor(height, width, image_size):
    rgb = _smooth_rgb(height, width, seed=height + width)
    ours = preprocess_image(rgb, image_size, pad_to_square=True)
    assert ours.shape == (image_size, image_size, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, _hf_llava(Image.fromarray(rgb), image_size), atol=1e-5, rtol=0)
    if height != width:  # the padding is visible: not the plain (stretching) preprocessing
        assert np.abs(ours - preprocess_image(rgb, image_size)).max() > 0.1


def _host_preprocessing(rgb: np.ndarray, image_size: int, pad_to_square: bool) -> np.ndarray:
    """`preprocess_image` as it was written before images went to the device as uint8: PIL
    bicubic resize, then the f32 formula on the host."""
    if pad_to_square:
        rgb = expand_to_square(rgb)
    resized = Image.fromarray(rgb).resize((image_size, image_size), resample=Image.BICUBIC)
    return np.asarray(resized, np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)


@pytest.mark.parametrize("pad_to_square", [False, True])
@pytest.mark.parametrize("height,width,image_size", [(37, 91, 16), (120, 45, 224), (300, 300, 64),
                                                     (1, 4, 7), (64, 48, 384)])
def test_device_normalisation_is_bit_exact_with_host_preprocessing(height, width, image_size,
                                                                    pad_to_square):
    rng = np.random.default_rng(height * 1000 + width)
    for rgb in (rng.integers(0, 256, (height, width, 3), dtype=np.uint8),
                _smooth_rgb(height, width, seed=width)):
        expected = _host_preprocessing(rgb, image_size, pad_to_square)
        resized = resize_image(rgb, image_size, pad_to_square)
        assert resized.shape == (image_size, image_size, 3) and resized.dtype == np.uint8
        on_device = jax.jit(normalize_pixels)(resized)
        assert on_device.dtype == np.float32
        assert np.array_equal(np.asarray(on_device), expected)
        assert np.array_equal(preprocess_image(rgb, image_size, pad_to_square), expected)


def test_normalize_pixels_every_byte_matches_numpy_formula_under_jit():
    """All 256 values, on the host and jitted. The plain formula jitted would not do: XLA fuses
    the multiply and the subtract into one FMA, whose single rounding differs in the last bit."""
    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)
    expected = pixels.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)
    assert np.array_equal(normalize_pixels(pixels), expected)
    assert np.array_equal(np.asarray(jax.jit(normalize_pixels)(pixels)), expected)
    assert expected.min() == -1.0 and expected.max() == 1.0
    with pytest.raises(ValueError, match="uint8"):
        normalize_pixels(expected)


def test_decode_bytes_equals_decode_pil_and_array():
    rgb = _smooth_rgb(33, 17, seed=5)
    png = _encode(Image.fromarray(rgb), "PNG")
    np.testing.assert_array_equal(decode_image(png), rgb)
    np.testing.assert_array_equal(decode_image(Image.open(io.BytesIO(png))), rgb)
    np.testing.assert_array_equal(decode_image(rgb), rgb)
    np.testing.assert_array_equal(decode_image(rgb[:, :, 0]), np.repeat(rgb[:, :, :1], 3, axis=2))


def test_output_range_is_minus_one_to_one():
    pixels = np.array([[[0, 255, 128]]], np.uint8)
    np.testing.assert_allclose(preprocess_image(pixels, 1)[0, 0], [-1.0, 1.0, 128 / 127.5 - 1],
                               atol=1e-7)


def test_exif_orientation_is_applied():
    rgb = _smooth_rgb(10, 30, seed=6)  # landscape on disk
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the displayed image is portrait
    data = _encode(Image.fromarray(rgb), "PNG", exif=exif)
    decoded = decode_image(data)
    assert decoded.shape == (30, 10, 3)
    np.testing.assert_array_equal(decoded, np.rot90(rgb, k=-1))


def test_transparent_pixels_become_white():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255  # fully transparent red
    decoded = decode_image(_encode(Image.fromarray(rgba), "PNG"))
    np.testing.assert_array_equal(decoded, np.full((4, 4, 3), 255, np.uint8))


def test_16_bit_gray_is_scaled_not_clipped():
    wide = np.array([[0, 257 * 100, 65535]], np.uint16)
    decoded = decode_image(_encode(Image.fromarray(wide), "PNG"))
    np.testing.assert_array_equal(decoded[0, :, 0], [0, 100, 255])


def test_huge_image_refused_from_header_without_decoding():
    # A 20000 x 20000 PNG whose pixel data is a few bytes: only the header could be trusted.
    huge = Image.new("1", (20000, 20000))
    data = _encode(huge, "PNG")
    assert len(data) < 200_000
    with pytest.raises(SkipExample) as caught:
        decode_image(data)
    assert caught.value.reason == "image_too_large"
    with pytest.raises(SkipExample) as caught:
        decode_image(_encode(Image.new("RGB", (50, 50)), "PNG"), max_pixels=49 * 50)
    assert caught.value.reason == "image_too_large"


@pytest.mark.parametrize("kind", ["truncated_jpeg", "truncated_png", "garbage", "empty"])
def test_corrupt_data_is_skipped(kind):
    jpeg = _encode(Image.fromarray(_smooth_rgb(64, 64, seed=7)), "JPEG")
    png = _encode(Image.fromarray(_smooth_rgb(64, 64, seed=7)), "PNG")
    data = {"truncated_jpeg": jpeg[: len(jpeg) // 2], "truncated_png": png[: len(png) // 2],
            "garbage": b"this is not an image" * 10, "empty": b""}[kind]
    with pytest.raises(SkipExample) as caught:
        decode_image(data)
    assert caught.value.reason == "image_corrupt"


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="uint8"):
        decode_image(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match=r"u8\[H, W, 3\]"):
        preprocess_image(np.zeros((4, 4), np.uint8), 8)
    with pytest.raises(TypeError):
        decode_image("path/as/string.jpg")
