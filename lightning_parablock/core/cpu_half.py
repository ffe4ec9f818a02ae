"""Whether this CPU computes in bf16 or fp16 natively, read from the feature flags its kernel reports.

A CPU without them runs PyTorch's half-precision kernels through conversions to fp32: on an x86 CPU without
``avx512_bf16`` or ``amx_bf16`` a bf16 forward and backward costs several times an fp32 one
(``benchmarks/cpu_precision.py --isa avx2``; the README's troubleshooting has the figures). Nothing fails, the
run is only slow, so the Trainer checks warn before training (:func:`~lightning_parablock.strategies.
trainer_checks.warn_emulated_half_precision`). Where the flags cannot be read (no ``/proc/cpuinfo``, e.g. macOS)
nothing is claimed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

CPUINFO = Path("/proc/cpuinfo")
NATIVE_INSTRUCTIONS: dict[torch.dtype, tuple[str, ...]] = {
    torch.bfloat16: ("avx512_bf16", "amx_bf16", "bf16"),  # x86 AVX-512 / AMX; Arm's BF16 extension ("bf16")
    torch.float16: ("avx512_fp16", "amx_fp16", "asimdhp"),  # x86 AVX-512 / AMX; Arm's half-precision SIMD
}
"""Per dtype, the CPU flags of which any one means native arithmetic in it."""
_X86_ONLY = ("avx512_bf16", "amx_bf16", "avx512_fp16", "amx_fp16")


def cpu_flags(cpuinfo: Optional[Path] = None) -> Optional[frozenset[str]]:
    """The CPU's feature flags (x86 ``flags``, Arm ``Features``) from ``/proc/cpuinfo``; ``None`` where unreadable."""
    try:
        text = (cpuinfo or CPUINFO).read_text()
    except OSError:
        return None
    flags = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return frozenset(flags) if flags else None


def missing_half_instructions(dtype: torch.dtype, flags: Optional[frozenset[str]] = None) -> Optional[tuple[str, ...]]:
    """The instruction sets this CPU lacks for ``dtype`` (any one of them would do), named for its architecture;
    ``None`` where it has one, where ``dtype`` is not a half precision, or where the flags cannot be read."""
    flags = cpu_flags() if flags is None else flags
    native = NATIVE_INSTRUCTIONS.get(dtype)
    if native is None or flags is None or flags & set(native):
        return None
    x86 = "avx2" in flags or "sse2" in flags
    return tuple(name for name in native if (name in _X86_ONLY) == x86)
