"""GPT-OSS's eager attention over a prompt, with its score tensors freed as soon as they are
used: the static decoder's prefill on GPT-OSS.

transformers' `eager_attention_forward` (the one GPT-OSS has: its sinks need the softmax
written out) keeps three [heads, prompt, cache] tensors alive at its peak: the masked scores,
the scores with the sink column, and the shifted scores' softmax. On the static decoder's cache
every reserved position is a key, so a prompt that fills the 20B shape's 2,048-token window
takes 1.4 GiB for a moment, and torch's allocator keeps it: measured on an H100, it was what
took the worker past 16 GiB of card memory. Here the same operations run in the same order on
the same values, in place where torch allows it, so at most two of those tensors are alive
and every number is bit for bit transformers' own.

A decode step (one query) calls transformers' function itself, so the compiled and captured
step is what it was.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torch.nn import functional
from transformers.models.gpt_oss import modeling_gpt_oss as gpt_oss

log = logging.getLogger(__name__)

NAME = "whetstone_gpt_oss_eager"


def attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' GPT-OSS eager attention (same signature and results)."""
    if query.shape[-2] == 1 or module.training:
        return gpt_oss.eager_attention_forward(
            module, query, key, value, attention_mask, scaling, dropout, **kwargs
        )
    key_states = gpt_oss.repeat_kv(key, module.num_key_value_groups)
    value_states = gpt_oss.repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key_states.transpose(2, 3)).mul_(scaling)
    if attention_mask is not None:
        # In place only where it keeps the dtype that the sum out of place would have.
        if torch.result_type(scores, attention_mask) == scores.dtype:
            scores.add_(attention_mask)
        else:
            scores = scores + attention_mask
    sinks = module.sinks.reshape(1, -1, 1, 1).expand(query.shape[0], -1, query.shape[-2], -1)
    combined = torch.cat([scores, sinks], dim=-1)
    del scores
    combined.sub_(combined.max(dim=-1, keepdim=True).values)
    probs = functional.softmax(combined, dim=-1, dtype=combined.dtype)
    del combined
    weights = probs[..., :-1].to(value_states.dtype)  # the sink's column dropped
    out = torch.matmul(weights, value_states).transpose(1, 2).contiguous()
    return out, weights


def install(model: nn.Module) -> bool:
    """Make `model` (a GPT-OSS on eager attention) attend through `attention`, with the masks
    eager attention gets. Another attention implementation is left as it is (False)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    if model.config._attn_implementation != "eager":
        log.info(
            "attention is %r, not eager: the prompt's attention is left as it is",
            model.config._attn_implementation,
        )
        return False
    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, eager_mask)
    model.config._attn_implementation = NAME
    return True
