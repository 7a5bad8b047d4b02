"""Multi-scale training: the input size for each step, identical on every rank.

The size is a pure function of ``(seed, step // every)``, so every rank computes the same size
for the same step with no communication. The batch is resized in the main process (workers
produce one fixed canvas size), so a size change never waits for workers to catch up.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def size_for_step(step: int, seed: int, every: int, min_size: int, max_size: int) -> int:
    """A multiple of 32 in [min_size, max_size], constant for ``every`` steps at a time."""
    if min_size == max_size:
        return min_size
    rng = np.random.default_rng([seed, 7919, step // max(1, every)])
    return int(rng.integers(min_size // 32, max_size // 32 + 1)) * 32


def resize_batch(images: torch.Tensor, targets: torch.Tensor,
                 size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize a square batch [B,3,S,S] to ``size`` and scale the targets' boxes with it."""
    current = images.shape[-1]
    if current == size:
        return images, targets
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    targets = targets.clone()
    targets[:, 2:6] *= size / current
    return images, targets
