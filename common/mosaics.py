"""Mosaic images: tiling crops into a grid, encoding the PNG quickly, and cutting the tiles back out.

02_mosaics builds every neuron's mosaic with these; 03 and 04 read a neuron's crops back out of its
mosaic, and 09 tiles a neuron's sub-concepts (groups of its top crops) the same way.
Tiles are laid best first, row by row; empty places stay grey.
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

BACKGROUND = 128  # grey for empty tiles and letterbox borders: neither black nor white features


def paste_tiles(tiles: Iterable[tuple[int, np.ndarray | None]], grid: int, tile: int
                ) -> tuple[np.ndarray, int]:
    """A grid × grid mosaic with each ``(rank, pixels)`` tile at its rank's place, row by row.

    ``pixels`` is tile × tile × 3 uint8, or None for a crop that could not be made (its place stays
    grey). Returns the mosaic and the number of tiles placed.
    """
    mosaic = np.full((grid * tile, grid * tile, 3), BACKGROUND, np.uint8)
    placed = 0
    for rank, pixels in tiles:
        if pixels is None:
            continue
        top, left = (rank // grid) * tile, (rank % grid) * tile
        mosaic[top:top + tile, left:left + tile] = pixels
        placed += 1
    return mosaic, placed


def png_bytes(rgb: np.ndarray) -> bytes:
    """Encode an RGB uint8 image as a PNG quickly.

    Every row uses PNG's "Up" filter (each byte minus the byte above it, which suits tiles scaled
    up from small crops), compressed by ISA-L at level 1: on 640-px photo mosaics about six times
    faster than zlib's level 1 for files a few percent larger. Encoding was most of 02's time.
    """
    height, width, _ = rgb.shape
    rows = np.ascontiguousarray(rgb).reshape(height, width * 3)
    filtered = np.empty((height, width * 3 + 1), np.uint8)
    filtered[:, 0] = 2  # filter type: Up
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # uint8 arithmetic wraps modulo 256
    from isal import isal_zlib  # here: stages that only tile images need not have ISA-L
    data = isal_zlib.compress(filtered, 1)

    def chunk(tag: bytes, body: bytes) -> list[bytes]:
        """One PNG chunk: length, tag, body, CRC of tag and body."""
        return [struct.pack(">I", len(body)), tag, body,
                struct.pack(">I", zlib.crc32(body, zlib.crc32(tag)))]

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return b"".join([b"\x89PNG\r\n\x1a\n", *chunk(b"IHDR", header), *chunk(b"IDAT", data),
                     *chunk(b"IEND", b"")])


def load_mosaic(path: str | Path) -> Image.Image:
    """Open a mosaic PNG as RGB."""
    with Image.open(path) as im:
        return im.convert("RGB")


def cut_tiles(mosaic: Image.Image | np.ndarray, grid: int, tile_px: int, n_tiles: int
              ) -> list[np.ndarray]:
    """The first ``n_tiles`` tiles of a mosaic (row by row) as uint8 arrays."""
    arr = np.asarray(mosaic)
    tiles = []
    for rank in range(min(n_tiles, grid * grid)):
        r, c = divmod(rank, grid)
        tiles.append(arr[r * tile_px:(r + 1) * tile_px, c * tile_px:(c + 1) * tile_px])
    return tiles
