"""The static decoder's prompt attention on GPT-OSS (production.gpt_oss_attention): transformers'
eager attention bit for bit, with one [heads, prompt, cache] score tensor fewer alive at its
peak (on the 20B shape, 0.46 GiB of a prompt that fills the 2,048-token window)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from torch.multiprocessing.reductions import StorageWeakRef  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402
from transformers.models.gpt_oss import modeling_gpt_oss  # noqa: E402

from production import gpt_oss_attention  # noqa: E402

HEADS, KV_HEADS, PROMPT, CACHE, HEAD_DIM = 8, 2, 200, 256, 32


class PeakBytes(TorchDispatchMode):
    """The most bytes that tensors made by torch ops held at once while the mode was open."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.live = {ptr: ref for ptr, ref in self.live.items() if not ref[0].expired()}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                self.live.setdefault(
                    storage.data_ptr(), (StorageWeakRef(storage), storage.nbytes())
                )
        self.peak = max(self.peak, sum(nbytes for _, nbytes in self.live.values()))
        return out


def _inputs(dtype: torch.dtype) -> tuple:
    generator = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype)

    module = SimpleNamespace(
        num_key_value_groups=HEADS // KV_HEADS, sinks=randn(HEADS), training=False
    )
    query = randn(1, HEADS, PROMPT, HEAD_DIM)
    key, value = randn(1, KV_HEADS, CACHE, HEAD_DIM), randn(1, KV_HEADS, CACHE, HEAD_DIM)
    mask = torch.zeros(1, 1, PROMPT, CACHE, dtype=dtype)  # the cache's unwritten tail masked
    mask[..., PROMPT:] = torch.finfo(dtype).min
    return module, query, key, value, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_prompts_attention_is_transformers_eager_with_one_score_tensor_less(
    dtype: torch.dtype,
) -> None:
    args = _inputs(dtype)
    peaks, results = [], []
    for attend in (modeling_gpt_oss.eager_attention_forward, gpt_oss_attention.attention):
        with PeakBytes() as memory:
            results.append(attend(*args, scaling=HEAD_DIM**-0.5))
        peaks.append(memory.peak)
    (stock_out, stock_weights), (out, weights) = results
    assert torch.equal(out, stock_out) and torch.equal(weights, stock_weights)
    score_bytes = HEADS * PROMPT * CACHE * torch.finfo(dtype).bits // 8
    assert peaks[0] - peaks[1] >= 0.95 * score_bytes


def test_a_decode_step_calls_transformers_own_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    module, query, key, value, mask = _inputs(torch.float32)
    calls = []
    stock = modeling_gpt_oss.eager_attention_forward

    def counted(*args, **kwargs):
        calls.append(args[1].shape)
        return stock(*args, **kwargs)

    monkeypatch.setattr(modeling_gpt_oss, "eager_attention_forward", counted)
    gpt_oss_attention.attention(module, query[:, :, :1], key, value, mask[:, :, :1], 0.125)
    assert calls == [query[:, :, :1].shape]
