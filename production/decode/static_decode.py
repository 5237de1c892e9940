"""Batch-1 decoding on a static KV cache, its one-token step replayed as a CUDA graph, with the
active LoRA adapter merged into the served weights in place.

Why: at batch 1 every weight is read once per token, so decode is bounded by HBM bandwidth /
weight bytes (about 2,000 tok/s for a 1 B bf16 model on an H200). transformers' generate()
launches ~1,000 small kernels from Python per token and reaches 2-3% of that
(benchmarks/results/gpu-*.json). Here:

- the KV cache is a transformers StaticCache (fixed shapes), so the one-token forward is
  compiled once with torch.compile(mode="reduce-overhead"): inductor fuses the elementwise
  ops and the step replays as one CUDA graph;
- the next step is launched before the host reads the current token (copied to pinned
  memory behind an event), so the per-token Python work (detokenising, streaming) runs while
  the GPU computes;
- an adapter is merged into the weights it targets: W = W0 + scale * B @ A, computed in fp32
  from the original W0 (kept in host memory, so merges never drift) and written into the same
  storage. A captured graph reads weights by address, so a hot swap needs no recompile and no
  recapture, and the adapter costs nothing per token (unmerged, a LoRA on all 7 projections
  adds ~220 small matmuls per token to a 16-layer model). PEFT's compiled hotswap keeps the
  adapter unmerged; for one adapter served at a time, merging is the faster design.

An adapter is read with PEFT's own loaders (config, weights) and checked completely before any
weight is written; what the merge cannot express (DoRA, modules_to_save, non-Linear targets
other than GPT-OSS's fused experts, LoRA biases) is refused by name: serve such adapters with
server.decode = "generate".
"""

from __future__ import annotations

import itertools
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

_PREFIX = "base_model.model."


class AdapterMergeError(RuntimeError):
    """The adapter folder cannot be merged into this model; nothing was written."""


@dataclass(frozen=True)
class LoraFactors:
    """One target layer's update: W += scale * b @ a."""

    module: str
    a: torch.Tensor  # [r, in_features]
    b: torch.Tensor  # [out_features, r]
    scale: float


def read_lora(folder: Path, model: nn.Module, device: str | torch.device) -> list[LoraFactors]:
    """The adapter's per-layer factors, checked against `model`'s layers and shapes."""
    from peft import PeftConfig
    from peft.utils import load_peft_weights
    from peft.utils.other import get_pattern_key

    config = PeftConfig.from_pretrained(str(folder))
    if getattr(config, "peft_type", None) != "LORA":
        raise AdapterMergeError(f"peft_type is {config.peft_type}, only LORA merges")
    for flag in ("use_dora", "fan_in_fan_out", "lora_bias"):
        if getattr(config, flag, False):
            raise AdapterMergeError(f"{flag} = true cannot be merged here")
    if getattr(config, "modules_to_save", None):
        raise AdapterMergeError(f"modules_to_save = {config.modules_to_save} cannot be merged here")
    parameters = list(getattr(config, "target_parameters", None) or [])
    unservable = [p for p in parameters if not _FUSED_EXPERT_PARAMETER.search(p)]
    if unservable:
        raise AdapterMergeError(f"target_parameters = {unservable} cannot be merged here")
    weights = load_peft_weights(str(folder), device="cpu")
    layers = dict(model.named_modules())
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        name = key.removeprefix(_PREFIX)
        for part in ("lora_A", "lora_B"):
            if name.endswith(f".{part}.weight"):
                pairs.setdefault(name.removesuffix(f".{part}.weight"), {})[part] = tensor
                break
        else:
            raise AdapterMergeError(f"weight {key} is not a LoRA A/B matrix")
    if parameters:
        pairs = _split_stacked_experts(pairs, layers)
    factors = []
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            raise AdapterMergeError(f"{module} has {sorted(pair)}, needs lora_A and lora_B")
        in_features, out_features = _linear_shape(layers, module)
        a, b = pair["lora_A"], pair["lora_B"]
        r = a.shape[0]
        if a.shape != (r, in_features) or b.shape != (out_features, r):
            raise AdapterMergeError(
                f"{module}: A {tuple(a.shape)} / B {tuple(b.shape)} do not fit a Linear "
                f"{in_features} -> {out_features}"
            )
        alpha_key = get_pattern_key(config.alpha_pattern.keys(), module)
        alpha = config.alpha_pattern.get(alpha_key, config.lora_alpha)
        scale = alpha / (r**0.5) if config.use_rslora else alpha / r
        factors.append(LoraFactors(module, a.to(device), b.to(device), float(scale)))
    if not factors:
        raise AdapterMergeError("the adapter holds no LoRA weights")
    return factors


# PEFT's target_parameters on GPT-OSS's fused 3-D expert weights: how Unsloth trains the
# experts of a bf16 GPT-OSS (its 4-bit checkpoints are split into per-expert Linears instead).
_FUSED_EXPERT_PARAMETER = re.compile(r"(^|\.)experts\.(gate_up_proj|down_proj)$")


def _split_stacked_experts(
    pairs: dict[str, dict[str, torch.Tensor]], layers: dict[str, nn.Module]
) -> dict[str, dict[str, torch.Tensor]]:
    """PEFT's LoRA on a [experts, in, out] Parameter, as one Linear-style LoRA per expert on
    the split names the decoder serves (`...experts.gate_up_projs.<i>`).

    PEFT (ParamWrapper.get_delta_weight) stacks the experts' factors: A is [E*r, in] with
    expert e in rows e*r..(e+1)*r, B is [out, r*E] with expert e in columns e, e+E, ... and
    W_e += scale * (B_e @ A_e)^T. Two parameters of one module nest their wrappers, so the
    second one's keys carry `.base_layer`; which projection a pair is comes from its shape."""
    from production.decode.moe_decode import DecodeExperts

    split: dict[str, dict[str, torch.Tensor]] = {}
    for name, pair in pairs.items():
        owner_name = name.replace(".base_layer", "")
        owner = layers.get(owner_name)
        if not isinstance(owner, DecodeExperts) or set(pair) != {"lora_A", "lora_B"}:
            split[name] = pair  # read_lora's own checks name what is wrong with it
            continue
        a, b = pair["lora_A"], pair["lora_B"]
        experts = owner.num_experts
        kinds = []
        if a.ndim == 2 and b.ndim == 2 and not a.shape[0] % experts and b.shape[1] == a.shape[0]:
            stacked_in, stacked_out = a.shape[1], b.shape[0]
            kinds = [k for k in ("gate_up", "down") if owner.shape(k) == (stacked_in, stacked_out)]
        if len(kinds) != 1:
            raise AdapterMergeError(
                f"{name}: A {tuple(a.shape)} / B {tuple(b.shape)} are not a LoRA stacked over "
                f"the {experts} experts' gate_up {owner.shape('gate_up')} or down "
                f"{owner.shape('down')} projection"
            )
        r = a.shape[0] // experts
        per_expert_a = a.reshape(experts, r, stacked_in)
        per_expert_b = b.reshape(stacked_out, r, experts)
        for e in range(experts):
            module = f"{owner_name}.{kinds[0]}_projs.{e}"
            if module in split:
                raise AdapterMergeError(f"{module} is targeted twice")
            split[module] = {"lora_A": per_expert_a[e], "lora_B": per_expert_b[:, :, e]}
    return split


def _linear_shape(layers: dict[str, nn.Module], module: str) -> tuple[int, int]:
    """(in, out) features of the Linear an adapter names: a Linear of the model, or one
    expert's projection of a mixture-of-experts layer prepared by production.decode.moe_decode
    (`...experts.gate_up_projs.<i>`, Unsloth's split naming)."""
    from production.decode.moe_decode import EXPERT_LORA_NAME, DecodeExperts

    layer = layers.get(module)
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    match = EXPERT_LORA_NAME.match(module)
    owner = layers.get(match["owner"]) if match else None
    if isinstance(owner, DecodeExperts) and int(match["i"]) < owner.num_experts:
        return owner.shape(match["kind"])
    raise AdapterMergeError(f"{module} is not a Linear layer of this model")


class MergedAdapters:
    """Adapters held as factors; the active one lives merged in the model's weights."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layers = dict(model.named_modules())
        self.loaded: dict[str, list[LoraFactors]] = {}
        self.active: str | None = None
        self.original: dict[str, torch.Tensor] = {}  # W0 of every layer ever merged into

    def load(self, adapter_id: str, folder: Path) -> None:
        device = next(self.model.parameters()).device
        self.loaded[adapter_id] = read_lora(folder, self.model, device)

    def unload(self, adapter_id: str) -> None:
        if adapter_id != self.active:
            self.loaded.pop(adapter_id, None)

    def activate(self, adapter_id: str | None) -> None:
        """Serve `adapter_id` (None: the base weights). On failure the previous one serves."""
        if adapter_id is not None and adapter_id not in self.loaded:
            raise AdapterMergeError(f"adapter {adapter_id} is not loaded")
        previous = self.active
        try:
            self._write(adapter_id)
        except BaseException:
            self._write(previous)
            raise

    def _expert(self, module: str) -> tuple[Any, str, int] | None:
        """(experts layer, kind, index) for a mixture-of-experts projection: their LoRA stays
        unmerged (production.decode.moe_decode), so no copy of the experts' weights is kept."""
        from production.decode.moe_decode import EXPERT_LORA_NAME

        match = EXPERT_LORA_NAME.match(module)
        if not match:
            return None
        return self.layers[match["owner"]], match["kind"], int(match["i"])

    @torch.no_grad()
    def _write(self, adapter_id: str | None) -> None:
        started = time.monotonic()
        factors = self.loaded.get(adapter_id, []) if adapter_id is not None else []
        old = {f.module for f in self.loaded.get(self.active, [])} if self.active else set()
        self.active = None  # until every layer is written
        experts: dict[tuple[Any, str], dict[int, tuple]] = {}
        for name in old:
            expert = self._expert(name)
            if expert is not None:
                experts.setdefault(expert[:2], {})
        for f in factors:
            expert = self._expert(f.module)
            if expert is not None:
                owner, kind, index = expert
                owner.reserve_lora(f.a.shape[0])
                experts.setdefault((owner, kind), {})[index] = (f.a, f.b, f.scale)
        for (owner, kind), updates in experts.items():
            owner.write_lora(kind, updates)
        for name in old - {f.module for f in factors}:
            if self._expert(name) is None:
                self.layers[name].weight.copy_(self.original[name])
        for f in factors:
            if self._expert(f.module) is not None:
                continue
            weight = self.layers[f.module].weight
            if f.module not in self.original:
                keep = weight.detach().to("cpu", copy=True)
                self.original[f.module] = keep.pin_memory() if weight.is_cuda else keep
            merged = self.original[f.module].to(weight.device, torch.float32, copy=True)
            merged.addmm_(f.b.float(), f.a.float(), alpha=f.scale)
            weight.copy_(merged)
        self.active = adapter_id
        seconds = time.monotonic() - started
        log.info("merged %s into %d layers in %.3f s", adapter_id, len(factors), seconds)


def _every_layer_full(config: Any) -> Any:
    """`config` with every layer's cache a full one. transformers' sliding-window cache layer
    counts tokens in a Python int that the compiled step reads: each step was a new shape, and
    a new CUDA graph recorded per token (GPT-OSS's alternating layers). A full layer holds all
    `max_len` positions (GPT-OSS-20B at 2,048: 25 MB more) and the sliding-window mask, built
    from the model's own config, still limits those layers to their window."""
    import copy

    full = copy.deepcopy(config)
    full.layer_types = ["full_attention"] * config.num_hidden_layers
    full.sliding_window = None
    return full


def _ring_layer(window: int, slack: int = 16) -> Any:
    """A sliding-window layer's cache of `window` slots, position p written at p % window:
    the last `window` positions, all a sliding layer attends to (transformers keeps a key
    while kv_idx > q_idx - window). Its slots are out of position order, which only an
    attention that ignores order and masks (production.decode.decode_attention) may read: softmax
    is order-free and RoPE is already in the keys.

    A prompt starts where the ring stands (`cumulative_length`, 0 on a fresh cache): it gets
    back keys in position order (index = position; those before the window are never read)
    and leaves its last `window` in the ring. Each prompt also keeps an ordered copy of its
    last `window + slack` positions, so a later prompt may restart anywhere in the last
    `slack` positions of this one after the answer's steps moved the ring on (`rewind`)."""
    from transformers.cache_utils import StaticLayer

    class RingLayer(StaticLayer):
        is_sliding = True

        def __init__(self) -> None:
            super().__init__(max_cache_len=window)
            self.kept: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (start, k, v)

        def update(
            self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
        ) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            length = key_states.shape[-2]
            if length == 1:  # a step: on the device, so the captured graph never changes
                slot = (self.cumulative_length % window).view(1)
                self.keys.index_copy_(2, slot, key_states)
                self.values.index_copy_(2, slot, value_states)
                self.cumulative_length.add_(1)
                return self.keys, self.values
            start = int(self.cumulative_length)  # a prompt is not captured: syncing is fine
            end = start + length
            if start:
                keys, values = self._ordered(start, length, key_states, value_states)
            else:
                keys, values = key_states, value_states
            kept = min(end, window)
            slots = torch.arange(end - kept, end, device=self.device) % window
            self.keys.index_copy_(2, slots, keys[:, :, -kept:])
            self.values.index_copy_(2, slots, values[:, :, -kept:])
            self.cumulative_length.add_(length)
            # Only positions this prompt wrote or the ring held are set in `keys`.
            first = max(0, end - window - slack, start - min(start, window))
            self.kept = (first, keys[:, :, first:].clone(), values[:, :, first:].clone())
            return keys, values

        def _ordered(
            self, start: int, length: int, key_states: torch.Tensor, value_states: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            """Keys and values by position for 0..start+length: the ring's last `window`
            before `start`, then the new ones (earlier slots are left unset: never read)."""
            held = min(start, window)
            slots = torch.arange(start - held, start, device=self.device) % window
            shape = (*key_states.shape[:2], start + length, key_states.shape[-1])
            keys = key_states.new_empty(shape)
            values = value_states.new_empty((*shape[:3], value_states.shape[-1]))
            keys[:, :, start - held : start] = self.keys.index_select(2, slots)
            values[:, :, start - held : start] = self.values.index_select(2, slots)
            keys[:, :, start:] = key_states
            values[:, :, start:] = value_states
            return keys, values

        def restart_range(self) -> tuple[int, int]:
            """The positions a prompt may start from besides the ring's own: those whose
            `window` positions before are in the last prompt's kept copy."""
            if self.kept is None:
                return (0, 0)
            first, keys, _ = self.kept
            end = first + keys.shape[2]
            return (first + window if first else 0, end)

        def rewind(self, position: int) -> None:
            """Stand at `position`: the ring as it was then, from the kept copy (or as it is)."""
            if position == int(self.cumulative_length):
                return
            low, high = self.restart_range()
            if not low <= position <= high:
                raise ValueError(f"a ring cannot restart at {position} (kept {low}..{high})")
            first, keys, values = self.kept
            held = min(position, window)
            slots = torch.arange(position - held, position, device=self.device) % window
            offsets = torch.arange(position - held - first, position - first, device=self.device)
            self.keys.index_copy_(2, slots, keys.index_select(2, offsets))
            self.values.index_copy_(2, slots, values.index_select(2, offsets))
            self.cumulative_length.fill_(position)

        def reset(self) -> None:
            super().reset()
            self.kept = None

    return RingLayer()


def common_prefix(first: list[int], second: list[int]) -> int:
    """How many leading tokens the two sequences share."""
    same = 0
    for a, b in zip(first, second, strict=False):
        if a != b:
            break
        same += 1
    return same


def prefill_chunks(start: int, end: int, chunk: int) -> list[tuple[int, int]]:
    """[start, end) in forwards of at most `chunk` tokens (0: one), none of one token alone
    but a one-token prompt: a single token runs as a step, which the rings do not keep."""
    if chunk <= 0 or end - start <= chunk:
        return [(start, end)]
    bounds = [*range(start, end, chunk), end]
    if bounds[-1] - bounds[-2] < 2:
        del bounds[-2]
    return list(itertools.pairwise(bounds))


class StaticDecoder:
    """One sequence at a time on a StaticCache of `max_len` positions. With `ring_sliding`
    (the model attends through production.decode.decode_attention), sliding-window layers keep only
    their window: on GPT-OSS-20B at 32,768 tokens, 0.75 GiB of cache instead of 1.5."""

    def __init__(
        self,
        model: nn.Module,
        max_len: int,
        device: str,
        graphs: bool,
        *,
        ring_sliding: bool = False,
        keep_prompts: bool = True,
        prefill_chunk: int = 0,
    ) -> None:
        from transformers import StaticCache

        self.model = model
        self.max_len = max_len
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.cache = StaticCache(config=_every_layer_full(model.config), max_cache_len=max_len)
        window = getattr(model.config, "sliding_window", None)
        types = getattr(model.config, "layer_types", None) or []
        if ring_sliding and window and window < max_len:
            for index, kind in enumerate(types):
                if kind == "sliding_attention":
                    self.cache.layers[index] = _ring_layer(window)
        self.rings = [layer for layer in self.cache.layers if hasattr(layer, "rewind")]
        # The tokens whose keys and values the cache holds, by position: the last prompt and
        # the answer's tokens the steps wrote. A next prompt that starts with them (the same
        # conversation, one turn on) prefills only what is new. `forget` on a weight change.
        self.keep_prompts = keep_prompts
        self.prefill_chunk = prefill_chunk  # 0: a prompt in one forward
        self.held: list[int] = []
        self.ids = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        self.pos = torch.zeros((1,), dtype=torch.long, device=self.device)
        self.host_token = torch.zeros((1,), dtype=torch.long, pin_memory=self.cuda)
        self.graphs = graphs
        # fullgraph: a graph break would split the step into several graphs and Python between.
        self.step = (
            torch.compile(self._one_token, mode="reduce-overhead", fullgraph=True)
            if graphs
            else self._one_token
        )

    def _one_token(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        out = self.model(
            input_ids=ids,
            position_ids=pos.view(1, 1),
            cache_position=pos,
            past_key_values=self.cache,
            use_cache=True,
        )
        return out.logits[:, -1, :]

    def forget(self) -> None:
        """The served weights changed: what the cache holds no longer answers for them."""
        self.held = []

    def restart_at(self, prompt: list[int]) -> int:
        """Where `prompt`'s prefill may start: after the longest prefix of it that the cache
        still holds (the last conversation's tokens, prompt and answer), less one token (the
        first step needs a prompt token's logits). Sliding layers' rings can stand at the
        end of what is held or late in the last prompt (production.decode.static_decode's
        `_ring_layer`); past those, at that prompt's end; before them, from the start."""
        same = common_prefix(self.held, prompt)
        # A one-token prefill runs as a step, which leaves the rings' kept copy as the last
        # prompt's: with rings, at least two tokens, so the copy always matches what is held.
        target = min(same, len(prompt) - (2 if self.rings else 1))
        if target <= 0 or not self.rings or target == len(self.held):
            return max(target, 0)
        low, high = self.rings[0].restart_range()
        if low <= target <= high:
            return target
        return high if low <= high < target else 0

    def run(
        self,
        prompt: list[int],
        max_new: int,
        pick: Callable[[torch.Tensor], torch.Tensor],
        emit: Callable[[int], bool],
        *,
        overlap: bool = True,
    ) -> int:
        """Prefill `prompt`, then decode up to `max_new` tokens; `pick` turns logits [1, V]
        into a token [1] on the device; `emit(token)` returns False to stop. Returns how many
        of the prompt's tokens came from the cache (kept from the run before) unread.

        `overlap` launches the next step before the host has read this token (the GPU never
        waits for Python). A `pick` that needs `emit` to have seen the previous token (a
        grammar's state) turns it off: each step then waits for the one before."""
        if len(prompt) + max_new > self.max_len:
            raise ValueError(f"{len(prompt)} + {max_new} tokens exceed the cache ({self.max_len})")
        start = self.restart_at(prompt) if self.keep_prompts else 0
        self.held = []  # until this run ends: an error leaves nothing to reuse
        if start:
            for layer in self.cache.layers:
                if hasattr(layer, "rewind"):
                    layer.rewind(start)
                else:
                    layer.cumulative_length.fill_(start)
        else:
            self.cache.reset()
        n = len(prompt)
        for begin, end in prefill_chunks(start, n, self.prefill_chunk):
            positions = torch.arange(begin, end, device=self.device)
            logits = self.model(
                input_ids=torch.tensor([prompt[begin:end]], device=self.device),
                position_ids=positions.view(1, -1),
                cache_position=positions,
                past_key_values=self.cache,
                use_cache=True,
                logits_to_keep=1,
            ).logits[:, -1, :]
        token = pick(logits)
        emitted: list[int] = []
        fed = 0  # the answer's tokens the steps have written into the cache
        for i in range(max_new):
            ready = self._to_host(token)
            more = i + 1 < max_new
            if more and overlap:  # launch the next step before waiting for this token
                following = self._next(token, n + i, pick)
                fed += 1
            if ready is not None:
                ready.synchronize()
            emitted.append(int(self.host_token[0]))
            if not emit(emitted[-1]) or not more:
                break
            if not overlap:
                following = self._next(token, n + i, pick)
                fed += 1
            token = following
        self.held = prompt + emitted[:fed]
        return start

    def _next(
        self, token: torch.Tensor, position: int, pick: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """The token after `token` (at `position`): one captured step, then `pick`."""
        self.ids.copy_(token.view(1, 1))
        self.pos.fill_(position)
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()
        return pick(self.step(self.ids, self.pos))

    def _to_host(self, token: torch.Tensor) -> Any:
        if not self.cuda:
            self.host_token.copy_(token)
            return None
        self.host_token.copy_(token, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return ready
