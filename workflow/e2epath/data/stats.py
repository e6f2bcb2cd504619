"""The RGB statistics (0-1 scale) patches are normalised with unless an encoder's preset says
otherwise: ImageNet's. Plain numbers, so the presets (read when the workflow is parsed) need no torch."""
from __future__ import annotations

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
