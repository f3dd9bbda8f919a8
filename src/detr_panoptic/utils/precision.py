"""Reduced precision, checked against the hardware: names -> autocast dtypes, and the autocast context.

``resolve_dtype(name, device)`` turns ``"fp32"``/``"bf16"``/``"fp16"`` (or a ``torch.dtype``; None =
fp32) into the dtype for ``torch.autocast`` (None for float32, i.e. no autocast) and decides what happens
where the hardware cannot do it well:

* **fp16 on the CPU** is refused (``UserInputError``): CPU matrix multiplies in float16 are emulated
  element by element unless the CPU has AMX-FP16 -- 0.36 GFLOP/s against 83 in float32 on the 2-core
  AMD EPYC this was written on, a 230x slowdown -- and fp16's narrow range needs loss scaling in
  training. bf16 is the CPU's reduced precision (same speed as fp16 where either is native, float32's range).
* **bf16 on a CPU without native bf16** (no AVX512-BF16, AMX-BF16 or AVX-NE-CONVERT): it runs, oneDNN
  emulating bf16 with float32 instructions, usually slower than float32 itself; a warning says so,
  once per process.
* **bf16 on a CUDA GPU before Ampere** (``torch.cuda.is_bf16_supported()`` false): it runs emulated and
  slower; a warning says so once (use fp16 there). fp16 on CUDA is fine.

``autocast(device, dtype)`` is ``torch.autocast(device.type, dtype=dtype)`` for a reduced dtype and a null
context for None. Only the network runs under it; callers cast outputs back to float32 for losses and
post-processing.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from detr_panoptic.utils.errors import UserInputError

log = logging.getLogger(__name__)

# Accepted spellings -> dtype (None: float32, no autocast).
DTYPES: dict[str, torch.dtype | None] = {
    "fp32": None, "float32": None, "float": None, "none": None,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}
NAMES = {None: "fp32", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# CPU flags (/proc/cpuinfo) with native bf16 arithmetic or conversion (x86: AVX512-BF16, AMX-BF16,
# AVX-NE-CONVERT; Arm: the BF16 extension).
_NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "avx_ne_convert", "bf16")
_warned: set[str] = set()


def dtype_name(dtype: torch.dtype | None) -> str:
    """``"fp32"``, ``"bf16"`` or ``"fp16"`` (None = fp32)."""
    if dtype not in NAMES:
        raise ValueError(f"not a supported precision: {dtype}")
    return NAMES[dtype]


def cpu_flags() -> set[str]:
    """This CPU's feature flags (Linux ``/proc/cpuinfo``: x86 ``flags``, Arm ``Features``); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def cpu_bf16_native() -> bool:
    """True when this CPU computes bf16 natively (not oneDNN's emulation with float32 instructions).

    ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` only says oneDNN *can run* bf16 (any AVX-512
    CPU), which includes the emulated, slow case; this looks at the CPU's own flags.
    """
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if any(check is not None and check() for check in checks):
        return True
    return bool(cpu_flags() & set(_NATIVE_BF16_FLAGS))


def hardware_summary() -> dict[str, object]:
    """What benchmarks print beside their figures: CPU model, its bf16 support, CUDA device."""
    return {
        "cpu": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "mkldnn_bf16_supported": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "cpu_bf16_native": cpu_bf16_native(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


def resolve_dtype(name: str | torch.dtype | None, device: torch.device | str, *,
                  key: str = "dtype") -> torch.dtype | None:
    """The autocast dtype for precision ``name`` on ``device``: None (float32), ``torch.bfloat16`` or
    ``torch.float16``. ``key`` names the setting in error messages (``--dtype``, ``train.amp``).

    Raises ``UserInputError`` for an unknown name and for fp16 on the CPU; warns once for bf16 where
    the hardware only emulates it (see the module docstring).
    """
    if isinstance(name, torch.dtype):
        if name not in NAMES:
            raise UserInputError(f"{key}: {name} is not a supported precision (fp32, bf16 or fp16)")
        dtype = None if name == torch.float32 else name
    elif name is None:
        dtype = None
    else:
        spelled = str(name).strip().lower()
        if spelled not in DTYPES:
            raise UserInputError(f"{key}: unknown precision {name!r}: expected fp32, bf16 or fp16")
        dtype = DTYPES[spelled]
    if dtype is None:
        return None
    device = torch.device(device)
    if device.type == "cpu":
        if dtype == torch.float16:
            raise UserInputError(
                f"{key}: fp16 is not supported on the CPU (CPUs emulate float16 matrix multiplies, "
                f"hundreds of times slower than fp32, and fp16 needs loss scaling); use bf16 (float32's "
                f"range, native on CPUs with AVX512-BF16 or AMX) or fp32")
        if not cpu_bf16_native():
            _warn_once("cpu-bf16", f"{key}: bf16 on this CPU ({cpu_model()}) has no native bf16 "
                                   f"(AVX512-BF16/AMX): it runs, emulated, usually slower than fp32")
    elif device.type == "cuda":
        if dtype == torch.bfloat16 and torch.cuda.is_available() \
                and not torch.cuda.is_bf16_supported(including_emulation=False):
            _warn_once("cuda-bf16", f"{key}: bf16 on {torch.cuda.get_device_name(device)} is emulated "
                                    f"(needs compute capability >= 8.0): slower; fp16 is native there")
    elif not torch.amp.is_autocast_available(device.type):
        raise UserInputError(f"{key}: autocast is not available on device {device.type!r}; use fp32")
    return dtype


def autocast(device: torch.device | str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` on ``device`` in ``dtype``, or a null context when ``dtype`` is None (float32)."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)
