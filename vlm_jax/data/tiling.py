"""Tiling (dynamic resolution): one large image -> a grid of encoder-sized tiles + a global view.

    data.tiling.max_tiles = 0     off (every image one S x S square, the default)
    data.tiling.max_tiles = n*n   up to an n x n grid of S x S tiles (S = data.image_size) plus a
                                  global thumbnail: n*n + 1 encoder images per source image

The rule is Idefics3's / SmolVLM's longest-edge rule (transformers' `Idefics3ImageProcessor`
with `do_image_splitting=True`, `size={"longest_edge": n * S}`, `max_image_size={"longest_edge":
S}`), so that a tiled model composed like Idefics3 exports natively and its processor makes the
same tiles and tokens:

  1. the image is resized (PIL Lanczos, aspect ratio kept) so that its longest edge is n * S,
     the other edge rounded down, then up to an even number (and the whole kept <= 4096);
  2. resized again so that each edge is the next multiple of S (the longer one first, the other
     from the aspect ratio, then rounded up): rows = height / S, cols = width / S;
  3. cut into rows x cols tiles, row by row; the global view is step 2's image resized to S x S.
An image that step 2 leaves at S x S or smaller is one tile and no grid (rows = cols = 0).
The grid therefore depends only on the aspect ratio (a square image always gives n x n), which
is Idefics3's choice: small images are enlarged, nothing is read below the encoder's resolution.

In the text each image becomes (Idefics3's layout, `layout_text`):

    for each row r, for each column c:  <fake_token_around_image><row_r_col_c> + S_img x <image>
    after each row: "\\n";  then "\\n<fake_token_around_image><global-img>" + S_img x <image>
    + <fake_token_around_image>
and an image without a grid is just the global block. The tiles travel as separate encoder
images in reading order (tiles, then the global view); the model splices each one's tokens into
the next run of image tokens, as for any multi-image row.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
from PIL import Image

from vlm_jax.data.images import expand_to_square, normalize_pixels, preprocess_image
from vlm_jax.data.tokenizer import IDEFICS3_IMAGE_WRAP
from vlm_jax.errors import ConfigError

RULES = ("idefics3",)
MAX_IMAGE_SIZE = 4096  # transformers' Idefics3 processor: no edge above this after step 1
FAKE_TOKEN = "<fake_token_around_image>"
GLOBAL_TOKEN = "<global-img>"


def row_col_token(row: int, col: int) -> str:
    """The layout token of the tile at (row, col), 0-based: "<row_1_col_1>" for the first."""
    return f"<row_{row + 1}_col_{col + 1}>"


@dataclasses.dataclass(frozen=True)
class TilingConfig:
    """`data.tiling`: `max_tiles` = 0 (off) or n * n (up to an n x n grid, plus a global view)."""
    max_tiles: int = 0
    rule: str = "idefics3"

    def __post_init__(self):
        if self.rule not in RULES:
            raise ConfigError(f"data.tiling.rule={self.rule!r}; supported: {RULES}")
        side = math.isqrt(max(self.max_tiles, 0))
        if self.max_tiles < 0 or side * side != self.max_tiles:
            raise ConfigError(
                f"data.tiling.max_tiles={self.max_tiles}: 0 (off) or a square n * n (rule "
                f"{self.rule!r} resizes the longest edge to n tiles, so its grids are up to n x n)")

    @property
    def enabled(self) -> bool:
        return self.max_tiles > 0

    @property
    def side(self) -> int:
        """n: the most tiles along an edge."""
        return math.isqrt(self.max_tiles)

    @property
    def max_images(self) -> int:
        """Encoder images one source image can become: n * n tiles + the global view."""
        return self.max_tiles + 1 if self.enabled else 1

    def layout_tokens(self) -> list[str]:
        """Every special token the layout writes (the tokenizer must hold them all)."""
        if not self.enabled:
            return []
        return [FAKE_TOKEN, GLOBAL_TOKEN] + [row_col_token(r, c) for r in range(self.side)
                                            for c in range(self.side)]


def _longest_edge_size(height: int, width: int, longest: int) -> tuple[int, int]:
    """Step 1: longest edge -> `longest`, the other from the aspect ratio (floored, made even)."""
    aspect = width / height
    if width >= height:
        width = longest
        height = int(width / aspect)
        height += height % 2
    else:
        height = longest
        width = int(height * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    aspect = width / height
    if width >= height and width > MAX_IMAGE_SIZE:
        width, height = MAX_IMAGE_SIZE, max(int(MAX_IMAGE_SIZE / aspect), 1)
    elif height > width and height > MAX_IMAGE_SIZE:
        height, width = MAX_IMAGE_SIZE, max(int(MAX_IMAGE_SIZE * aspect), 1)
    return height, width


def _multiple_of_tile_size(height: int, width: int, tile: int) -> tuple[int, int]:
    """Step 2: each edge up to a multiple of `tile` (the longer one first, as transformers)."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return height, width


def grid_for(height: int, width: int, tile: int, config: TilingConfig) -> tuple[int, int]:
    """(rows, cols) of the grid an image of height x width gets; (0, 0): one tile, no grid."""
    if not config.enabled:
        return 0, 0
    h, w = _multiple_of_tile_size(*_longest_edge_size(height, width, config.side * tile), tile)
    if h <= tile and w <= tile:
        return 0, 0
    return h // tile, w // tile


def tile_image(rgb: np.ndarray, tile: int, config: TilingConfig, pad_to_square: bool = False
               ) -> tuple[np.ndarray, tuple[int, int]]:
    """u8[H, W, 3] -> (u8[k, tile, tile, 3] in reading order, tiles then the global view;
    (rows, cols)), k = rows * cols + 1, or 1 with (0, 0) when the image is not split.
    `pad_to_square`: first centred on a square (`images.expand_to_square`, LLaVA-1.5)."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"tile_image takes u8[H, W, 3], got {rgb.dtype}{list(rgb.shape)}")
    if pad_to_square:
        rgb = expand_to_square(rgb)
    height, width = _longest_edge_size(rgb.shape[0], rgb.shape[1], config.side * tile)
    image = Image.fromarray(rgb).resize((width, height), resample=Image.LANCZOS)
    height, width = _multiple_of_tile_size(height, width, tile)
    image = image.resize((width, height), resample=Image.LANCZOS)
    pixels = np.asarray(image, dtype=np.uint8)
    if height <= tile and width <= tile:
        # One tile: transformers keeps step 2's image as is, which is then exactly tile x tile.
        return pixels[None], (0, 0)
    rows, cols = height // tile, width // tile
    tiles = [pixels[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile]
             for r in range(rows) for c in range(cols)]
    tiles.append(np.asarray(image.resize((tile, tile), resample=Image.LANCZOS), dtype=np.uint8))
    return np.stack(tiles), (rows, cols)


@functools.lru_cache(maxsize=256)
def layout_text(rows: int, cols: int, image_token: str, tokens_per_tile: int) -> str:
    """The text one image becomes (Idefics3's processor, `replace_image_token`); the global
    block is the single-tile layout, IDEFICS3_IMAGE_WRAP around the image tokens. Cached: the
    pipeline asks for it per example, and a grid has few shapes."""
    run = image_token * tokens_per_tile
    global_block = IDEFICS3_IMAGE_WRAP[0] + run + IDEFICS3_IMAGE_WRAP[1]
    if rows == 0 and cols == 0:
        return global_block
    grid = "".join("".join(f"{FAKE_TOKEN}{row_col_token(r, c)}{run}" for c in range(cols)) + "\n"
                   for r in range(rows))
    return f"{grid}\n{global_block}"


def max_layout_tokens(config: TilingConfig, tokens_per_tile: int) -> int:
    """An upper bound on the tokens one image takes (its largest grid, n x n): image tokens,
    layout tokens, and each newline of the layout counted as a token of its own (a tokenizer
    that merges "\\n\\n" takes one fewer)."""
    if not config.enabled:
        return tokens_per_tile
    tiles = config.side * config.side
    grid = tiles * (2 + tokens_per_tile) + config.side  # fake + <row_r_col_c> + run; "\n" per row
    return grid + 1 + 3 + tokens_per_tile               # "\n", fake + <global-img> + run + fake


def model_images(rgb: np.ndarray, image_size: int, pad_to_square: bool = False,
                 config: TilingConfig | None = None) -> tuple[np.ndarray, tuple[int, int] | None]:
    """One decoded image u8[H, W, 3] -> (f32[k, S, S, 3] as the model reads it, its grid):
    without tiling k = 1 and the grid is None; with it, its tiles and global view (`tile_image`)
    and (rows, cols). What inference and evaluation feed, as the training pipeline does."""
    if config is None or not config.enabled:
        return preprocess_image(rgb, image_size, pad_to_square=pad_to_square)[None], None
    tiles, grid = tile_image(rgb, image_size, config, pad_to_square)
    return normalize_pixels(tiles), grid


def expand_placeholders(text: str, image_token: str, grids, tokens_per_tile: int) -> str:
    """`text` with its i-th `image_token` replaced by the layout text of grids[i] (rows, cols)."""
    chunks = text.split(image_token)
    if len(chunks) - 1 != len(grids):
        raise ValueError(f"{len(chunks) - 1} {image_token} placeholders for {len(grids)} images")
    out = [chunks[0]]
    for (rows, cols), chunk in zip(grids, chunks[1:]):
        out += [layout_text(int(rows), int(cols), image_token, tokens_per_tile), chunk]
    return "".join(out)
