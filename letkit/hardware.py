"""Data-sheet peaks of common GPUs, for MFU and roofline figures."""

from __future__ import annotations

__all__ = ["GPU_PEAKS", "datasheet_peaks"]

# Dense (no sparsity) bf16 tensor-core FLOP/s and HBM bytes/s from the vendors' data sheets. Matched as substrings
# of torch.cuda.get_device_name(), in this order: more specific names first.
GPU_PEAKS: dict[str, tuple[float, float]] = {
    "H100 PCIe": (756e12, 2.0e12),
    "H100 NVL": (835e12, 3.9e12),
    "H100": (989e12, 3.35e12),  # SXM5, HBM3
    "H200": (989e12, 4.8e12),
    "H800": (989e12, 3.35e12),
    "A100": (312e12, 2.0e12),  # 80 GB SXM: 2.04 TB/s
    "B200": (2250e12, 8.0e12),
    "L40S": (362e12, 0.864e12),
}


def datasheet_peaks(device_name: str) -> tuple[str, float, float] | None:
    """``(matched key, bf16 FLOP/s, bytes/s)`` for a GPU name such as ``"NVIDIA H200"``; None when unknown."""
    for key, (flops, bandwidth) in GPU_PEAKS.items():
        if key in device_name:
            return key, flops, bandwidth
    return None
