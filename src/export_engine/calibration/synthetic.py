"""Built-in representative inputs: structured synthetic images and volumes (never zeros or constants).

Parity checks on constant or all-zero inputs hide bugs (a transposed axis or a wrong layout can still give
the right constant); these inputs have edges, gradients, texture and noise in every channel.
"""

from __future__ import annotations

import numpy as np


def structured_image(height: int, width: int, seed: int) -> np.ndarray:
    """One (3, H, W) float32 image in [-1, 1], the range MASt3R's image loading produces."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    y /= max(height - 1, 1)
    x /= max(width - 1, 1)
    channels = []
    for _ in range(3):
        fx, fy = rng.uniform(1.0, 6.0, size=2)
        phase = rng.uniform(0, 2 * np.pi)
        ramp = rng.uniform(-1, 1) * x + rng.uniform(-1, 1) * y
        waves = 0.5 * np.sin(2 * np.pi * (fx * x + fy * y) + phase)
        cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.3)
        disc = np.where((y - cy) ** 2 + (x - cx) ** 2 < r**2, rng.uniform(-0.8, 0.8), 0.0)
        checker = 0.2 * np.sign(np.sin(2 * np.pi * 8 * x) * np.sin(2 * np.pi * 8 * y))
        noise = 0.1 * rng.standard_normal((height, width))
        channels.append(ramp + waves + disc + checker + noise)
    image = np.stack(channels)
    image = 2 * (image - image.min()) / (image.max() - image.min()) - 1
    return image.astype(np.float32)


def structured_images(count: int, height: int, width: int, seed: int) -> np.ndarray:
    """(count, 3, H, W) float32 images, each different."""
    return np.stack([structured_image(height, width, seed * 1000 + i) for i in range(count)])


def structured_volume(size: int, seed: int) -> np.ndarray:
    """One (size, size, size) CT-like volume: background, a body, organs of other intensity, noise.

    Values are raw intensities (background 0 so that z-normalisation over voxels > 0 has something to do).
    """
    rng = np.random.default_rng(seed)
    z, y, x = (np.mgrid[0:size, 0:size, 0:size].astype(np.float64) + 0.5) / size - 0.5
    body = (z / 0.45) ** 2 + (y / 0.4) ** 2 + (x / 0.42) ** 2 < 1
    volume = np.where(body, 200.0 + 30 * z + 20 * y, 0.0)
    for _ in range(4):
        c = rng.uniform(-0.2, 0.2, size=3)
        r = rng.uniform(0.05, 0.15)
        organ = (z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 < r**2
        volume = np.where(organ & body, rng.uniform(300, 900), volume)
    volume = volume + np.where(body, 15 * rng.standard_normal(volume.shape), 0.0)
    return np.clip(volume, 0, None).astype(np.float32)
