"""The one table of GPU peaks: what MFU (train/monitor.py, bench/harness.py) divides by and what the step
ledger's roofline estimate (bench/ledger/) assumes. Datasheet numbers, dense (no 2:4 sparsity).

Sources (NVIDIA datasheets; the sparse figures there are twice the dense ones given here):
* H200 SXM: "NVIDIA H200 Tensor Core GPU" datasheet: BF16/FP16 tensor core 1,979 TFLOPS with sparsity,
  FP32 67 TFLOPS, 141 GB HBM3e at 4.8 TB/s.
* H100 SXM5: "NVIDIA H100 Tensor Core GPU" datasheet: BF16/FP16 1,979 TFLOPS with sparsity, FP32 67 TFLOPS,
  80 GB HBM3 at 3.35 TB/s.
* H100 PCIe: the same datasheet: BF16/FP16 1,513 TFLOPS with sparsity, FP32 51 TFLOPS, 80 GB HBM2e at 2 TB/s.
* A100 SXM4 80GB: "NVIDIA A100 Tensor Core GPU" datasheet: BF16/FP16 312 TFLOPS dense, FP32 19.5 TFLOPS,
  2,039 GB/s (the 40 GB card: 1,555 GB/s; the same FLOP/s, which is all MFU reads).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Card:
    name: str
    bandwidth: float  # bytes/s, peak HBM
    peak_flops: dict[str, float]  # FLOP/s by precision, dense (bf16/fp16 tensor cores; fp32 without TF32)
    launch_overhead_s: float = 3e-6  # host-side cost of one eager launch (the ledger shows it apart)


CARDS: dict[str, Card] = {
    "H200": Card("NVIDIA H200", 4.8e12, {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    "H100": Card("NVIDIA H100 SXM", 3.35e12, {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    "H100-PCIe": Card("NVIDIA H100 PCIe", 2.0e12, {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12}),
    "A100": Card("NVIDIA A100 SXM4 80GB", 2.039e12, {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}),
}

# torch.cuda.get_device_name() substrings -> CARDS key, most specific first: "NVIDIA H100 PCIe" before any
# other H100 ("NVIDIA H100 80GB HBM3" is the SXM card).
_BY_DEVICE_NAME = (("H200", "H200"), ("H100 PCIe", "H100-PCIe"), ("H100", "H100"), ("A100", "A100"))


def card_for_device_name(device_name: str) -> Card | None:
    """The card a CUDA device name reports, or None for a card not in the table."""
    return next((CARDS[key] for part, key in _BY_DEVICE_NAME if part in device_name), None)


def peak_flops(device: torch.device, precision: str = "bf16") -> float | None:
    """The device's dense peak FLOP/s at ``precision`` (MFU's denominator); None on the CPU or an unlisted card."""
    if device.type != "cuda":
        return None
    card = card_for_device_name(torch.cuda.get_device_name(device))
    return None if card is None else card.peak_flops[precision]
