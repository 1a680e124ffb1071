"""What is done to images on their way to a network: normalisation, the CIFAR crop and
flip, the ImageNet recipe's views, and per-channel statistics.

Owns `normalise`, `crop_flip` (in-memory sets), `crop_params`, `train_view`, `eval_view`
(streamed folders: torchvision.transforms.v2 functionals on PIL images), `channel_stats`
and the ImageNet constants. Imports mgrow.manifest (DatasetSpec) only.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from ..manifest import DatasetSpec

PAD = 4  # pixels of zero padding before the random crop
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_FRACTION = 0.875  # eval: resize the shorter side to S / 0.875, centre-crop S
SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)  # RandomResizedCrop's defaults
STATS = ("imagenet", "sample")  # --stats: ImageNet's mean/std, or measured on a sample
STATS_SAMPLE = 1000  # --stats sample: images measured (evenly spaced over the training split)


def channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Return the per-channel mean and std (0-1 scale) of uint8 images (N, C, H, W)."""
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    squares = torch.zeros(x.shape[1], dtype=torch.float64)
    for chunk in x.split(4096):  # float64 copies of a chunk only: sums of integers are exact
        f = chunk.to(torch.float64)  # (n, C, H, W)
        total += f.sum((0, 2, 3))
        squares += (f * f).sum((0, 2, 3))
    count = x.numel() // x.shape[1]
    mean = total / count
    std = (squares / count - mean * mean).clamp_min(0).sqrt()
    return tuple((mean / 255).tolist()), tuple((std / 255).clamp_min(1e-8).tolist())


def normalise(x: torch.Tensor, spec: DatasetSpec) -> torch.Tensor:
    """Return uint8 images (b, C, H, W) as float32 normalised by the spec's mean and std."""
    mean, std = _scale(spec.mean, spec.std, x.device)
    return x.float().sub_(mean).div_(std)  # in place: the same float32 ops, one buffer


@functools.lru_cache(maxsize=16)
def _scale(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Return mean and std (1, C, 1, 1) on the 0-255 scale on `device`, made once: a fresh
    torch.tensor(..., device=cuda) per batch is a blocking copy, a host sync every step."""
    def column(v: tuple[float, ...]) -> torch.Tensor:
        return (torch.tensor(v).view(1, -1, 1, 1) * 255).to(device)  # float32, as always
    return column(mean), column(std)


def crop_flip(x: torch.Tensor, shift: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Return images (B, C, H, W) zero-padded by PAD, cropped at shift (B, 2), mirrored if flip."""
    b, c, h, w = x.shape
    padded = F.pad(x, (PAD, PAD, PAD, PAD))  # (B, C, H + 2 PAD, W + 2 PAD)
    rows = shift[:, :1] + torch.arange(h)  # (B, H)
    cols = shift[:, 1:] + torch.arange(w)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    picked = padded.gather(2, rows[:, None, :, None].expand(b, c, h, w + 2 * PAD))
    return picked.gather(3, cols[:, None, None, :].expand(b, c, h, w))  # (B, C, H, W)


def crop_params(height: int, width: int, g: torch.Generator) -> tuple[int, int, int, int]:
    """Return RandomResizedCrop's (top, left, height, width), drawn from `g` by torchvision's
    own rule: 10 tries at a random area share in SCALE and log-uniform aspect in RATIO, else
    the centre crop clamped to RATIO."""
    area = height * width
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        u = torch.rand(4, generator=g, dtype=torch.float64).tolist()
        target = area * (SCALE[0] + (SCALE[1] - SCALE[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(u[2] * (height - h + 1)), int(u[3] * (width - w + 1)), h, w
    ratio = width / height
    if ratio < RATIO[0]:
        w, h = width, int(round(width / RATIO[0]))
    elif ratio > RATIO[1]:
        h, w = height, int(round(height * RATIO[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def train_view(image, size: int, g: torch.Generator) -> torch.Tensor:
    """Return RandomResizedCrop(size) + random horizontal flip of a PIL image, uint8 (3, S, S)."""
    from torchvision.transforms.v2 import functional as TF
    top, left, h, w = crop_params(image.height, image.width, g)
    out = TF.resized_crop(image, top, left, h, w, [size, size], antialias=True)
    if torch.rand(1, generator=g).item() < 0.5:
        out = TF.horizontal_flip(out)
    return TF.pil_to_tensor(out)


def eval_view(image, size: int) -> torch.Tensor:
    """Return Resize(round(size / 0.875)) + CenterCrop(size) of a PIL image, uint8 (3, S, S)."""
    from torchvision.transforms.v2 import functional as TF
    out = TF.resize(image, [round(size / CROP_FRACTION)], antialias=True)
    return TF.pil_to_tensor(TF.center_crop(out, [size, size]))
