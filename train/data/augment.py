"""Fine-tuning augmentation on the device, for whole batches: RandAugment, random erasing, mixup /
cutmix with label smoothing.

They run after the loader (DALI or PyTorch alike), on normalised (B, 3, H, W) batches, drawing every
random number from a ``torch.Generator`` the caller seeds, so a run is reproducible and no host
synchronisation is needed. Written for this project from the published descriptions (RandAugment:
Cubuk et al. 2020; random erasing: Zhong et al. 2020; mixup, CutMix); timm cannot be a dependency on
a CPU machine. Differences from timm's ``rand-m9-mstd0.5-inc1``: no Equalize op; geometric ops
resample bilinearly with a grey fill.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from train.data import IMAGENET_MEAN, IMAGENET_STD

# The "increasing" RandAugment set: a larger magnitude always means a stronger change.
COLOR_OPS = ("identity", "autocontrast", "invert", "posterize", "solarize", "solarize_add", "color", "contrast",
             "brightness", "sharpness")
GEOMETRIC_OPS = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
OPS = COLOR_OPS + GEOMETRIC_OPS


def _stats(imgs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, 3, 1, 1)
    return (torch.tensor(IMAGENET_MEAN, device=imgs.device).view(shape),
            torch.tensor(IMAGENET_STD, device=imgs.device).view(shape))


def denormalize(imgs: torch.Tensor) -> torch.Tensor:
    mean, std = _stats(imgs)
    return imgs * std + mean


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    mean, std = _stats(pixels)
    return (pixels - mean) / std


def _grey(x: torch.Tensor) -> torch.Tensor:
    w = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def _blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """b + factor * (a - b), clamped: factor 1 gives a, 0 gives b."""
    return (b + factor.view(-1, 1, 1, 1) * (a - b)).clamp(0, 1)


def _color_op(name: str, x: torch.Tensor, m: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """One colour op on every image of x ([0, 1] pixels) at per-image magnitudes m in [0, 1]."""
    factor = 1.0 + sign * 0.9 * m  # enhancement factor in [0.1, 1.9]
    if name == "identity":
        return x
    if name == "autocontrast":
        lo = x.amin(dim=(2, 3), keepdim=True)
        hi = x.amax(dim=(2, 3), keepdim=True)
        scale = torch.where(hi > lo, 1.0 / (hi - lo).clamp_min(1e-6), torch.ones_like(hi))
        return torch.where(hi > lo, (x - lo) * scale, x)
    if name == "invert":
        return 1.0 - x
    if name == "posterize":
        bits = (8 - (m * 4).round()).view(-1, 1, 1, 1)  # 8 .. 4 bits kept
        step = 2.0 ** (8 - bits)
        return torch.floor(x * 255 / step) * step / 255
    if name == "solarize":
        threshold = (1.0 - m).view(-1, 1, 1, 1)
        return torch.where(x >= threshold, 1.0 - x, x)
    if name == "solarize_add":
        return torch.where(x < 0.5, (x + (110 / 255) * m.view(-1, 1, 1, 1)).clamp(max=1.0), x)
    if name == "color":
        return _blend(x, _grey(x).expand_as(x), factor)
    if name == "contrast":
        return _blend(x, _grey(x).mean(dim=(2, 3), keepdim=True).expand_as(x), factor)
    if name == "brightness":
        return _blend(x, torch.zeros_like(x), factor)
    if name == "sharpness":
        kernel = torch.tensor([[1, 1, 1], [1, 5, 1], [1, 1, 1]], device=x.device, dtype=x.dtype) / 13
        smooth = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel.expand(3, 1, 3, 3), groups=3)
        return _blend(x, smooth, factor)
    raise ValueError(name)


def _affine(name: str, m: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """(B, 2, 3) affine matrices in normalised coordinates for one geometric op."""
    B = m.shape[0]
    theta = torch.zeros(B, 2, 3, device=m.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    v = sign * m
    if name == "rotate":
        angle = v * math.radians(30)
        theta[:, 0, 0], theta[:, 0, 1] = angle.cos(), -angle.sin()
        theta[:, 1, 0], theta[:, 1, 1] = angle.sin(), angle.cos()
    elif name == "shear_x":
        theta[:, 0, 1] = v * 0.3
    elif name == "shear_y":
        theta[:, 1, 0] = v * 0.3
    elif name == "translate_x":
        theta[:, 0, 2] = v * 0.45 * 2  # 45% of the width; normalised coordinates span 2
    elif name == "translate_y":
        theta[:, 1, 2] = v * 0.45 * 2
    return theta


def rand_augment(imgs: torch.Tensor, gen: torch.Generator, num_ops: int = 2, magnitude: float = 9.0,
                 magnitude_std: float = 0.5, prob: float = 0.5) -> torch.Tensor:
    """RandAugment on a normalised batch: each image gets ``num_ops`` ops drawn uniformly, each
    applied with probability ``prob`` at magnitude N(magnitude, magnitude_std) / 10 (clipped to
    [0, 1]) and a random sign where the op has one."""
    B, dev = imgs.shape[0], imgs.device
    x = denormalize(imgs.float())
    fill = torch.full((1, 3, 1, 1), 0.5, device=dev)
    for _ in range(num_ops):
        op = torch.randint(len(OPS), (B,), device=dev, generator=gen)
        apply = torch.rand(B, device=dev, generator=gen) < prob
        m = ((magnitude + magnitude_std * torch.randn(B, device=dev, generator=gen)) / 10).clamp(0, 1)
        sign = torch.where(torch.rand(B, device=dev, generator=gen) < 0.5, -1.0, 1.0)
        out = x
        for k, name in enumerate(COLOR_OPS):
            chosen = (apply & (op == k)).view(-1, 1, 1, 1)
            out = torch.where(chosen, _color_op(name, x, m, sign), out)
        # All geometric ops of this layer in one resampling: identity matrices elsewhere.
        theta = _affine("identity", m, sign)
        for k, name in enumerate(GEOMETRIC_OPS, start=len(COLOR_OPS)):
            chosen = (apply & (op == k)).view(-1, 1, 1)
            theta = torch.where(chosen, _affine(name, m, sign), theta)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        warped = F.grid_sample(torch.cat([out, torch.ones_like(out[:, :1])], 1), grid, mode="bilinear",
                               padding_mode="zeros", align_corners=False)
        inside = warped[:, 3:]
        x = warped[:, :3] + (1 - inside) * fill
    return normalize(x).to(imgs.dtype)


def random_erase(imgs: torch.Tensor, gen: torch.Generator, prob: float = 0.25,
                 area: tuple[float, float] = (0.02, 1 / 3),
                 log_ratio: tuple[float, float] = (math.log(0.3), math.log(1 / 0.3))) -> torch.Tensor:
    """With probability ``prob`` per image, replace a random rectangle with per-pixel N(0, 1) noise
    (in normalised space)."""
    B, _, H, W = imgs.shape
    dev = imgs.device
    target = H * W * (area[0] + (area[1] - area[0]) * torch.rand(B, device=dev, generator=gen))
    ratio = torch.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * torch.rand(B, device=dev, generator=gen))
    h = (target * ratio).sqrt().round().clamp(1, H)
    w = (target / ratio).sqrt().round().clamp(1, W)
    top = ((H - h + 1) * torch.rand(B, device=dev, generator=gen)).floor()
    left = ((W - w + 1) * torch.rand(B, device=dev, generator=gen)).floor()
    rows = torch.arange(H, device=dev).view(1, H, 1)
    cols = torch.arange(W, device=dev).view(1, 1, W)
    box = ((rows >= top.view(-1, 1, 1)) & (rows < (top + h).view(-1, 1, 1))
           & (cols >= left.view(-1, 1, 1)) & (cols < (left + w).view(-1, 1, 1)))
    erase = (box & (torch.rand(B, device=dev, generator=gen) < prob).view(-1, 1, 1)).unsqueeze(1)
    noise = torch.randn(imgs.shape, device=dev, generator=gen, dtype=imgs.dtype)
    return torch.where(erase, noise, imgs)


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / num_classes
    return torch.full((labels.shape[0], num_classes), off, device=labels.device).scatter_(
        1, labels.view(-1, 1), 1.0 - smoothing + off)


def mixup_cutmix(imgs: torch.Tensor, labels: torch.Tensor, num_classes: int, host_gen: torch.Generator,
                 mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, switch_prob: float = 0.5,
                 smoothing: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix each image with the batch's reversed order, by mixup or (with ``switch_prob``) CutMix;
    returns the mixed images and soft targets (B, num_classes), each row summing to one.

    The per-batch draws (which of the two, lambda, the box) come from ``host_gen``, a CPU generator,
    so they cost no device synchronisation."""
    targets = smooth_one_hot(labels, num_classes, smoothing)
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return imgs, targets
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or torch.rand((), generator=host_gen).item() < switch_prob)
    lam = _beta(cutmix_alpha if use_cutmix else mixup_alpha, host_gen)
    partner = imgs.flip(0)
    if use_cutmix:
        H, W = imgs.shape[-2:]
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(H * cut), int(W * cut)
        cy, cx = int(torch.randint(H, (), generator=host_gen)), int(torch.randint(W, (), generator=host_gen))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, H)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, W)
        imgs = imgs.clone()
        imgs[..., y0:y1, x0:x1] = partner[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (H * W)  # the share of the image actually kept
    else:
        imgs = lam * imgs + (1.0 - lam) * partner
    return imgs, lam * targets + (1.0 - lam) * targets.flip(0)


def _beta(alpha: float, gen: torch.Generator) -> float:
    """A Beta(alpha, alpha) draw from the CPU generator ``gen``, as the ratio of two Gamma draws."""
    g1, g2 = _gamma(alpha, gen), _gamma(alpha, gen)
    return g1 / (g1 + g2)


def _gamma(alpha: float, gen: torch.Generator) -> float:
    """Marsaglia-Tsang Gamma(alpha, 1), boosted for alpha < 1."""
    boost = 1.0
    if alpha < 1.0:
        boost = torch.rand((), generator=gen).item() ** (1.0 / alpha)
        alpha += 1.0
    d = alpha - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    while True:
        z = torch.randn((), generator=gen).item()
        v = (1.0 + c * z) ** 3
        if v <= 0:
            continue
        u = torch.rand((), generator=gen).item()
        if math.log(u) < 0.5 * z * z + d - d * v + d * math.log(v):
            return boost * d * v


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
