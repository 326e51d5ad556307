"""What a machine is: published figures of named GPUs, and a description of this machine.

Published figures are the vendors' datasheet numbers: peak *dense* bfloat16 tensor throughput
(datasheets list the 2:4-sparsity figure first; dense is half of it), memory capacity and
bandwidth. A plan labels every figure taken from here as "published".
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class DeviceSpec:
    """A device a plan can target."""

    name: str
    bf16_tflops: float  # peak dense bfloat16 tensor TFLOP/s
    memory_gb: float  # device memory, 1e9 bytes
    bandwidth_gbs: float  # memory bandwidth, GB/s
    source: str  # where the numbers come from
    kind: str = "cuda"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def memory_bytes(self) -> float:
        return self.memory_gb * 1e9


# Sources (vendor datasheets; dense = half the "with sparsity" figure they print):
# - H100 SXM / PCIe: "NVIDIA H100 Tensor Core GPU" datasheet: BF16 1,979 / 1,513 TFLOPS with
#   sparsity, 80 GB, 3.35 / 2.0 TB/s.
# - H200 SXM / NVL: "NVIDIA H200 Tensor Core GPU" datasheet: BF16 1,979 / 1,671 TFLOPS with
#   sparsity, 141 GB HBM3e, 4.8 TB/s.
# - A100 SXM 80GB / 40GB, PCIe 80GB: "NVIDIA A100 Tensor Core GPU" datasheet: BF16 312 TFLOPS
#   dense (624 sparse), 80 GB at 2,039 GB/s (SXM) / 1,935 GB/s (PCIe), 40 GB at 1,555 GB/s.
# - L40S: "NVIDIA L40S GPU" datasheet: BF16 362.05 TFLOPS dense (733 sparse), 48 GB GDDR6,
#   864 GB/s.
# - L4: "NVIDIA L4 Tensor Core GPU" datasheet: BF16 242 TFLOPS with sparsity, 24 GB, 300 GB/s.
# - A10: "NVIDIA A10 Tensor Core GPU" datasheet: BF16 250 TFLOPS with sparsity, 24 GB, 600 GB/s.
# - RTX 4090: "NVIDIA Ada GPU Architecture" whitepaper, appendix table: BF16 tensor with FP32
#   accumulate 165.2 TFLOPS dense (330.4 sparse), 24 GB GDDR6X, 1,008 GB/s.
PUBLISHED: dict[str, DeviceSpec] = {
    d.name: d
    for d in (
        DeviceSpec("h100-sxm", 989.4, 80, 3350, "NVIDIA H100 datasheet (SXM5)"),
        DeviceSpec("h100-pcie", 756.5, 80, 2000, "NVIDIA H100 datasheet (PCIe)"),
        DeviceSpec("h200-sxm", 989.4, 141, 4800, "NVIDIA H200 datasheet (SXM)"),
        DeviceSpec("h200-nvl", 835.5, 141, 4800, "NVIDIA H200 datasheet (NVL)"),
        DeviceSpec("a100-sxm-80gb", 312, 80, 2039, "NVIDIA A100 datasheet (SXM 80GB)"),
        DeviceSpec("a100-pcie-80gb", 312, 80, 1935, "NVIDIA A100 datasheet (PCIe 80GB)"),
        DeviceSpec("a100-40gb", 312, 40, 1555, "NVIDIA A100 datasheet (40GB)"),
        DeviceSpec("l40s", 362, 48, 864, "NVIDIA L40S datasheet"),
        DeviceSpec("l4", 121, 24, 300, "NVIDIA L4 datasheet"),
        DeviceSpec("a10", 125, 24, 600, "NVIDIA A10 datasheet"),
        DeviceSpec("rtx-4090", 165.2, 24, 1008, "NVIDIA Ada architecture whitepaper (RTX 4090)"),
    )
}
ALIASES = {
    "h100": "h100-sxm",
    "h200": "h200-sxm",
    "a100": "a100-sxm-80gb",
    "a100-80gb": "a100-sxm-80gb",
    "a100-sxm": "a100-sxm-80gb",
    "4090": "rtx-4090",
}
DEFAULT_GPU = "h100-sxm"


def _norm(name: str) -> str:
    return name.strip().lower().replace(" ", "-").replace("_", "-")


def published_device(name: str) -> DeviceSpec:
    """The published spec of a GPU named like ``h100``, ``H100-SXM``, ``a100-40gb``."""
    key = _norm(name)
    key = ALIASES.get(key, key)
    if key not in PUBLISHED:
        raise ValueError(
            f"no published figures for GPU '{name}'; known: {', '.join(PUBLISHED)} "
            f"(aliases: {', '.join(ALIASES)}). For another device, run `gap3d bench` on it and "
            "pass --calibration"
        )
    return PUBLISHED[key]


def match_device_name(device_name: str) -> DeviceSpec | None:
    """The published spec of a CUDA device name such as ``NVIDIA H100 80GB HBM3``, if known."""
    n = _norm(device_name)
    rules = [
        ("h200", "nvl", "h200-nvl", "h200-sxm"),
        ("h100", "pcie", "h100-pcie", "h100-sxm"),
        ("a100", "pcie", "a100-pcie-80gb", "a100-sxm-80gb"),
    ]
    for key, variant, if_variant, otherwise in rules:
        if key in n:
            if key == "a100" and "40gb" in n:
                return PUBLISHED["a100-40gb"]
            return PUBLISHED[if_variant if variant in n else otherwise]
    for key in ("l40s", "l4", "a10", "4090"):
        if key in n.split("-") or (key == "4090" and "4090" in n):
            return PUBLISHED[ALIASES.get(key, key)]
    return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except Exception:  # noqa: BLE001 - optional detail
        return None


def describe_machine() -> dict[str, Any]:
    """This machine: OS, CPU (model, cores, SIMD level torch uses), RAM, CUDA devices."""
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append(
                {
                    "name": p.name,
                    "memory_bytes": int(p.total_memory),
                    "capability": f"{p.major}.{p.minor}",
                }
            )
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "ram_bytes": _ram_bytes(),
        "cuda_devices": gpus,
    }


def versions() -> dict[str, str]:
    """Versions of the packages whose speed or layout a calibration depends on."""
    import importlib.metadata as md

    out = {}
    for pkg in ("gap3d", "torch", "transformers", "zarr", "lightning", "numpy", "dask"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "-"
    out["torch"] = torch.__version__  # with its build tag (+cpu, +cu130)
    out["cuda"] = str(torch.version.cuda or "-")
    return out


def matmul_tflops(device: str = "cpu", dtype: str = "float32", n: int = 1024) -> float:
    """Measured dense matmul throughput (TFLOP/s) of ``device`` at ``dtype`` (n x n x n).

    A reference point recorded with a calibration: it tells how fast this machine's matrix
    units are (e.g. a CPU without AMX runs bfloat16 far slower than float32).
    """
    dt = getattr(torch, dtype)
    a = torch.randn(n, n, device=device).to(dt)
    b = torch.randn(n, n, device=device).to(dt)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    a @ b
    sync()
    reps, t0 = 0, time.perf_counter()
    while True:  # at least 0.3 s of work, at most 200 products
        a @ b
        reps += 1
        sync()
        if time.perf_counter() - t0 > 0.3 or reps >= 200:
            break
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12
