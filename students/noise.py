"""Label corruption of the training split; remembers which labels were corrupted.

``symmetric``: with probability r a label moves to a uniformly drawn *other* class.
``pairflip``: with probability r label c becomes (c + 1) mod K.
Validation and test labels are never touched.
"""

from __future__ import annotations

import torch

from students.data import check_name

NOISE_TYPES = ("none", "symmetric", "pairflip")


def corrupt_labels(
    labels: torch.Tensor, num_classes: int, noise: str, rate: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(noisy_labels, corrupted_mask)`` for ``labels`` under the named noise at ``rate``.

    Randomness comes from a CPU generator seeded with ``seed``, so the corruption is the same on
    every device.
    """
    check_name("noise", noise, NOISE_TYPES)
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"noise rate must be in [0, 1), got {rate}")
    if noise == "none" or rate == 0.0:
        return labels.clone(), torch.zeros_like(labels, dtype=torch.bool)
    generator = torch.Generator().manual_seed(seed)
    cpu_labels = labels.cpu()
    flip = torch.rand(len(cpu_labels), generator=generator) < rate
    if noise == "symmetric":
        # An offset in 1..K-1 always lands on another class, uniformly.
        offset = torch.randint(1, num_classes, (len(cpu_labels),), generator=generator)
    else:
        offset = torch.ones_like(cpu_labels)
    noisy = torch.where(flip, (cpu_labels + offset) % num_classes, cpu_labels)
    return noisy.to(labels.device), flip.to(labels.device)
