"""Mixture-of-experts layers (GPT-OSS) for the static decoder: no host sync in a decode step,
and only the chosen experts' weights read, once.

transformers' GptOssExperts loops over the experts a token hit, finding them with
`nonzero()`: every layer of every token waits for the CPU, so a decode step cannot be captured
as a CUDA graph and runs at 2-5% of the memory-bandwidth bound (issue 15's table). Here each
layer's experts become one `DecodeExperts` module:

- at one token (a decode step) the router's top-k ids stay on the GPU and an expert-indexed
  Triton kernel (the fused-MoE pattern: ids read on the device, weights addressed by id)
  computes gate_up then down for the k chosen experts only, reading each weight once (no
  gather copies them first), so the whole step captures as one CUDA graph;
- at many tokens (prefill) it loops over the hit experts as transformers does: a prompt is
  one forward, where a host sync costs nothing that matters.

Weights as the person holds them:

- bf16: transformers' fused [experts, in, out] Parameters, read in place;
- NF4 (Unsloth's 4-bit layout, one bitsandbytes Linear4bit per expert): the packed bytes of
  the experts are stacked per layer and dequantized inside the kernel, double-quant absmax
  included. Attention is dequantized to bf16 once (about 1 GB more on the 20B shape) so its
  LoRA merges as a dense model's does.

An adapter's expert LoRA (saved on Unsloth's split layout, `experts.gate_up_projs.<i>`) stays
unmerged in both: per token only the k chosen experts' low-rank factors are read (a few hundred
KB), where merging would need a host copy of every expert to restore exactly (40 GB on the
20B shape in bf16; the first merge took 112 s there). The factors live in buffers reserved at
the trained rank, so a hot swap overwrites them in place and the captured step never recompiles.

The CPU never runs the kernels: there the one-token path is the same math in torch. Tests run
the kernels on the CPU in Triton's interpreter (tests/test_moe_decode.py).

One module on purpose: the Triton kernels and the layers that call them change together
(shapes, layouts, the LoRA buffers).
"""

from __future__ import annotations

import gc
import logging
import re
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

EXPERT_LORA_NAME = re.compile(r"^(?P<owner>.+\.experts)\.(?P<kind>gate_up|down)_projs\.(?P<i>\d+)$")
NF4_BLOCK = 64  # bitsandbytes' 4-bit block: one absmax per 64 weights
NESTED_BLOCK = 256  # double quant: one fp32 scale per 256 absmax bytes
_dequantize_kernel_failed: list[Exception] = []
ROUTED_PREFILL_MAX = 512  # token-slots of a prompt that go through the kernels (4-bit)


# ----------------------------------------------------------------------------- kernels

_kernels: dict[str, Any] = {}


def _triton_kernels() -> dict[str, Any]:
    """The two expert-indexed GEMV kernels, compiled on first use (Triton ships with CUDA
    torch; the CPU build has none and never calls this)."""
    if _kernels:
        return _kernels
    import triton
    import triton.language as tl

    @triton.jit
    def expert_gemv_kn(
        x_ptr,  # [S or 1, K] activations (row stride x_stride)
        w_ptr,  # [E, K, N] weights, N contiguous (transformers' fused GPT-OSS experts)
        ids_ptr,  # [S] expert of each slot
        out_ptr,  # [SPLIT, S, N] fp32 partial sums
        S,
        K,
        N,
        x_stride,
        K_PER_SPLIT: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        slot = tl.program_id(0)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        split = tl.program_id(2)
        expert = tl.load(ids_ptr + slot).to(tl.int64)
        w_base = w_ptr + expert * K * N
        n_ok = n < N
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        start = split * K_PER_SPLIT
        for step in range(0, K_PER_SPLIT, BLOCK_K):
            k0 = start + step
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < K
            x = tl.load(x_ptr + slot * x_stride + k, mask=k_ok, other=0.0).to(tl.float32)
            w = tl.load(
                w_base + k[:, None] * N + n[None, :],
                mask=k_ok[:, None] & n_ok[None, :],
                other=0.0,
            )
            acc += tl.sum(w.to(tl.float32) * x[:, None], axis=0)
        tl.store(out_ptr + (split * S + slot) * N + n, acc, mask=n_ok)

    @triton.jit
    def expert_gemv_nf4(
        x_ptr,  # [S or 1, K] activations
        packed_ptr,  # [E, N * K // 2] uint8: two NF4 codes a byte, first in the high nibble
        absmax_ptr,  # [E, N * K // 64]: uint8 codes if NESTED, else fp32 scales
        nested_ptr,  # [E, nested blocks] fp32 (NESTED)
        offset_ptr,  # [E] fp32 (NESTED)
        code_ptr,  # [16] fp32 NF4 values
        nested_code_ptr,  # [256] fp32 (NESTED)
        ids_ptr,  # [S]
        out_ptr,  # [SPLIT, S, N] fp32
        S,
        K,
        N,
        x_stride,
        blocks_per_expert,
        nested_per_expert,
        K_PER_SPLIT: tl.constexpr,
        NESTED: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        # Rows n of W [N, K] in blocks of 64 weights (K % 64 == 0, so a block never spans
        # two rows); a tile is [BLOCK_N rows, G blocks, 32 bytes]. Byte addresses are built
        # from row strides, not divisions, so the compiler can vectorize the loads.
        G: tl.constexpr = BLOCK_K // 64
        slot = tl.program_id(0)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        split = tl.program_id(2)
        expert = tl.load(ids_ptr + slot).to(tl.int64)
        n_ok = n < N
        g = tl.arange(0, G)
        j = tl.arange(0, 32)
        row_bytes = K // 2
        row_blocks = K // 64
        packed_base = packed_ptr + expert * N * row_bytes
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        start = split * K_PER_SPLIT
        for step in range(0, K_PER_SPLIT, BLOCK_K):
            k0 = start + step
            block = n[:, None] * row_blocks + (k0 // 64 + g[None, :])  # [BLOCK_N, G]
            block_ok = n_ok[:, None] & ((k0 + g * 64) < K)[None, :]
            if NESTED:
                q = tl.load(absmax_ptr + expert * blocks_per_expert + block, mask=block_ok, other=0)
                nested = tl.load(
                    nested_ptr + expert * nested_per_expert + block // 256, mask=block_ok, other=0.0
                )
                scale = tl.load(nested_code_ptr + q.to(tl.int32)) * nested
                scale += tl.load(offset_ptr + expert)
            else:
                scale = tl.load(
                    absmax_ptr + expert * blocks_per_expert + block, mask=block_ok, other=0.0
                )
            byte = tl.load(
                packed_base
                + n[:, None, None] * row_bytes
                + (k0 // 2 + g[None, :, None] * 32 + j[None, None, :]),
                mask=block_ok[:, :, None],
                other=0,
            )
            high = tl.load(code_ptr + (byte >> 4).to(tl.int32))
            low = tl.load(code_ptr + (byte & 15).to(tl.int32))
            k_even = k0 + g[:, None] * 64 + 2 * j[None, :]  # [G, 32]
            x_even = tl.load(x_ptr + slot * x_stride + k_even, mask=k_even < K, other=0.0)
            x_odd = tl.load(x_ptr + slot * x_stride + k_even + 1, mask=k_even + 1 < K, other=0.0)
            products = high * x_even.to(tl.float32)[None] + low * x_odd.to(tl.float32)[None]
            acc += tl.sum(tl.sum(products, axis=2) * scale, axis=1)
        tl.store(out_ptr + (split * S + slot) * N + n, acc, mask=n_ok)

    @triton.jit
    def expert_gemv_nf4_rows(
        x_ptr,  # [S or 1, K] activations
        packed_ptr,  # [E, N * K // 2] uint8: two NF4 codes a byte, first in the high nibble
        absmax_ptr,  # [E, N * K // 64]: uint8 codes if NESTED, else fp32 scales
        nested_ptr,  # [E, nested blocks] fp32 (NESTED)
        offset_ptr,  # [E] fp32 (NESTED)
        code_ptr,  # [16] fp32 NF4 values
        nested_code_ptr,  # [256] fp32 (NESTED)
        ids_ptr,  # [S]
        out_ptr,  # [SPLIT, S, N] fp32 partial sums, or [S, N] zeros when ATOMIC
        S,
        N,
        x_stride,
        row_bytes,  # K // 2, passed (not divided in here) so Triton sees it is a multiple of 16
        expert_bytes,  # N * K // 2, likewise
        blocks_per_expert,
        nested_per_expert,
        BLOCKS_PER_SPLIT: tl.constexpr,  # quant blocks (64 weights) a program reads per row
        NESTED: tl.constexpr,
        BLOCK_N: tl.constexpr,
        EVEN_N: tl.constexpr,  # N % BLOCK_N == 0: no row masks
        ATOMIC: tl.constexpr,
        DECODE: tl.constexpr,  # "smem": tl.gather from a 16-entry table; "global": a load per code
    ):
        # The baseline kernel spends ~18 instructions per weight (byte loads, a gather from
        # global memory per nibble, layout shuffles through shared memory each step); at ~5
        # an H100 issues fast enough to keep up with its memory. Here a step is one 64-weight
        # quant block of BLOCK_N rows, [BLOCK_N, 8] int32 words (one 16-byte load per 4
        # words). The layout Triton picks gives each thread several rows of the same words,
        # so the activations (and their bf16 -> fp32 conversion) are shared by those rows;
        # a nibble costs a shift, a mask, one shared-memory table read and an FMA.
        slot = tl.program_id(0)
        n0 = tl.program_id(1) * BLOCK_N
        split = tl.program_id(2)
        expert = tl.load(ids_ptr + slot).to(tl.int64)
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < N
        i = tl.arange(0, 8)
        row_words = row_bytes // 4
        row_blocks = row_bytes // 32
        words = (packed_ptr + expert * expert_bytes).to(tl.pointer_type(tl.int32))
        words += n0.to(tl.int64) * row_words
        w_offsets = tl.arange(0, BLOCK_N)[:, None] * row_words + i[None, :]
        block0 = n * row_blocks  # each row's first quant block
        absmax_expert = absmax_ptr + expert * blocks_per_expert
        nested_expert = nested_ptr + expert * nested_per_expert
        x_row = x_ptr + slot * x_stride
        table = tl.load(code_ptr + tl.arange(0, 16))
        offset = tl.load(offset_ptr + expert) if NESTED else 0.0
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        first = split * BLOCKS_PER_SPLIT
        for step in range(0, BLOCKS_PER_SPLIT):  # the host splits evenly: no bound check
            blk = first + step
            if NESTED:
                q = tl.load(absmax_expert + block0 + blk, mask=n_ok, other=0)
                nested = tl.load(nested_expert + (block0 + blk) // 256, mask=n_ok, other=0.0)
                scale = tl.load(nested_code_ptr + q.to(tl.int32)) * nested + offset
            else:
                scale = tl.load(absmax_expert + block0 + blk, mask=n_ok, other=0.0)
            # Weights are read once: evict_first keeps L1/L2 for the activations and scales.
            if EVEN_N:
                w = tl.load(words + w_offsets + blk * 8, eviction_policy="evict_first")
            else:
                w = tl.load(
                    words + w_offsets + blk * 8,
                    mask=n_ok[:, None],
                    other=0,
                    eviction_policy="evict_first",
                )
            # Weight 8i+m is byte m//2 of word i (little endian), its high nibble first. The
            # eight codes of a word are joined into one tensor so the table is looked up
            # once a step (each tl.gather stores the table to shared memory behind a barrier).
            codes = tl.join(
                tl.join(tl.join((w >> 4) & 15, w & 15), tl.join((w >> 12) & 15, (w >> 8) & 15)),
                tl.join(
                    tl.join((w >> 20) & 15, (w >> 16) & 15),
                    tl.join((w >> 28) & 15, (w >> 24) & 15),
                ),
            )
            if DECODE == "smem":
                values = tl.reshape(
                    tl.gather(table, tl.reshape(codes, [BLOCK_N * 64]), axis=0),
                    [BLOCK_N, 8, 2, 2, 2],
                )
            else:
                values = tl.load(code_ptr + codes)
            v0123, v4567 = tl.split(values)
            v01, v23 = tl.split(v0123)
            v45, v67 = tl.split(v4567)
            v0, v1 = tl.split(v01)
            v2, v3 = tl.split(v23)
            v4, v5 = tl.split(v45)
            v6, v7 = tl.split(v67)
            k = blk * 64 + i * 8  # [8]: each word's first weight
            part = v0 * tl.load(x_row + k).to(tl.float32)[None, :]
            part += v1 * tl.load(x_row + k + 1).to(tl.float32)[None, :]
            part += v2 * tl.load(x_row + k + 2).to(tl.float32)[None, :]
            part += v3 * tl.load(x_row + k + 3).to(tl.float32)[None, :]
            part += v4 * tl.load(x_row + k + 4).to(tl.float32)[None, :]
            part += v5 * tl.load(x_row + k + 5).to(tl.float32)[None, :]
            part += v6 * tl.load(x_row + k + 6).to(tl.float32)[None, :]
            part += v7 * tl.load(x_row + k + 7).to(tl.float32)[None, :]
            acc += tl.sum(part, axis=1) * scale
        if ATOMIC:
            tl.atomic_add(out_ptr + slot * N + n, acc, mask=n_ok, sem="relaxed")
        else:
            tl.store(out_ptr + (split * S + slot) * N + n, acc, mask=n_ok)

    @triton.jit
    def dequantize_nf4(
        packed_ptr,  # [N * K // 2] uint8 of one expert
        absmax_ptr,  # [N * K // 64]: uint8 codes if NESTED, else fp32
        nested_ptr,
        offset,
        code_ptr,
        nested_code_ptr,
        out_ptr,  # [N * K] in the model's dtype
        total_bytes,
        NESTED: tl.constexpr,
        BLOCKS: tl.constexpr,  # quant blocks (32 bytes each) per program
    ):
        block = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
        j = tl.arange(0, 32)
        byte_index = block[:, None] * 32 + j[None, :]
        ok = byte_index < total_bytes
        block_ok = block * 32 < total_bytes
        if NESTED:
            q = tl.load(absmax_ptr + block, mask=block_ok, other=0)
            scale = tl.load(nested_code_ptr + q.to(tl.int32)) * tl.load(
                nested_ptr + block // 256, mask=block_ok, other=0.0
            )
            scale += offset
        else:
            scale = tl.load(absmax_ptr + block, mask=block_ok, other=0.0)
        byte = tl.load(packed_ptr + byte_index, mask=ok, other=0)
        high = tl.load(code_ptr + (byte >> 4).to(tl.int32)) * scale[:, None]
        low = tl.load(code_ptr + (byte & 15).to(tl.int32)) * scale[:, None]
        out_ty = out_ptr.dtype.element_ty
        tl.store(out_ptr + 2 * byte_index, high.to(out_ty), mask=ok)
        tl.store(out_ptr + 2 * byte_index + 1, low.to(out_ty), mask=ok)

    _kernels.update(
        kn=expert_gemv_kn,
        nf4=expert_gemv_nf4,
        nf4_rows=expert_gemv_nf4_rows,
        dequantize=dequantize_nf4,
    )
    return _kernels


# Tile sizes: a decode step has k (4) slots, so the grid is widened by splitting K too; every
# SM then streams a few tiles. The partial sums are added in torch, where inductor fuses them
# with the bias and the activation.
# Picked with `python -m benchmarks.moe_decode --sweep` on an H200 (GPT-OSS-20B's shapes).
KN_TILE = {"BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4}
NF4_TILE = {"BLOCK_N": 8, "BLOCK_K": 256, "num_warps": 4}  # the "baseline" NF4 kernel's
# NF4 kernels: "baseline" (expert_gemv_nf4, ~20% of an H100's bandwidth) and "rows"
# (expert_gemv_nf4_rows, issue 35). benchmarks/moe_decode.py --kernels compares them.
NF4_VARIANTS = ("baseline", "rows")
# What DecodeExperts runs. Measured on one H100 (benchmarks/results/nf4-kernels-h100-20b-*):
# "rows" 1.9x the baseline on gate_up and 2.0x on down at its default tiles; the decode step
# 226.4 tok/s against 187.5 on the same warm machine.
NF4_VARIANT = "rows"
ROWS_PER_THREAD = 4  # BLOCK_N = 16 * num_warps * this in the rows kernel's layout
WARPS_PER_SM = 16  # the rows kernel splits K until about this many warps per SM stream


def _sm_count(device: torch.device) -> int:
    """The device's SMs, which the K splits fill (an H200's 132 where there is no GPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def _split_k(k: int, block_k: int, programs: int, device: torch.device) -> tuple[int, int]:
    """(ranges, columns per range) splitting K so that about 8 programs per SM stream weights:
    with 4 slots a layer's tiles alone leave most of an H200's 132 SMs idle."""
    target = 8 * _sm_count(device)
    steps = -(-k // block_k)
    wanted = max(1, min(steps, target // max(1, programs)))
    per_range = -(-steps // wanted)
    return -(-steps // per_range), per_range * block_k


def reference_gemv_kn(x: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """What expert_gemv_kn computes, in torch (the CPU's path): a gather, then one einsum."""
    chosen = weight[ids].float()  # [S, K, N]
    return torch.einsum("sk,skn->sn", x.float().expand(ids.numel(), -1), chosen)


def reference_gemv_nf4(x: torch.Tensor, q: Nf4Stack, ids: torch.Tensor) -> torch.Tensor:
    """What expert_gemv_nf4 computes, in torch: the chosen experts dequantized, then an einsum."""
    packed = q.packed[ids]  # [S, N*K/2]
    codes = torch.stack([packed >> 4, packed & 15], dim=-1).reshape(ids.numel(), -1).long()
    weights = q.code[codes].view(ids.numel(), -1, NF4_BLOCK) * q.scales(ids)[..., None]
    weights = weights.view(ids.numel(), q.out_features, q.in_features)
    return torch.einsum("sk,snk->sn", x.float().expand(ids.numel(), -1), weights)


def expert_gemv_kn(
    x: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, tile: dict | None = None
) -> torch.Tensor:
    """out[s] = x[s or 0] @ weight[ids[s]] as fp32 [S, N]; weight [E, K, N]."""
    x = x.contiguous()
    slots, (k, n) = ids.numel(), weight.shape[1:]
    tile = tile or KN_TILE
    n_tiles = -(-n // tile["BLOCK_N"])
    split, per_split = _split_k(k, tile["BLOCK_K"], slots * n_tiles, x.device)
    out = torch.empty((split, slots, n), dtype=torch.float32, device=x.device)
    x_stride = x.stride(0) if x.shape[0] > 1 else 0
    _triton_kernels()["kn"][(slots, n_tiles, split)](
        x, weight, ids, out, slots, k, n, x_stride, per_split, **tile
    )
    return out.sum(0)


def expert_gemv_nf4(
    x: torch.Tensor,
    q: Nf4Stack,
    ids: torch.Tensor,
    tile: dict | None = None,
    variant: str | None = None,
) -> torch.Tensor:
    """out[s] = x[s or 0] @ dequant(q[ids[s]]).T as fp32 [S, N], by the NF4 kernel `variant`
    (NF4_VARIANTS; NF4_VARIANT if None) with `tile` (its default if None)."""
    variant = variant or NF4_VARIANT
    if variant == "rows":
        return _expert_gemv_nf4_rows(x, q, ids, tile)
    if variant != "baseline":
        raise ValueError(f"unknown NF4 kernel {variant!r}: one of {NF4_VARIANTS}")
    x = x.contiguous()
    slots, n, k = ids.numel(), q.out_features, q.in_features
    tile = tile or NF4_TILE
    n_tiles = -(-n // tile["BLOCK_N"])
    split, per_split = _split_k(k, tile["BLOCK_K"], slots * n_tiles, x.device)
    out = torch.empty((split, slots, n), dtype=torch.float32, device=x.device)
    x_stride = x.stride(0) if x.shape[0] > 1 else 0
    _triton_kernels()["nf4"][(slots, n_tiles, split)](
        x,
        *q.kernel_tensors(),
        ids,
        out,
        slots,
        k,
        n,
        x_stride,
        *q.kernel_blocks(),
        per_split,
        NESTED=q.nested,
        **tile,
    )
    return out.sum(0)


def rows_tile(n: int) -> dict:
    """The rows kernel's default tile for N output rows: ROWS_PER_THREAD rows a thread (the
    activations are loaded once for them), the most warps (up to 4) that divide N evenly, so
    no row needs a mask (GPT-OSS-20B: 2 warps for gate_up's 5760 rows, 1 for down's 2880)."""
    warps = next((w for w in (4, 2, 1) if n % (16 * ROWS_PER_THREAD * w) == 0), 4)
    return {"BLOCK_N": 16 * ROWS_PER_THREAD * warps, "num_warps": warps}


def _rows_split(programs: int, warps: int, device: torch.device) -> int:
    """K ranges for the rows kernel: enough programs for about WARPS_PER_SM warps on every
    SM (a decode step's 4 slots alone leave most SMs idle)."""
    return -(-WARPS_PER_SM * _sm_count(device) // (programs * warps))


def _even_split(blocks: int, wanted: int) -> int:
    """The number of K ranges nearest `wanted` (the larger on a tie) that divides the quant
    blocks evenly, so the kernel's loop needs no bound check: 45 blocks (K = 2880) split
    1, 3, 5, 9, 15 or 45."""
    divisors = [d for d in range(1, blocks + 1) if blocks % d == 0]
    return min(divisors, key=lambda d: (abs(d - wanted), -d))


def rows_plan(
    n: int, k: int, slots: int, tile: dict | None, device: torch.device
) -> dict[str, Any]:
    """How the rows kernel runs for an [N, K] projection over `slots`: `tile` (BLOCK_N,
    num_warps, optionally SPLIT: K ranges, the nearest even split, else _rows_split's;
    ATOMIC: the ranges added with fp32 atomics into a zeroed output, a memset instead of a
    second kernel summing partials, in an order that can change the last bits from run to
    run; DECODE: "smem", the default, or "global"; num_stages) resolved, with the split."""
    plan = {"ATOMIC": False, "DECODE": "smem"} | dict(tile or rows_tile(n))
    blocks = k // NF4_BLOCK
    n_tiles = -(-n // plan["BLOCK_N"])
    wanted = plan.pop("SPLIT", None) or _rows_split(slots * n_tiles, plan["num_warps"], device)
    split = _even_split(blocks, wanted)
    plan["ATOMIC"] = plan["ATOMIC"] and split > 1
    return plan | {"split": split, "n_tiles": n_tiles, "BLOCKS_PER_SPLIT": blocks // split}


def _expert_gemv_nf4_rows(
    x: torch.Tensor, q: Nf4Stack, ids: torch.Tensor, tile: dict | None
) -> torch.Tensor:
    """expert_gemv_nf4 by expert_gemv_nf4_rows (`tile`: see rows_plan)."""
    x = x.contiguous()
    slots, n, k = ids.numel(), q.out_features, q.in_features
    plan = rows_plan(n, k, slots, tile, x.device)
    split, n_tiles = plan.pop("split"), plan.pop("n_tiles")
    if split == 1:
        out = torch.empty((slots, n), dtype=torch.float32, device=x.device)
    elif plan["ATOMIC"]:
        out = torch.zeros((slots, n), dtype=torch.float32, device=x.device)
    else:
        out = torch.empty((split, slots, n), dtype=torch.float32, device=x.device)
    _triton_kernels()["nf4_rows"][(slots, n_tiles, split)](
        x,
        *q.kernel_tensors(),
        ids,
        out,
        slots,
        n,
        x.stride(0) if x.shape[0] > 1 else 0,
        k // 2,
        n * k // 2,
        *q.kernel_blocks(),
        NESTED=q.nested,
        EVEN_N=n % plan["BLOCK_N"] == 0,
        **plan,  # BLOCKS_PER_SPLIT, BLOCK_N, ATOMIC, DECODE, num_warps (num_stages)
    )
    return out if split == 1 or plan["ATOMIC"] else out.sum(0)


# torch.compile sees the kernels as opaque ops with known output shapes, so the decode step
# traces in one graph and CUDA-graph capture records the launches.
@torch.library.custom_op("whetstone::expert_gemv_kn", mutates_args=())
def _expert_gemv_kn_op(x: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    if not x.is_cuda:
        return reference_gemv_kn(x, weight, ids)
    return expert_gemv_kn(x, weight, ids)


@_expert_gemv_kn_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return x.new_empty((ids.numel(), weight.shape[2]), dtype=torch.float32)


@torch.library.custom_op("whetstone::expert_gemv_nf4", mutates_args=())
def _expert_gemv_nf4_op(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor,
    offset: torch.Tensor,
    code: torch.Tensor,
    nested_code: torch.Tensor,
    ids: torch.Tensor,
    in_features: int,
) -> torch.Tensor:
    stack = Nf4Stack(
        packed,
        absmax,
        nested_absmax if nested_absmax.numel() else None,
        offset,
        code,
        nested_code,
        packed.shape[1] * 2 // in_features,
        in_features,
    )
    if not x.is_cuda:
        return reference_gemv_nf4(x, stack, ids)
    return expert_gemv_nf4(x, stack, ids)


@_expert_gemv_nf4_op.register_fake
def _(x, packed, absmax, nested_absmax, offset, code, nested_code, ids, in_features):
    return x.new_empty((ids.numel(), packed.shape[1] * 2 // in_features), dtype=torch.float32)


# ----------------------------------------------------------------------------- NF4 stacks


class Nf4Stack(nn.Module):
    """One projection of every expert of a layer, as bitsandbytes NF4 (blocksize 64) stacked:
    packed [E, N*K/2] uint8, absmax [E, N*K/64] (uint8 codes with double quant, else fp32).

    The tensors are buffers, so the compiled step treats them as the model's own state (read
    in place by the captured graph, as parameters are), not as inputs of each call."""

    def __init__(
        self,
        packed: torch.Tensor,
        absmax: torch.Tensor,
        nested_absmax: torch.Tensor | None,
        offset: torch.Tensor,
        code: torch.Tensor,
        nested_code: torch.Tensor,
        out_features: int,
        in_features: int,
    ) -> None:
        super().__init__()
        for name, tensor in (
            ("packed", packed),
            ("absmax", absmax),
            ("offset", offset),
            ("code", code),
            ("nested_code", nested_code),
        ):
            self.register_buffer(name, tensor, persistent=False)
        self.nested = nested_absmax is not None
        self.register_buffer(
            "nested_absmax", nested_absmax if self.nested else code.new_empty(0), persistent=False
        )
        self.out_features, self.in_features = out_features, in_features

    @classmethod
    def from_linears(cls, linears: list[nn.Module]) -> Nf4Stack:
        """Stack bitsandbytes Linear4bit layers (NF4, blocksize 64, one shape). The peak is
        one layer's experts more than the model."""
        weights = [_bnb_weight(linear) for linear in linears]
        state = weights[0][1]
        out_features, in_features = state.shape
        for i, (_, s) in enumerate(weights):
            if s.quant_type != "nf4" or s.blocksize != NF4_BLOCK:
                raise ValueError(f"expert {i} is {s.quant_type}/{s.blocksize}, need nf4/64")
            if tuple(s.shape) != (out_features, in_features):
                raise ValueError(f"expert {i} is {tuple(s.shape)}, expert 0 {tuple(state.shape)}")
        if in_features % NF4_BLOCK:
            raise ValueError(f"in_features {in_features} is not a multiple of {NF4_BLOCK}")
        # Double-quant absmax is read as stored; if some expert's is plain fp32 (bitsandbytes
        # unpacks it for its CPU kernel), every expert's is kept as fp32.
        nested = all(s.nested for _, s in weights)
        device = weights[0][0].device
        count = len(linears)
        packed = torch.empty(
            (count, out_features * in_features // 2), dtype=torch.uint8, device=device
        )
        blocks = out_features * in_features // NF4_BLOCK
        absmax = torch.empty(
            (count, blocks), dtype=torch.uint8 if nested else torch.float32, device=device
        )
        nested_absmax = (
            torch.empty((count, -(-blocks // NESTED_BLOCK)), dtype=torch.float32, device=device)
            if nested
            else None
        )
        offset = torch.zeros(count, dtype=torch.float32, device=device)
        for i, (data, s) in enumerate(weights):
            packed[i] = data.view(torch.uint8).reshape(-1)
            if nested:
                absmax[i] = s.absmax.reshape(-1)
                nested_absmax[i] = s.state2.absmax.reshape(-1).float()
                offset[i] = float(s.offset)
            else:
                absmax[i] = _plain_absmax(s)
        return cls(
            packed,
            absmax,
            nested_absmax,
            offset,
            state.code.float().to(device),
            (state.state2.code if nested else state.code).float().to(device),
            out_features,
            in_features,
        )

    def scales(self, experts: torch.Tensor | int) -> torch.Tensor:
        """Per-block absmax of `experts` as fp32 [..., N*K/64], as bitsandbytes computes it."""
        absmax = self.absmax[experts]
        if not self.nested:
            return absmax.float()
        codes = self.nested_code[absmax.long()]
        nested = self.nested_absmax[experts].repeat_interleave(NESTED_BLOCK, dim=-1)
        offset = self.offset[experts]
        return codes * nested[..., : codes.shape[-1]] + offset.unsqueeze(-1)

    def dequantize(self, expert: int, dtype: torch.dtype) -> torch.Tensor:
        """Expert `expert`'s weight [N, K] in `dtype`, as bitsandbytes' dequantize_4bit gives
        it: one kernel on CUDA (a prompt dequantizes every hit expert of every layer), torch
        ops elsewhere."""
        if self.packed.is_cuda and not _dequantize_kernel_failed:
            try:
                return self._dequantize_kernel(expert, dtype)
            except Exception as exc:
                _dequantize_kernel_failed.append(exc)
                log.warning("the NF4 dequantize kernel failed (%s); prompts use torch ops", exc)
        packed = self.packed[expert]
        codes = torch.stack([packed >> 4, packed & 15], dim=-1).reshape(-1).long()
        values = self.code[codes].view(-1, NF4_BLOCK) * self.scales(expert)[:, None]
        return values.view(self.out_features, self.in_features).to(dtype)

    def _dequantize_kernel(self, expert: int, dtype: torch.dtype) -> torch.Tensor:
        out = torch.empty(
            (self.out_features, self.in_features), dtype=dtype, device=self.packed.device
        )
        total = self.packed.shape[1]
        blocks = 64  # 2,048 bytes a program
        nested = self.nested
        _triton_kernels()["dequantize"][(-(-total // (32 * blocks)),)](
            self.packed[expert],
            self.absmax[expert],
            self.nested_absmax[expert] if nested else self.code,
            float(self.offset[expert]) if nested else 0.0,
            self.code,
            self.nested_code,
            out,
            total,
            NESTED=nested,
            BLOCKS=blocks,
            # bitsandbytes rounds after the nested scale's multiply and again after adding the
            # offset; fused into one FMA, 30 values in 2 of 8 experts came out one bf16 step off
            # on an H200 (exact in the interpreter, which never fuses).
            enable_fp_fusion=False,
        )
        return out

    def kernel_tensors(self) -> tuple[torch.Tensor, ...]:
        """The NF4 GEMV kernels' quantization arguments, in their order (packed, absmax,
        nested absmax, offset, code, nested code): without double quant the nested ones are
        the code table, a real tensor the kernel never reads (NESTED is off)."""
        dummy = self.code
        return (
            self.packed,
            self.absmax,
            self.nested_absmax if self.nested else dummy,
            self.offset if self.nested else dummy,
            self.code,
            self.nested_code if self.nested else dummy,
        )

    def kernel_blocks(self) -> tuple[int, int]:
        """Absmax blocks and nested scales per expert, as the NF4 GEMV kernels take them."""
        return self.absmax.shape[1], self.nested_absmax.shape[1] if self.nested else 0

    def op_args(self) -> tuple[torch.Tensor, ...]:
        return (
            self.packed,
            self.absmax,
            self.nested_absmax,
            self.offset,
            self.code,
            self.nested_code,
        )


# ----------------------------------------------------------------------------- the layer


class DecodeExperts(nn.Module):
    """A GPT-OSS layer's experts, called as GptOssExperts is (hidden [T, H], router indices
    [T, k], routing weights [T, k])."""

    def __init__(
        self,
        *,
        alpha: float,
        limit: float,
        num_experts: int,
        gate_up_bias: torch.Tensor,
        down_bias: torch.Tensor,
        fused: nn.Module | None = None,
        gate_up_nf4: Nf4Stack | None = None,
        down_nf4: Nf4Stack | None = None,
    ) -> None:
        super().__init__()
        self.alpha, self.limit, self.num_experts = alpha, limit, num_experts
        self.fused = fused  # transformers' GptOssExperts (bf16), kept: its Parameters serve
        self.gate_up_nf4, self.down_nf4 = gate_up_nf4, down_nf4
        self.register_buffer("gate_up_bias", gate_up_bias, persistent=False)
        self.register_buffer("down_bias", down_bias, persistent=False)
        self.lora_rank = 0  # rank of the unmerged expert LoRA buffers (reserve_lora)
        # Whether the buffers hold an adapter: read by the prompt path only (the captured
        # step always adds the buffers' product, zero or not, so it never re-traces).
        self.lora_active = False

    @property
    def quantized(self) -> bool:
        return self.gate_up_nf4 is not None

    def shape(self, kind: str) -> tuple[int, int]:
        """(in_features, out_features) of one expert's `kind` projection."""
        if self.quantized:
            stack = self.gate_up_nf4 if kind == "gate_up" else self.down_nf4
            return stack.in_features, stack.out_features
        weight = self.fused.gate_up_proj if kind == "gate_up" else self.fused.down_proj
        return weight.shape[1], weight.shape[2]

    # -- the math shared by both paths

    def _glu(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate = gate_up[..., ::2].clamp(max=self.limit)
        up = gate_up[..., 1::2].clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))

    def _lora(self, kind: str, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor | None:
        """The unmerged adapter's update for slots `ids` ([S] experts, x [S or 1, K])."""
        if not self.lora_rank:
            return None
        a = getattr(self, f"{kind}_lora_a")[ids]  # [S, r, K]
        b = getattr(self, f"{kind}_lora_b")[ids]  # [S, N, r] (scale folded in)
        inner = torch.bmm(a.float(), x.float().expand(ids.numel(), -1).unsqueeze(-1))
        return torch.bmm(b.float(), inner).squeeze(-1)

    def _project(self, kind: str, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """fp32 [S, N] for slots `ids` at one token; x [1, K] or [S, K]."""
        bias = (self.gate_up_bias if kind == "gate_up" else self.down_bias)[ids].float()
        if self.quantized:
            stack = self.gate_up_nf4 if kind == "gate_up" else self.down_nf4
            out = _expert_gemv_nf4_op(x, *stack.op_args(), ids, stack.in_features)
        else:
            weight = self.fused.gate_up_proj if kind == "gate_up" else self.fused.down_proj
            out = _expert_gemv_kn_op(x, weight, ids)
        lora = self._lora(kind, x, ids)
        return out + bias if lora is None else out + bias + lora

    def _weight_t(self, kind: str, expert: int, dtype: torch.dtype) -> torch.Tensor:
        """Expert `expert`'s `kind` weight as [K, N] (x @ W)."""
        if self.quantized:
            stack = self.gate_up_nf4 if kind == "gate_up" else self.down_nf4
            return stack.dequantize(expert, dtype).t()
        weight = self.fused.gate_up_proj if kind == "gate_up" else self.fused.down_proj
        return weight[expert]

    def forward(
        self,
        hidden_states: torch.Tensor,
        router_indices: torch.Tensor,
        routing_weights: torch.Tensor,
    ) -> torch.Tensor:
        tokens, slots = router_indices.shape
        # A short prompt on 4-bit experts: one kernel per projection (each (token, slot) reads
        # its expert once) beats dequantizing every hit expert in torch (~0.8 s a prompt on
        # the 20B shape); up to 512 token-slots that is at most ~6 GB read per layer.
        if tokens == 1 or (self.quantized and tokens * slots <= ROUTED_PREFILL_MAX):
            return self._routed(hidden_states, router_indices, routing_weights)
        return self._many_tokens(hidden_states, router_indices, routing_weights)

    def _routed(
        self, hidden: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """Every (token, slot) through the expert-indexed kernels: no host sync."""
        tokens, slots = indices.shape
        ids = indices.reshape(-1)
        dtype = hidden.dtype
        x = hidden if tokens == 1 else hidden.repeat_interleave(slots, dim=0)
        # Rounded to the model's dtype where transformers' loop rounds, so both paths agree.
        gate_up = self._project("gate_up", x, ids).to(dtype)
        glu = self._glu(gate_up)
        down = self._project("down", glu, ids).to(dtype)
        out = (down * weights.reshape(-1, 1).to(dtype)).float()
        return out.view(tokens, slots, -1).sum(1).to(dtype)

    def _many_tokens(
        self, hidden: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """A prompt: a loop over the hit experts (host syncs are fine once per prompt)."""
        if not self.quantized and not self.lora_active:
            return self.fused(hidden, indices, weights)
        out = torch.zeros_like(hidden)
        for expert in indices.unique().tolist():
            token_idx, slot = torch.where(indices == expert)
            x = hidden[token_idx]
            gate_up = x @ self._weight_t("gate_up", expert, hidden.dtype)
            gate_up = self._lora_one("gate_up", expert, x, gate_up + self.gate_up_bias[expert])
            glu = self._glu(gate_up)
            down = glu @ self._weight_t("down", expert, hidden.dtype)
            down = self._lora_one("down", expert, glu, down + self.down_bias[expert])
            out.index_add_(0, token_idx, down * weights[token_idx, slot, None])
        return out

    def _lora_one(self, kind: str, expert: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y plus expert `expert`'s unmerged update of x, when an adapter is active."""
        if not self.lora_active:
            return y
        a = getattr(self, f"{kind}_lora_a")[expert].float()
        b = getattr(self, f"{kind}_lora_b")[expert].float()
        return (y.float() + (x.float() @ a.t()) @ b.t()).to(y.dtype)

    # -- the adapter's expert LoRA, unmerged

    def reserve_lora(self, rank: int) -> None:
        """Zeroed LoRA buffers of at least `rank`. Growing them reallocates, and a captured
        step re-traces once (the buffers' shapes change); adapters of the reserved rank or
        less are written in place, which a captured step reads by address."""
        if rank <= self.lora_rank:
            return
        if self.lora_rank:
            log.warning(
                "expert LoRA rank %d > %d reserved: the decode step recompiles",
                rank,
                self.lora_rank,
            )
        device = self.gate_up_bias.device
        for kind in ("gate_up", "down"):
            k, n = self.shape(kind)
            a = torch.zeros((self.num_experts, rank, k), dtype=torch.bfloat16, device=device)
            b = torch.zeros((self.num_experts, n, rank), dtype=torch.bfloat16, device=device)
            self.register_buffer(f"{kind}_lora_a", a, persistent=False)
            self.register_buffer(f"{kind}_lora_b", b, persistent=False)
        self.lora_rank = rank

    @torch.no_grad()
    def write_lora(
        self, kind: str, updates: dict[int, tuple[torch.Tensor, torch.Tensor, float]]
    ) -> None:
        """Every expert's `kind` update: scale * b @ a for the experts in `updates`, none for
        the others. Written in place (a captured step keeps reading the same buffers)."""
        if not self.lora_rank:
            return
        buf_a, buf_b = getattr(self, f"{kind}_lora_a"), getattr(self, f"{kind}_lora_b")
        a_all, b_all = torch.zeros_like(buf_a), torch.zeros_like(buf_b)
        for expert, (a, b, scale) in updates.items():
            r = a.shape[0]
            a_all[expert, :r] = a
            b_all[expert, :, :r] = b.float() * scale
        buf_a.copy_(a_all)
        buf_b.copy_(b_all)
        self.lora_active = bool(updates) or self._other_kind_active(kind)

    def _other_kind_active(self, kind: str) -> bool:
        other = "down" if kind == "gate_up" else "gate_up"
        return bool(getattr(self, f"{other}_lora_a").any())


def _is_split_experts(module: nn.Module) -> bool:
    return hasattr(module, "gate_up_projs") and hasattr(module, "down_projs")


def _is_fused_experts(module: nn.Module) -> bool:
    return isinstance(getattr(module, "gate_up_proj", None), nn.Parameter)


def moe_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, experts) of every GPT-OSS expert block in `model`."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if name.endswith("mlp.experts") and (_is_split_experts(module) or _is_fused_experts(module))
    ]


@torch.no_grad()
def prepare(model: nn.Module, lora_rank: int = 16) -> dict[str, Any]:
    """Swap every GPT-OSS expert block for a DecodeExperts (with expert LoRA buffers of
    `lora_rank`, the rank the person trains at) and 4-bit attention for bf16 Linears, in
    place. Returns what it did, for the log."""
    dtype = model.get_input_embeddings().weight.dtype
    swapped = dequantized = 0
    # By name, one layer at a time, each layer's old experts freed before the next is stacked:
    # the peak is one layer's experts more than the model.
    for name in [name for name, _ in moe_layers(model)]:
        experts = model.get_submodule(name)
        parent = model.get_submodule(name.rsplit(".", 1)[0])
        common = {
            "alpha": float(getattr(experts, "alpha", 1.702)),
            "limit": float(getattr(experts, "limit", 7.0)),
        }
        if _is_fused_experts(experts):
            replacement = DecodeExperts(
                **common,
                num_experts=experts.gate_up_proj.shape[0],
                gate_up_bias=experts.gate_up_proj_bias.data,
                down_bias=experts.down_proj_bias.data,
                fused=experts,
            )
        else:
            gate_up, down = list(experts.gate_up_projs), list(experts.down_projs)
            if not hasattr(gate_up[0].weight, "quant_state"):
                raise ValueError(f"{name}: split experts that are not 4-bit are not supported")
            replacement = DecodeExperts(
                **common,
                num_experts=len(gate_up),
                gate_up_bias=torch.stack([m.bias.data for m in gate_up]).to(dtype),
                down_bias=torch.stack([m.bias.data for m in down]).to(dtype),
                gate_up_nf4=Nf4Stack.from_linears(gate_up),
                down_nf4=Nf4Stack.from_linears(down),
            )
        replacement.reserve_lora(lora_rank)
        parent.experts = replacement
        swapped += 1
        if replacement.quantized:
            _free_now(experts)
        del experts, replacement, common
        gate_up = down = None
    for name, module in list(model.named_modules()):
        if hasattr(getattr(module, "weight", None), "quant_state") and ".experts." not in name:
            parent_name, _, child = name.rpartition(".")
            model.get_submodule(parent_name).add_module(child, _dequantized_linear(module, dtype))
            _free_now(module)
            dequantized += 1
    # What loading left in reference cycles, then the allocator's cache of the freed 4-bit
    # Linears: their blocks are too small to hold the stacks, so kept they only inflate the
    # process (the card's memory) by what was freed.
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"moe_layers": swapped, "dequantized_linears": dequantized, "lora_rank": lora_rank}


def _free_now(module: nn.Module) -> None:
    """Drop the parameters of `module` (and its submodules), which was just replaced, so
    their memory is freed now. bitsandbytes' Params4bit points back at its Linear4bit
    (`weight.module`): a reference cycle that only Python's full garbage collection frees, and
    that runs rarely. On the 20B shape the replaced 4-bit experts (9.6 GB) stayed allocated
    beside their stacks until it did: torch's start-up peak was 23.0 GiB for 13.4 once ready."""
    for sub in module.modules():
        for name, _ in list(sub.named_parameters(recurse=False)):
            setattr(sub, name, None)
        if hasattr(sub, "quant_state"):
            sub.quant_state = None


def _bnb_weight(linear: nn.Module) -> tuple[torch.Tensor, Any]:
    """A Linear4bit's (packed bytes, quant state) in bitsandbytes' storage layout: on the CPU,
    bitsandbytes repacks a weight for its own kernel the first time it is used."""
    data, state = linear.weight.data, linear.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        data, state = _convert_weight_packed_for_cpu_inverse(data, state)
    return data, state


def _plain_absmax(state: Any) -> torch.Tensor:
    """A quant state's per-block absmax as fp32, double quant undone as bitsandbytes does."""
    if not state.nested:
        return state.absmax.reshape(-1).float()
    from bitsandbytes.functional import dequantize_blockwise

    return (dequantize_blockwise(state.absmax, state.state2) + state.offset).float().reshape(-1)


def _dequantized_linear(linear: nn.Module, dtype: torch.dtype) -> nn.Linear:
    from bitsandbytes.functional import dequantize_4bit

    weight = dequantize_4bit(*_bnb_weight(linear)).to(dtype)
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None, device="meta")
    out.weight = nn.Parameter(weight, requires_grad=False)
    if linear.bias is not None:
        out.bias = nn.Parameter(linear.bias.data.to(dtype), requires_grad=False)
    return out
