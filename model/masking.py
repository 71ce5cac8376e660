"""Masking arithmetic and token gathers, exactly as SPEC.md section 1 states them.

Every shape here is fixed by the configuration, never by tensor values: the split sizes come from
Python arithmetic on the ratios, and the index tensors come from an argsort of the noise. There is
no boolean indexing and no host synchronisation. The patch layout itself (patchify, unpatchify, patch
gathers and scatters) and the norm-pix statistics are kernels/reference.py's, which the reference path
calls (model/ops.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MaskSplit:
    """How the L patches of an image are divided.

    Visible: the first ``len_keep`` of the noise's ascending argsort, seen by the encoder.
    Predicted: the last ``n_pred``, decoded and scored. The ``len_masked`` in between are hidden
    from the encoder and never decoded (CrossMAE's partial reconstruction; zero for MAE).
    """

    num_patches: int
    len_keep: int
    len_masked: int
    n_pred: int

    @classmethod
    def from_ratios(cls, num_patches: int, mask_ratio: float, kept_mask_ratio: float) -> MaskSplit:
        # The authors' expressions, evaluated in Python floats, so the sizes agree bit for bit.
        len_keep = int(num_patches * (1 - mask_ratio))
        len_masked = int(num_patches * (mask_ratio - kept_mask_ratio))
        return cls(num_patches, len_keep, len_masked, num_patches - len_keep - len_masked)


def check_ratios(num_patches: int, mask_ratio: float, kept_mask_ratio: float) -> MaskSplit:
    """Validate the ratios; raise ValueError naming the argument and the allowed range."""
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
    if not 0.0 < kept_mask_ratio <= mask_ratio:
        raise ValueError(f"kept_mask_ratio must be in (0, mask_ratio={mask_ratio}], got {kept_mask_ratio}")
    split = MaskSplit.from_ratios(num_patches, mask_ratio, kept_mask_ratio)
    if split.len_keep < 1:
        raise ValueError(f"mask_ratio={mask_ratio} leaves no visible patch out of {num_patches}; "
                         f"use mask_ratio <= {1 - 1 / num_patches:.4f}")
    if split.n_pred < 1:
        raise ValueError(f"kept_mask_ratio={kept_mask_ratio} predicts no patch out of {num_patches}; "
                         f"use kept_mask_ratio >= {1 / num_patches:.4f}")
    return split


def split_ids(noise: torch.Tensor, split: MaskSplit) -> tuple[torch.Tensor, torch.Tensor]:
    """(visible_ids (B, len_keep) in shuffle order, pred_ids (B, n_pred) in ascending patch order).

    The visible order is the reference's (it sets the float summation order of the encoder's
    attention); the predicted ids are sorted, which is the order the reference decodes them in.
    """
    ids_shuffle = torch.argsort(noise, dim=1)
    visible_ids = ids_shuffle[:, : split.len_keep]
    pred_ids = ids_shuffle[:, split.num_patches - split.n_pred:].sort(dim=1).values
    return visible_ids, pred_ids


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x: (B, L, C), ids: (B, n) -> (B, n, C)."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
