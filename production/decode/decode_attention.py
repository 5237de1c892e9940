"""GPT-OSS attention for the static decoder that reads only the tokens present, not every
position the cache reserves.

transformers' eager attention (GPT-OSS has no sdpa path: its sink logit joins the softmax)
scores the query against every slot of a StaticCache and masks the empty ones, so a decode
step costs what the cache reserves (32,768 positions at the serving window), and a prompt
builds [heads, prompt, cache] scores: tens of GB for a long prompt. Here:

- a decode step (one query, on CUDA) is a Triton flash-decoding kernel: the key range is split
  over a fixed grid, each split finds its span from the position on the device (the step is a
  captured CUDA graph: it must neither sync nor recompile as the conversation grows), so the
  work follows the tokens present; a second small kernel merges the splits with the sink;
- a prompt (and every step on the CPU) is torch over the valid key prefix only, its queries
  in chunks whose score tensor stays near SCORE_BUDGET_BYTES, with eager's op order and
  dtypes so the results match it;
- no mask is ever built: the causal and sliding-window rules come from position_ids, which
  transformers passes to the attention function. `install` registers a mask function that
  returns None, so the model never materialises a [prompt, cache] mask either.

Key layouts (what production.decode.static_decode's caches hand over): key index == position on
full layers and on sliding layers with a full-size cache; a sliding layer's ring cache (at
most `sliding_window` slots) holds in a step the last min(L, slots) positions in any order,
and in a prompt (always from position 0) the prompt's own keys in order. Softmax ignores the
order of its terms and RoPE is already in the keys, so a ring's slots are read as they lie.

The CPU build has no Triton: there a step takes the torch path inside the same custom op,
so a compiled step traces the same way on both. Tests run the kernels on the CPU in Triton's
interpreter and compile them ahead of time for an RTX 3090 (tests/test_decode_attention.py).
"""

from __future__ import annotations

import functools
import logging
import math
import weakref
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

NAME = "whetstone_decode"  # the attention (and mask) implementation name install() registers
# The largest score tensor the torch path builds at once (a chunk of queries against its keys);
# softmax holds about three more of that size while it runs.
SCORE_BUDGET_BYTES = 256 << 20
_LOG2E = 1.4426950408889634
_NO_WINDOW = 1 << 30  # a "window" no length reaches: the kernel's lower bound stays 0

_previous: weakref.WeakKeyDictionary[nn.Module, list[tuple[Any, str | None]]] = (
    weakref.WeakKeyDictionary()
)


# ----------------------------------------------------------------------------- the function


def attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """A transformers attention function for GPT-OSS (the signature of eager_attention_forward):
    query [1, H, q, D], key/value [1, KV, S, D] -> ([1, q, H, D], None).

    Reads `s_aux` (the sinks, one logit per head), `sliding_window` and `position_ids` from
    kwargs; `attention_mask` is ignored (the masks come from the positions)."""
    if dropout:
        raise ValueError(f"{NAME} attention has no dropout (got {dropout}): it serves, not trains")
    sinks = kwargs.get("s_aux")
    if sinks is None:
        sinks = getattr(module, "sinks", None)
    if sinks is None:
        raise ValueError(f"{NAME} attention needs GPT-OSS's sinks (s_aux)")
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        raise ValueError(f"{NAME} attention needs position_ids")
    if query.shape[0] != 1:
        raise ValueError(f"{NAME} attention serves batch 1, got {query.shape[0]}")
    window = kwargs.get("sliding_window") or 0
    if query.shape[2] == 1:
        # Opaque to torch.compile: the step traces as one op whether it runs Triton or torch.
        out = torch.ops.whetstone.decode_attention(
            query, key, value, sinks, position_ids, float(scaling), int(window)
        )
    else:
        out = torch_attention(query, key, value, sinks, position_ids, scaling, window)
    return out, None


def _is_ring(q_len: int, slots: int, window: int) -> bool:
    """A step on a sliding layer whose cache holds no more than the window: a ring (or
    transformers' own rolled sliding cache), whose first min(L, slots) slots are all valid."""
    return q_len == 1 and bool(window) and slots <= window


# ----------------------------------------------------------------------------- torch path


def torch_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    sinks: torch.Tensor,
    position_ids: torch.Tensor,
    scaling: float,
    window: int = 0,
) -> torch.Tensor:
    """Attention over the valid keys only, queries in chunks bounded by SCORE_BUDGET_BYTES, in
    eager_attention_forward's op order and dtypes. Reads the positions on the host (a prompt
    is not captured; on the CPU a sync is free). Returns [1, q, H, D]."""
    _, heads, q_len, dim = query.shape
    slots = key.shape[2]
    positions = position_ids.reshape(-1)[-q_len:].cpu()
    out = query.new_empty((1, q_len, heads, dim))
    if _is_ring(q_len, slots, window):
        held = min(int(positions[-1]) + 1, slots)
        ring = _attend(query[0], key[0, :, :held], value[0, :, :held], sinks, scaling, None)
        out[0] = ring.transpose(0, 1)
        return out
    itemsize = torch.promote_types(query.dtype, sinks.dtype).itemsize
    rows = _chunk_rows(heads, int(positions.max()) + 1, window, itemsize)
    device_positions = positions.to(query.device)
    for q0 in range(0, q_len, rows):
        q1 = min(q0 + rows, q_len)
        first, last = int(positions[q0:q1].min()), int(positions[q0:q1].max())
        k0 = max(0, first - window + 1) if window else 0
        k1 = last + 1
        if k1 > slots:
            raise ValueError(f"position {last} is past the cache's {slots} keys")
        q_pos = device_positions[q0:q1, None]
        k_pos = torch.arange(k0, k1, device=query.device)[None, :]
        allowed = k_pos <= q_pos
        if window:
            allowed &= k_pos > q_pos - window  # transformers' sliding rule
        out[0, q0:q1] = _attend(
            query[0, :, q0:q1], key[0, :, k0:k1], value[0, :, k0:k1], sinks, scaling, allowed
        ).transpose(0, 1)
    return out


def _chunk_rows(heads: int, keys: int, window: int, itemsize: int) -> int:
    """Queries per chunk so that [heads, rows, keys of the chunk] fits the budget. A sliding
    chunk of r rows reads at most r + window - 1 keys, so its rows solve a quadratic."""
    elements = max(1, SCORE_BUDGET_BYTES // (itemsize * heads))
    if window and window < keys:
        w = window - 1
        rows = (math.isqrt(w * w + 4 * elements) - w) // 2
    else:
        rows = elements // keys
    return max(1, rows)


def _attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    sinks: torch.Tensor,
    scaling: float,
    allowed: torch.Tensor | None,
) -> torch.Tensor:
    """query [H, q, D] against key/value [KV, T, D] -> [H, q, D], eager's math. The query heads
    of one KV head are stacked as rows of one matmul, so no repeat_kv copy of the keys is made
    (that copy alone is [H, T, D])."""
    heads, q_len, dim = query.shape
    kv_heads, keys = key.shape[0], key.shape[1]
    groups = heads // kv_heads
    q = query.reshape(kv_heads, groups * q_len, dim)
    scores = (torch.matmul(q, key.transpose(1, 2)) * scaling).view(kv_heads, groups, q_len, keys)
    # In place where eager makes a new tensor (same values): a chunk then peaks near three
    # score tensors, not six.
    if allowed is not None:
        # eager adds finfo.min where masked: after the row max is subtracted both give exp = 0.
        scores.masked_fill_(~allowed, torch.finfo(scores.dtype).min)
    sink = sinks.reshape(kv_heads, groups, 1, 1).expand(-1, -1, q_len, -1)
    combined = torch.cat([scores, sink], dim=-1)
    del scores
    combined -= combined.max(dim=-1, keepdim=True).values
    probs = torch.softmax(combined, dim=-1, dtype=combined.dtype)
    del combined
    weights = probs[..., :-1].to(value.dtype).reshape(kv_heads, groups * q_len, keys)
    return torch.matmul(weights, value).view(heads, q_len, dim)


# ----------------------------------------------------------------------------- Triton kernels

_kernels: dict[str, Any] = {}


def _triton_kernels() -> dict[str, Any]:
    """The split and combine kernels, compiled on first use (Triton ships with CUDA torch; the
    CPU build has none and never calls this)."""
    if _kernels:
        return _kernels
    import triton
    import triton.language as tl

    @triton.jit
    def decode_split(
        q_ptr,  # [H, D] of the step's query (strides q_sh, q_sd)
        k_ptr,  # [KV, S, D] the cache's keys, read in place through their strides
        v_ptr,
        pos_ptr,  # the step's position (int64, on the device)
        m_ptr,  # [H, SPLITS] fp32: each split's running max (log2 units)
        l_ptr,  # [H, SPLITS] fp32: its sum of exp2(score - max)
        o_ptr,  # [H, SPLITS, D] fp32: its unnormalised output
        q_sh,
        q_sd,
        k_sh,
        k_ss,
        k_sd,
        v_sh,
        v_ss,
        v_sd,
        slots,
        window,  # keys kept: positions > L - 1 - window (_NO_WINDOW: all)
        scale_log2,  # scaling * log2(e): exp2 instead of exp
        GROUPS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        SPLITS: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        # One program per (KV head, split): the GROUPS query heads of that KV head are the rows
        # of one [BLOCK_G, D] x [D, BLOCK_N] dot, so each K/V tile is loaded once for all of
        # them. BLOCK_G is padded to 16 (tl.dot's smallest M); the padded rows are zero queries
        # whose results are never stored.
        kv = tl.program_id(0)
        split = tl.program_id(1)
        length = (tl.load(pos_ptr) + 1).to(tl.int32)
        hi = tl.minimum(length, slots)
        lo = tl.maximum(length - window, 0)
        # Each split takes a whole number of tiles of [lo, hi): short lengths leave the late
        # splits empty (they store max -inf, sum 0) instead of running many one-key tiles.
        per_split = tl.cdiv(tl.cdiv(hi - lo, SPLITS), BLOCK_N) * BLOCK_N
        start = lo + split * per_split
        end = tl.minimum(start + per_split, hi)

        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        g_ok = g < GROUPS
        d_ok = d < HEAD_DIM
        heads = kv * GROUPS + g
        q = tl.load(
            q_ptr + heads[:, None] * q_sh + d[None, :] * q_sd,
            mask=g_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        k_base = k_ptr + kv.to(tl.int64) * k_sh
        v_base = v_ptr + kv.to(tl.int64) * v_sh
        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
        for n0 in range(start, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_ok = n < end
            kv_mask = n_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + n[:, None] * k_ss + d[None, :] * k_sd, mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
            s = tl.where(n_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: the tile has a valid key
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_base + n[:, None] * v_ss + d[None, :] * v_sd, mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        row = heads * SPLITS + split
        tl.store(m_ptr + row, m_i, mask=g_ok)
        tl.store(l_ptr + row, l_i, mask=g_ok)
        tl.store(
            o_ptr + row[:, None] * HEAD_DIM + d[None, :], acc, mask=g_ok[:, None] & d_ok[None, :]
        )

    @triton.jit
    def decode_combine(
        m_ptr,  # [H, SPLITS] fp32
        l_ptr,
        o_ptr,  # [H, SPLITS, D] fp32
        sink_ptr,  # [H] the sink logits (any float dtype)
        out_ptr,  # [H, D] rows out_sh apart, the query's dtype
        out_sh,
        HEAD_DIM: tl.constexpr,
        SPLITS: tl.constexpr,
        BLOCK_S: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # One program per query head: the splits' partial softmaxes rescaled to a common max,
        # the sink's exp joining the denominator only (eager drops its column after softmax).
        h = tl.program_id(0)
        s = tl.arange(0, BLOCK_S)
        d = tl.arange(0, BLOCK_D)
        s_ok = s < SPLITS
        d_ok = d < HEAD_DIM
        m = tl.load(m_ptr + h * SPLITS + s, mask=s_ok, other=float("-inf"))
        l_s = tl.load(l_ptr + h * SPLITS + s, mask=s_ok, other=0.0)
        sink = tl.load(sink_ptr + h).to(tl.float32) * 1.4426950408889634
        top = tl.maximum(tl.max(m, axis=0), sink)
        w = tl.exp2(m - top)  # empty splits: exp2(-inf) = 0
        denominator = tl.sum(l_s * w, axis=0) + tl.exp2(sink - top)
        o = tl.load(
            o_ptr + (h * SPLITS + s)[:, None] * HEAD_DIM + d[None, :],
            mask=s_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        out = tl.sum(o * w[:, None], axis=0) / denominator
        tl.store(out_ptr + h * out_sh + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)

    _kernels.update(split=decode_split, combine=decode_combine)
    return _kernels


@functools.lru_cache(maxsize=8)
def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the interpreter: any fixed count (an H200's)
    return torch.cuda.get_device_properties(device).multi_processor_count


def _tile(head_dim: int, itemsize: int) -> dict[str, int]:
    """Tiles for any Ampere or later card (an RTX 3090 allows 99 KB of shared memory a block,
    100 KB an SM): a K or V tile of at most 8 KB. Two pipeline stages of both then take about
    20 KB (bf16, D 64, sm_86), so four programs fit an SM's shared memory; their loads are
    what keeps a memory-bound step busy. Not yet tuned on a GPU."""
    block_d = max(16, _next_power_of_2(head_dim))
    block_n = max(16, min(64, 8192 // (block_d * itemsize)))
    return {"BLOCK_N": block_n, "BLOCK_D": block_d, "num_warps": 4, "num_stages": 2}


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def decode_splits(slots: int, kv_heads: int, block_n: int, device: torch.device) -> int:
    """Splits of the key range: about four programs per SM when every slot is in use, never
    more splits than the cache has tiles. Fixed by the cache's size, not the length, so the
    captured launch never changes."""
    wanted = -(-4 * _multiprocessors(device) // kv_heads)
    return max(1, min(wanted, -(-slots // block_n)))


def decode_step(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    sinks: torch.Tensor,
    position_ids: torch.Tensor,
    scaling: float,
    window: int = 0,
    *,
    splits: int | None = None,
    tile: dict[str, int] | None = None,
) -> torch.Tensor:
    """One query against the cache with the Triton kernels: query [1, H, 1, D], key/value
    [1, KV, S, D] (any strides), the length read from position_ids[0, -1] on the device.
    Returns [1, 1, H, D] in the query's dtype. `splits`/`tile` override the defaults (tests)."""
    _, heads, _, dim = query.shape
    kv_heads, slots = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    tile = {**_tile(dim, key.element_size()), **(tile or {})}
    splits = splits or decode_splits(slots, kv_heads, tile["BLOCK_N"], query.device)
    # A ring's slots are all within the window: only their count bounds the read.
    kernel_window = window if window and not _is_ring(1, slots, window) else _NO_WINDOW
    m = torch.empty((heads, splits), dtype=torch.float32, device=query.device)
    l_sum = torch.empty_like(m)
    o = torch.empty((heads, splits, dim), dtype=torch.float32, device=query.device)
    out = torch.empty((1, 1, heads, dim), dtype=query.dtype, device=query.device)
    kernels = _triton_kernels()
    kernels["split"][(kv_heads, splits)](
        query,
        key,
        value,
        position_ids.reshape(-1)[-1:],
        m,
        l_sum,
        o,
        query.stride(1),
        query.stride(3),
        key.stride(1),
        key.stride(2),
        key.stride(3),
        value.stride(1),
        value.stride(2),
        value.stride(3),
        slots,
        kernel_window,
        float(scaling) * _LOG2E,
        GROUPS=groups,
        HEAD_DIM=dim,
        SPLITS=splits,
        BLOCK_G=max(16, _next_power_of_2(groups)),
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        **tile,
    )
    kernels["combine"][(heads,)](
        m,
        l_sum,
        o,
        sinks,
        out,
        out.stride(2),
        HEAD_DIM=dim,
        SPLITS=splits,
        BLOCK_S=_next_power_of_2(splits),
        BLOCK_D=tile["BLOCK_D"],
    )
    return out


# torch.compile sees the step as one opaque op with a known output shape, so the decode step
# traces in one graph and CUDA-graph capture records the two launches.
@torch.library.custom_op("whetstone::decode_attention", mutates_args=())
def _decode_attention_op(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    sinks: torch.Tensor,
    position_ids: torch.Tensor,
    scaling: float,
    window: int,
) -> torch.Tensor:
    if not query.is_cuda:
        return torch_attention(query, key, value, sinks, position_ids, scaling, window)
    return decode_step(query, key, value, sinks, position_ids, scaling, window)


@_decode_attention_op.register_fake
def _(query, key, value, sinks, position_ids, scaling, window):
    return query.new_empty((1, 1, query.shape[1], query.shape[3]))


# ----------------------------------------------------------------------------- install


def _no_mask(*args: Any, **kwargs: Any) -> None:
    """The mask function for NAME: attention() builds its masks from positions."""
    return None


def _attention_configs(model: nn.Module) -> list[Any]:
    """Every config object the model or its layers read `_attn_implementation` from (the model's
    config; GptOssAttention reads its own `self.config`, usually the same object)."""
    found: dict[int, Any] = {id(model.config): model.config}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            found.setdefault(id(config), config)
    return list(found.values())


def install(model: nn.Module) -> bool:
    """Serve a GPT-OSS model's attention with `attention`. Only a GPT-OSS model on eager
    attention is switched (anything else keeps its own and False is returned)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    model_type = getattr(model.config, "model_type", None)
    if model_type != "gpt_oss":
        log.info("attention stays as it is: %s is not gpt_oss", model_type)
        return False
    configs = _attention_configs(model)
    current = {config._attn_implementation for config in configs}
    if current == {NAME}:
        return True
    if current != {"eager"}:
        log.info(
            "attention stays as it is: the model uses %s, not eager", sorted(map(str, current))
        )
        return False
    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, _no_mask)
    _previous[model] = [(config, config._attn_implementation) for config in configs]
    for config in configs:
        config._attn_implementation = NAME
    log.info("attention: %s (reads only the tokens present)", NAME)
    return True


def uninstall(model: nn.Module) -> None:
    """Give the model back the attention it had before install()."""
    for config, previous in _previous.pop(model, []):
        config._attn_implementation = previous
