"""GPT-OSS checkpoints in Unsloth's 4-bit layout: each expert its own Linear, so bitsandbytes
can quantize it (`unsloth/gpt-oss-20b-unsloth-bnb-4bit`, the person's model).

transformers stores GPT-OSS experts fused: per layer one [experts, hidden, 2 x inter]
`gate_up_proj` Parameter (gate and up interleaved in the last axis) and one `down_proj`, and
the router's `weight`/`bias` directly. bitsandbytes quantizes only `nn.Linear`, so Unsloth's
checkpoint stores instead, per layer N and expert i (unsloth_zoo's GptOssExpertsBnb4bit):

    model.layers.N.mlp.experts.gate_up_projs.i.weight (+ bnb quant state)  Linear [2I, H]
    model.layers.N.mlp.experts.gate_up_projs.i.bias                        bf16 [2I]
    model.layers.N.mlp.experts.down_projs.i.weight (+ bnb quant state)     Linear [H, I]
    model.layers.N.mlp.experts.down_projs.i.bias                           bf16 [H]
    model.layers.N.mlp.router.linear.weight / .bias                        bf16, never quantized

Each expert Linear is the transpose of its slice of the fused tensor, so row 2j of
gate_up is gate j and row 2j+1 is up j. Unsloth recognises the layout by these tensor names
and installs its own classes; stock transformers cannot load it (its experts would be random).
`split_experts_installed()` gives the transformers backend the same structure, so both
backends load the same files and put LoRA on the same modules.
"""

from __future__ import annotations

import json
import re
import struct
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SPLIT_EXPERT_NAME = re.compile(r"\.experts\.(gate_up_projs|down_projs)\.\d+\.")
# The person's notes and Unsloth's notebooks name the MLP as gate/up/down; on split experts
# those names match nothing, and an adapter that "trains" on attention alone is the result
# (unslothai/unsloth#3405). They are expanded to every expert's Linear instead.
_GATE_UP_ALIASES = {"gate_proj", "up_proj", "gate_up_proj", "gate_up_projs"}
_DOWN_ALIASES = {"down_proj", "down_projs"}


def _safetensors_names(path: Path) -> list[str]:
    """Tensor names in a .safetensors file, read from its JSON header (no torch needed)."""
    with path.open("rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    return [name for name in header if name != "__metadata__"]


def checkpoint_tensor_names(folder: Path) -> list[str]:
    """Tensor names of a local checkpoint (single file or sharded index); [] if none."""
    single = folder / "model.safetensors"
    if single.is_file():
        return _safetensors_names(single)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return list(json.loads(index.read_text()).get("weight_map", {}))
    return []


def has_split_experts(folder: str | Path) -> bool:
    """Whether a local checkpoint stores GPT-OSS experts one Linear per expert."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        return False
    return any(SPLIT_EXPERT_NAME.search(name) for name in checkpoint_tensor_names(folder))


def _classes() -> tuple[type, type]:
    import torch
    from torch import nn
    from torch.nn import functional
    from transformers.models.gpt_oss import modeling_gpt_oss as gpt_oss

    class RouterLinear(nn.Module):
        """Holds weight and bias like nn.Linear but is not one, so bitsandbytes never
        quantizes the router (its keys are `router.linear.weight/bias`)."""

        def __init__(self, in_features: int, out_features: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.empty(out_features, in_features))
            self.bias = nn.Parameter(torch.zeros(out_features))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return functional.linear(x, self.weight, self.bias)

    class SplitTopKRouter(gpt_oss.GptOssTopKRouter):
        """GptOssTopKRouter with its parameters under `linear.` (Unsloth's 4-bit layout). A
        subclass, so what transformers finds by class still finds it: the router logits that
        TRL's MoE auxiliary loss reads are recorded by an isinstance hook."""

        def __init__(self, config: Any) -> None:
            nn.Module.__init__(self)  # not the stock __init__: no top-level weight/bias
            self.top_k = config.num_experts_per_tok
            self.num_experts = config.num_local_experts
            self.hidden_dim = config.hidden_size
            self.linear = RouterLinear(self.hidden_dim, self.num_experts)

        # transformers' _init_weights initialises `module.weight`/`module.bias` of routers.
        @property
        def weight(self) -> torch.Tensor:
            return self.linear.weight

        @property
        def bias(self) -> torch.Tensor:
            return self.linear.bias

        def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
            logits = self.linear(hidden_states.to(self.linear.weight.dtype))
            top_values, top_indices = torch.topk(logits, self.top_k, dim=-1)
            scores = functional.softmax(top_values, dim=1, dtype=top_values.dtype)
            return logits, scores, top_indices

    class SplitExperts(nn.Module):
        """GptOssExperts as one gate_up and one down Linear per expert (quantizable)."""

        def __init__(self, config: Any) -> None:
            super().__init__()
            self.num_experts = config.num_local_experts
            self.hidden_size = config.hidden_size
            self.intermediate_size = config.intermediate_size
            self.alpha = 1.702
            self.limit = getattr(config, "swiglu_limit", 7.0)
            self.gate_up_projs = nn.ModuleList(
                nn.Linear(self.hidden_size, 2 * self.intermediate_size)
                for _ in range(self.num_experts)
            )
            self.down_projs = nn.ModuleList(
                nn.Linear(self.intermediate_size, self.hidden_size) for _ in range(self.num_experts)
            )
            # transformers' _init_weights initialises the fused names of GptOssExperts:
            # empty, never saved.
            for name in ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"):
                self.register_buffer(name, torch.empty(0), persistent=False)

        def forward(
            self,
            hidden_states: torch.Tensor,
            router_indices: torch.Tensor,
            routing_weights: torch.Tensor,
        ) -> torch.Tensor:
            out = torch.zeros_like(hidden_states, dtype=torch.float32)
            for expert in router_indices.unique().tolist():
                token_idx, slot = torch.where(router_indices == expert)
                gate_up = self.gate_up_projs[expert](hidden_states[token_idx]).float()
                gate = gate_up[..., ::2].clamp(max=self.limit)
                up = gate_up[..., 1::2].clamp(min=-self.limit, max=self.limit)
                glu = (up + 1) * gate * torch.sigmoid(gate * self.alpha)
                down = self.down_projs[expert](glu.to(hidden_states.dtype)).float()
                out.index_add_(0, token_idx, down * routing_weights[token_idx, slot, None])
            return out.to(hidden_states.dtype)

    return SplitExperts, SplitTopKRouter


@contextmanager
def split_experts_installed() -> Iterator[None]:
    """While open, transformers builds GPT-OSS with split experts and the `linear` router, so
    `from_pretrained` loads (and bitsandbytes quantizes) Unsloth's 4-bit layout."""
    from transformers.models.gpt_oss import modeling_gpt_oss as gpt_oss

    stock = gpt_oss.GptOssExperts, gpt_oss.GptOssTopKRouter
    gpt_oss.GptOssExperts, gpt_oss.GptOssTopKRouter = _classes()
    try:
        yield
    finally:
        gpt_oss.GptOssExperts, gpt_oss.GptOssTopKRouter = stock


def lora_targets(model: Any, wanted: list[str]) -> list[str]:
    """`wanted` with the MLP names expanded to every expert's Linear on split-expert models
    (`gate_up_projs.<i>`, `down_projs.<i>`); unchanged for other models. PEFT cannot target
    a ModuleList itself, and gate/up/down match nothing there."""
    experts = 0
    for name, module in model.named_modules():
        if name.endswith("mlp.experts") and hasattr(module, "gate_up_projs"):
            experts = len(module.gate_up_projs)
            break
    if not experts:
        return list(wanted)
    kept = [t for t in wanted if t not in _GATE_UP_ALIASES | _DOWN_ALIASES]
    if _GATE_UP_ALIASES & set(wanted):
        kept += [f"gate_up_projs.{i}" for i in range(experts)]
    if _DOWN_ALIASES & set(wanted):
        kept += [f"down_projs.{i}" for i in range(experts)]
    return kept


def module_kind(name: str) -> str:
    """What part of the model a (LoRA) tensor or module name belongs to."""
    if ".experts." in name:
        if "gate_up" in name:
            return "experts.gate_up"
        if "down" in name:
            return "experts.down"
        return "experts.other"
    match = re.search(r"self_attn\.([a-z_]+_proj)", name)
    if match:
        return f"attention.{match.group(1)}"
    match = re.search(r"mlp\.([a-z_]+_proj)", name)
    if match:
        return f"mlp.{match.group(1)}"
    return "other"


def adapter_placement(folder: Path) -> dict[str, int]:
    """LoRA A/B tensors per module kind in a saved adapter, e.g. {"attention.q_proj": 48,
    "experts.gate_up": 1536, ...}: proof of where an adapter learns."""
    names = _safetensors_names(folder / "adapter_model.safetensors")
    return dict(sorted(Counter(module_kind(n) for n in names if ".lora_" in n).items()))
