"""Theoretical occupancy of an NVIDIA kernel from what ptxas reports and the launch's block size.

hipcc prints AMD's occupancy itself (waves per SIMD, `toolchain.KernelResources.occupancy`);
ptxas does not, because it depends on the block size chosen at launch. This is the CUDA
Occupancy Calculator's arithmetic: resident blocks per SM are bounded by the warp slots, the
block slots, the register file (allocated per warp in units of 256 registers) and shared memory
(allocated per block in units of 128 bytes, plus 1 KB the system reserves per block); occupancy
is the resident warps over the SM's maximum.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SmLimits:
    warps: int  # resident warps per SM
    blocks: int  # resident blocks per SM
    registers: int  # 32-bit registers per SM
    shared_bytes: int  # shared memory per SM (the largest carve-out)


# CUDA C++ Programming Guide, "Technical Specifications per Compute Capability": compute
# capability 8.0 (A100): 64 warps, 32 blocks, 64 K registers, 164 KB shared memory per SM;
# 9.0 (H100): 64 warps, 32 blocks, 64 K registers, 228 KB.
SM_LIMITS = {
    "sm_80": SmLimits(64, 32, 65536, 164 * 1024),
    "sm_90": SmLimits(64, 32, 65536, 228 * 1024),
}
REGISTER_UNIT = 256  # registers are allocated per warp in these units
SHARED_UNIT = 128  # bytes
SHARED_RESERVED = 1024  # bytes the system keeps per resident block (compute capability >= 8.0)


@dataclass(frozen=True)
class Occupancy:
    arch: str
    block_threads: int
    blocks_per_sm: int
    warps_per_sm: int
    max_warps: int
    limit: str  # what bounds it: "warps", "blocks", "registers" or "shared memory"

    @property
    def fraction(self) -> float:
        return self.warps_per_sm / self.max_warps


def nvidia_occupancy(
    arch: str, registers: int, shared_bytes: int, block_threads: int, dynamic_shared: int = 0
) -> Occupancy | None:
    """Resident blocks and warps per SM for a kernel using ``registers`` per thread and
    ``shared_bytes`` of static (+ ``dynamic_shared``) shared memory per block, launched with
    ``block_threads``; None for an architecture not in `SM_LIMITS`."""
    lim = SM_LIMITS.get(arch)
    if lim is None or block_threads < 1:
        return None
    warps = -(-block_threads // 32)
    bounds = {"warps": lim.warps // warps, "blocks": lim.blocks}
    if registers > 0:
        per_warp = -(-registers * 32 // REGISTER_UNIT) * REGISTER_UNIT
        bounds["registers"] = lim.registers // (per_warp * warps)
    shared = shared_bytes + dynamic_shared
    if shared > 0:
        per_block = -(-shared // SHARED_UNIT) * SHARED_UNIT + SHARED_RESERVED
        bounds["shared memory"] = lim.shared_bytes // per_block
    limit = min(bounds, key=lambda k: bounds[k])
    blocks = bounds[limit]
    return Occupancy(arch, block_threads, blocks, blocks * warps, lim.warps, limit)
