"""Gradient (Perlin) noise in torch: the shape of DRAEM's synthetic anomalies and of procedural textures."""

from __future__ import annotations

import math

import torch


def _fade(t: torch.Tensor) -> torch.Tensor:
    return t * t * t * (t * (t * 6 - 15) + 10)  # 6t^5 - 15t^4 + 10t^3: zero 1st and 2nd derivative at 0 and 1


def perlin_noise(height: int, width: int, resolution: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """H x W gradient noise with `resolution` = (rows, columns) of lattice cells over the image.

    Classic Perlin noise, as the DRAEM authors' `rand_perlin_2d_np`: a random unit gradient at
    every lattice corner; at a pixel, the dot products of the four corner gradients with the
    offsets to that pixel, blended by the quintic fade; scaled by sqrt(2) to span about [-1, 1].
    Pixel i of a side of n pixels sits at lattice coordinate i * cells / n, so for sides that
    are multiples of the resolution the values equal the authors'; other sizes work too.
    """
    rows, columns = resolution
    if rows < 1 or columns < 1:
        raise ValueError(f"resolution must be positive, got {resolution}")
    angles = 2 * math.pi * torch.rand(rows + 1, columns + 1, generator=generator, dtype=torch.float64)
    gradients = torch.stack([angles.cos(), angles.sin()], dim=-1)
    y = torch.arange(height, dtype=torch.float64) * rows / height
    x = torch.arange(width, dtype=torch.float64) * columns / width
    cell_y, cell_x = y.floor().long(), x.floor().long()
    fy, fx = (y - cell_y).view(-1, 1), (x - cell_x).view(1, -1)
    cy, cx = cell_y.view(-1, 1), cell_x.view(1, -1)

    def ramp(dy: int, dx: int) -> torch.Tensor:
        gradient = gradients[cy + dy, cx + dx]
        return (fy - dy) * gradient[..., 0] + (fx - dx) * gradient[..., 1]

    ty, tx = _fade(fy), _fade(fx)
    top = torch.lerp(ramp(0, 0), ramp(1, 0), ty)
    bottom = torch.lerp(ramp(0, 1), ramp(1, 1), ty)
    return (math.sqrt(2) * torch.lerp(top, bottom, tx)).float()


def fractal_noise(
    height: int, width: int, generator: torch.Generator, base_resolution: int = 2, octaves: int = 4, persistence: float = 0.5
) -> torch.Tensor:
    """Sum of Perlin octaves (resolution doubling, amplitude x `persistence`), H x W, roughly in [-1, 1]."""
    noise = torch.zeros(height, width)
    amplitude, total = 1.0, 0.0
    for octave in range(octaves):
        resolution = base_resolution * 2**octave
        noise += amplitude * perlin_noise(height, width, (resolution, resolution), generator)
        total += amplitude
        amplitude *= persistence
    return noise / total
