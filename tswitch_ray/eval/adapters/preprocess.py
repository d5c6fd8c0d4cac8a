"""How dataset rows become input tensors: the image and token collators.

Resizing and normalisation belong to the model, not the data, so the
datasets hand out decoded rows (PIL images, token lists) and an adapter's
``collate`` calls one of these with its :class:`Preprocess`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from tswitch_ray.errors import ConfigError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Preprocess:
    """How dataset rows become input tensors.

    ``modality="image"``: resize the shorter side to ``image_size`` (bicubic),
    centre-crop, scale to [0, 1], normalise by ``mean``/``std`` (open_clip's
    eval transform). ``modality="text"``: right-pad token ids with
    ``pad_token_id`` to the longest row, truncating at ``max_length``.
    """

    modality: str
    image_size: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    pad_token_id: int | None = None
    max_length: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _resize_and_crop(img: Image.Image, size: int) -> Image.Image:
    """torchvision ``Resize(size)`` (shorter side, bicubic, longer side truncated) then ``CenterCrop(size)``."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    if short != size:
        new_long = int(size * long / short)
        new_w, new_h = (size, new_long) if w <= h else (new_long, size)
        img = img.resize((new_w, new_h), Image.BICUBIC)
        w, h = img.size
    if (w, h) != (size, size):  # torchvision CenterCrop offsets
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
        img = img.crop((left, top, left + size, top + size))
    return img


def collate_images(items: Sequence[Image.Image], pre: Preprocess) -> torch.Tensor:
    """PIL images -> float32 ``[B, 3, S, S]``, normalised.

    Exactly open_clip's eval transform (``open_clip.image_transform(S,
    is_train=False)``: torchvision ``Resize(S, bicubic)`` of the shorter side,
    ``CenterCrop(S)``, RGB conversion, ``ToTensor``, ``Normalize``), so that
    accuracies match the papers' preprocessing pixel for pixel.
    """
    size = int(pre.image_size or 0)
    if size <= 0:
        raise ConfigError(f"image preprocessing needs a positive image_size, got {pre.image_size!r}.")
    arrs = [np.asarray(_resize_and_crop(img, size).convert("RGB"), dtype=np.uint8) for img in items]
    if not arrs:
        return torch.empty((0, 3, size, size), dtype=torch.float32)
    x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(pre.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean) / std


def collate_tokens(items: Sequence[Sequence[int]], pre: Preprocess) -> torch.Tensor:
    """Token-id lists -> int64 ``[B, T]`` right-padded with the pad id."""
    pad = int(pre.pad_token_id if pre.pad_token_id is not None else 0)
    cap = pre.max_length
    rows = [list(r)[:cap] if cap else list(r) for r in items]
    longest = max((len(r) for r in rows), default=0) or 1
    out = torch.full((len(rows), longest), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out
