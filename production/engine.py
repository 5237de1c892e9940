"""The model behind the API: one base model, LoRA adapters beside it, one generation at a time.

Two loaders behind one small interface: transformers + PEFT (CPU or CUDA) and Unsloth's
FastLanguageModel (CUDA, 4-bit) when the `gpu` extra is installed. Adapters are PEFT adapters
either way, so a hot swap is: load the new adapter under its own name beside the old one,
switch the active adapter between two generations, delete the old one.

All methods except `prompt_ids`/`count` must be called from the one generation thread
(`production.worker`); that thread is what makes "between requests" well defined.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from transformers import LogitsProcessor, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from common.config import Settings
from common.devices import choose_backend, is_gpt_oss, serving_decode
from production.chat.decoders import Delta
from production.chat.formats import chat_format
from production.chat.output import OutputProcessor
from production.chat.tool_calls import ToolCall
from production.decode import decode_attention, moe_decode
from production.decode.static_decode import (
    AdapterMergeError,
    MergedAdapters,
    StaticDecoder,
    common_prefix,
)
from production.decode.steering import Grammars, Steering, SteeringSpec
from production.model import gpu_memory
from production.model.loading import load_model

log = logging.getLogger(__name__)


class AdapterLoadError(RuntimeError):
    """An adapter folder could not be loaded onto the base model; the old one keeps serving."""


MIN_SAMPLING_TEMPERATURE = 1e-4


@dataclass(frozen=True)
class Sampling:
    """Per-request sampling; None means the model's recommended default."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int = 512
    seed: int | None = None
    stop: tuple[str, ...] = ()  # the answer ends before the first of these strings
    steering: SteeringSpec = field(default_factory=SteeringSpec)  # bias, penalties, grammar
    tools: bool = False  # take tool calls out of the answer (the chat format's tool parser)
    raw: bool = False  # a completion of raw text: no chat-format parsing (no harmony channels)


@dataclass
class Outcome:
    text: str
    reasoning: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # stop | length | tool_calls | cancelled
    adapter_id: str | None
    ttft_s: float | None
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)
    tool_calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[Any] | None = None  # steering.TokenLogprob per generated token
    cached_tokens: int = 0  # the prompt's tokens read from the kept cache, not prefilled


@dataclass
class PromptCacheStats:
    """How the kept conversation cache served (GET /v1/status)."""

    requests: int = 0
    hits: int = 0  # requests that started after a kept prefix
    reused_tokens: int = 0  # prompt tokens read from the cache
    prefilled_tokens: int = 0  # prompt tokens computed


class _TokenSink(BaseStreamer):
    """generate() calls put() with the prompt first, then each new token."""

    def __init__(self, on_token: Callable[[int], None]) -> None:
        self.on_token = on_token
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.on_token(int(token))

    def end(self) -> None:
        pass


class _StopWhen(StoppingCriteria):
    def __init__(self, should_stop: Callable[[], bool]) -> None:
        self.should_stop = should_stop

    def __call__(
        self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        # On the ids' device: generate() combines it with its own flags there (cuda:0).
        return torch.full(
            (input_ids.shape[0],), self.should_stop(), dtype=torch.bool, device=input_ids.device
        )


class _Steer(LogitsProcessor):
    """A request's Steering inside generate(): sees each step's raw logits."""

    def __init__(self, steering: Steering, prompt_length: int) -> None:
        self.steering = steering
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] > self.prompt_length:  # the token sampled last step
            self.steering.sampled(input_ids[0, -1:])
        return self.steering.process(scores).to(scores.dtype)


class _TokensOnly(LogitsProcessor):
    """No id past the tokenizer: an embedding padded past the vocabulary has rows that decode
    to nothing (see Engine.token_count)."""

    def __init__(self, token_count: int) -> None:
        self.token_count = token_count

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores[:, self.token_count :] = -float("inf")
        return scores


class Engine:
    """Base model + named PEFT adapters on one device."""

    def __init__(self, settings: Settings, device: str = "cpu") -> None:
        self.settings = settings
        self.device = device
        self.base_model_name = settings.model.base_model
        started = time.monotonic()
        self.backend = choose_backend(settings, device, "production")
        self.decode = serving_decode(settings, device)
        # GPT-OSS's 4-bit experts have their own kernel (production.decode.moe_decode); other 4-bit
        # layers would need bitsandbytes' kernels inside the captured step.
        moe = self.decode == "static" and is_gpt_oss(settings)
        quantized = self.backend != "transformers" or (settings.model.load_in_4bit and not moe)
        if self.decode == "static" and quantized:
            raise RuntimeError(
                "server.decode = 'static' needs a 16-bit model (or GPT-OSS) on the transformers "
                f"backend (model.backend resolved to {self.backend}, load_in_4bit = "
                f"{settings.model.load_in_4bit}): use server.decode = 'generate'"
            )
        self.model, self.tokenizer = load_model(
            settings, device, for_training=False, role="production"
        )
        self.model.eval()
        if moe:
            # Expert LoRA buffers for the largest rank this home's adapters can have: an
            # adapter of a larger rank grows them, and the compiled decode step then
            # re-traces on the generation thread, where CUDA-graph trees lack the warm-up
            # thread's state (pytorch#123177): on an H200 every request failed after loading
            # a rank-16 adapter onto buffers of the preset's r = 8. Smaller adapters are
            # zero-padded: rank 32 over 16 adds ~4% to the expert bytes a decode step reads
            # (computed from the shapes, not measured).
            rank = settings.largest_lora_rank()
            prepared = moe_decode.prepare(self.model, lora_rank=rank)
            log.info("mixture-of-experts decode: %s", prepared)
        self.base = self.model
        self.generation_defaults = self.model.generation_config
        self.format = chat_format(settings.model.chat_format, self.tokenizer)
        self.stop_ids = self.format.stop_ids
        # The logits' width: the embedding may be padded past the tokenizer's vocabulary.
        self.vocab_size = self.model.get_output_embeddings().weight.shape[0]
        # Ids a sample may take: those the tokenizer has. A padding row decodes to nothing; on
        # the random 20B GPT-OSS (2k tokens, 201k rows, padding at logit 0) most of a 256-token
        # answer at temperature 1 was such ids, and the stream ran on for up to 2.1 s with no
        # text. A real model rarely picks one; when it does, it is a step that says nothing.
        self.token_count = min(len(self.tokenizer), self.vocab_size)
        self.grammars = Grammars(self.tokenizer, self.vocab_size, self.stop_ids)
        window = settings.model.serving_window
        self.context_window = min(
            window, getattr(self.model.config, "max_position_embeddings", window)
        )
        self._longest_token: int | None = None
        self.adapter_id: str | None = None
        self.adapter_loaded_at: datetime = datetime.now(UTC)
        self.loaded: set[str] = set()
        self.merged: MergedAdapters | None = None
        self.static: StaticDecoder | None = None
        # generate()'s kept cache and the tokens it holds (the static decoder keeps its own).
        self._kept_cache: Any = None
        self._kept_tokens: list[int] = []
        self.prompt_cache = PromptCacheStats()
        if self.decode == "static":
            self.model.requires_grad_(False)
            self.merged = MergedAdapters(self.model)
            graphs = device.startswith("cuda")
            # GPT-OSS attends through a kernel that reads only the positions present (the
            # static cache reserves the whole window) and lets sliding layers keep a ring.
            ring = decode_attention.install(self.model)
            self.static = StaticDecoder(
                self.model,
                self.context_window,
                device,
                graphs,
                ring_sliding=ring,
                keep_prompts=settings.server.prompt_cache,
                prefill_chunk=settings.server.prefill_chunk,
            )
            try:
                self._warm_up_static(settings, device, graphs, ring)
            except Exception as exc:  # torch.compile cannot trace every architecture
                if settings.server.decode == "static":
                    raise
                log.warning(
                    "the static decode step does not build for %s (%s: %s); decoding with "
                    "generate() instead",
                    self.base_model_name,
                    type(exc).__name__,
                    str(exc).splitlines()[0] if str(exc) else "",
                )
                self.decode, self.static, self.merged = "generate", None, None
        if device.startswith("cuda"):
            # Loading, compiling and the warm-up's prefill leave freed blocks in torch's cache;
            # kept, the process holds them on the card for as long as it serves.
            torch.cuda.empty_cache()
        log.info(
            "loaded %s (%s backend, %s decode) on %s in %.1f s; GPU memory %s",
            self.base_model_name,
            self.backend,
            self.decode,
            device,
            time.monotonic() - started,
            gpu_memory.snapshot(device),
        )

    def _warm_up_static(self, settings: Settings, device: str, graphs: bool, ring: bool) -> None:
        """Warm the static decoder up. Where the decode attention (`ring`) does not build, the
        static decoder on transformers' eager attention instead, as before it, over a window
        of the training row length (eager attention reads every reserved position each step,
        and a prompt's scores are [heads, prompt, window]: a 32,768-token window would not
        fit a 24 GB card)."""
        try:
            self._warm_up()
        except Exception as failure:
            if not ring:
                raise
            decode_attention.uninstall(self.model)
            self.context_window = min(self.context_window, settings.model.max_seq_length)
            log.warning(
                "the decode attention does not build here (%s: %s); the static decoder "
                "attends eagerly over a window of %d tokens (model.max_seq_length) instead",
                type(failure).__name__,
                str(failure).splitlines()[0] if str(failure) else "",
                self.context_window,
            )
            torch.compiler.reset()
            self.static = StaticDecoder(
                self.model,
                self.context_window,
                device,
                graphs,
                keep_prompts=settings.server.prompt_cache,
                prefill_chunk=settings.server.prefill_chunk,
            )
            self._warm_up()

    def _warm_up(self) -> None:
        """Compile and capture the decode step now, not on the first user's request."""
        started = time.monotonic()
        prompt = self.prompt_ids([{"role": "user", "content": "Hello"}], None)
        with torch.inference_mode():
            self.static.run(prompt, 8, lambda logits: logits.argmax(-1), lambda token: True)
        log.info("decode step ready in %.1f s", time.monotonic() - started)

    # ------------------------------------------------------------------ prompts

    def prompt_ids(
        self,
        messages: list[dict[str, Any]],
        reasoning_effort: str | None,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        kwargs = self.format.template_arguments(reasoning_effort, tools)
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False, **kwargs
        )
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)

    def longest_token_chars(self) -> int:
        """The most characters one token of this vocabulary stands for: a prompt longer
        than that times the context window cannot fit, found without tokenising it."""
        if self._longest_token is None:
            vocab = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
            self._longest_token = max(
                (len(self.tokenizer.convert_tokens_to_string([t])) for t in vocab if t), default=1
            )
        return self._longest_token

    def count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # ----------------------------------------------------------------- adapters

    def load_adapter(self, adapter_id: str, folder: Path) -> None:
        """Load an adapter beside the active one (does not switch to it)."""
        if adapter_id in self.loaded:
            return
        if self.merged is not None:
            try:
                self.merged.load(adapter_id, folder)
            except Exception as exc:
                raise AdapterLoadError(
                    f"adapter {adapter_id} at {folder} does not load onto {self.base_model_name}: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            self.loaded.add(adapter_id)
            return
        from peft import PeftModel

        try:
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(str(folder), adapter_name=adapter_id, is_trainable=False)
            else:
                self.model = PeftModel.from_pretrained(
                    self.base, str(folder), adapter_name=adapter_id, is_trainable=False
                )
        except Exception as exc:
            if isinstance(self.model, PeftModel) and adapter_id in self.model.peft_config:
                self.model.delete_adapter(adapter_id)
            raise AdapterLoadError(
                f"adapter {adapter_id} at {folder} does not load onto {self.base_model_name}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        self.model.eval()
        self.loaded.add(adapter_id)

    def activate(self, adapter_id: str | None) -> None:
        if adapter_id is not None and adapter_id not in self.loaded:
            raise AdapterLoadError(f"adapter {adapter_id} is not loaded")
        if self.merged is not None:
            try:
                self.merged.activate(adapter_id)
            except AdapterMergeError as exc:
                raise AdapterLoadError(str(exc)) from exc
        elif adapter_id is not None:
            self.model.set_adapter(adapter_id)
        self.forget_prompts()
        self.adapter_id = adapter_id
        self.adapter_loaded_at = datetime.now(UTC)

    def forget_prompts(self) -> None:
        """Drop the kept conversation cache: the served weights changed."""
        if self.static is not None:
            self.static.forget()
        self._kept_cache, self._kept_tokens = None, []

    def unload_adapter(self, adapter_id: str) -> None:
        if adapter_id not in self.loaded or adapter_id == self.adapter_id:
            return
        if self.merged is not None:
            self.merged.unload(adapter_id)
        else:
            remaining = sorted(self.loaded - {adapter_id})
            if not remaining:
                # PEFT keeps its deleted last adapter as the active one, and serving the base
                # model (disable_adapter) then fails with a KeyError: take LoRA out instead.
                self.model.unload()
                self.model = self.base
            else:
                if self.model.active_adapter == adapter_id:  # serving the base model now
                    self.model.set_adapter(remaining[0])
                self.model.delete_adapter(adapter_id)
        self.loaded.discard(adapter_id)

    # --------------------------------------------------------------- generation

    def _generation_kwargs(self, sampling: Sampling) -> dict[str, Any]:
        cfg = self.generation_defaults
        temperature = sampling.temperature
        if temperature is None and cfg.do_sample:
            temperature = cfg.temperature
        elif temperature is None:
            # top_p or top_k alone ask for sampling: at OpenAI's default temperature, 1.
            wants_sampling = sampling.top_p is not None or sampling.top_k is not None
            temperature = 1.0 if wants_sampling else 0.0
        kwargs: dict[str, Any] = {"max_new_tokens": sampling.max_tokens}
        # Logits divided by a temperature this small overflow to inf and sample NaN; its
        # limit is greedy decoding, which is what the request asks for.
        if temperature < MIN_SAMPLING_TEMPERATURE:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(
                do_sample=True,
                temperature=temperature,
                top_p=sampling.top_p if sampling.top_p is not None else cfg.top_p,
                top_k=sampling.top_k if sampling.top_k is not None else cfg.top_k,
            )
        return kwargs

    def resolved_settings(self, sampling: Sampling) -> dict[str, Any]:
        kwargs = self._generation_kwargs(sampling)
        return {
            "temperature": kwargs["temperature"] if kwargs["do_sample"] else 0.0,
            "top_p": kwargs.get("top_p"),
            "top_k": kwargs.get("top_k"),
            "max_tokens": sampling.max_tokens,
            "seed": sampling.seed,
        } | ({"stop": list(sampling.stop)} if sampling.stop else {})

    def stream(
        self,
        prompt: list[int],
        sampling: Sampling,
        on_delta: Callable[[Delta], None],
        cancelled: Callable[[], bool],
    ) -> Outcome:
        """Generate for one request, calling on_delta with what each token shows the client;
        runs in the worker thread. The loop samples (steering the logits) and hands each id to
        the request's output processor, which does all the text."""
        output = OutputProcessor(
            self.format,
            prompt,
            max_tokens=sampling.max_tokens,
            raw=sampling.raw,
            tools=sampling.tools,
            stop=sampling.stop,
        )
        steering = (
            Steering(sampling.steering, self.grammars, self.vocab_size, self.device)
            if sampling.steering.active
            else None
        )
        started = time.monotonic()
        first: list[float] = []

        def on_token(token: int) -> None:
            if not first:
                first.append(time.monotonic() - started)
            if steering is not None:
                steering.accept(token)
            delta = output.feed(token)
            if delta:
                on_delta(delta)

        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)

        def stop_now() -> bool:
            return cancelled() or output.done

        if self.static is not None:
            stop_tokens = set(self.stop_ids)

            def emit(token: int) -> bool:
                on_token(token)
                return token not in stop_tokens and not stop_now()

            with torch.inference_mode():
                cached = self.static.run(
                    prompt,
                    sampling.max_tokens,
                    self._picker(sampling, steering),
                    emit,
                    overlap=not sampling.steering.needs_each_token,
                )
        else:
            cached = self._generate(prompt, sampling, on_token, stop_now, steering)
        self.prompt_cache.requests += 1
        self.prompt_cache.hits += bool(cached)
        self.prompt_cache.reused_tokens += cached
        self.prompt_cache.prefilled_tokens += len(prompt) - cached
        for delta in output.flush():
            on_delta(delta)
        return Outcome(
            text=output.text,
            reasoning=output.reasoning,
            prompt_tokens=len(prompt),
            completion_tokens=output.produced,
            finish_reason=output.finish_reason(cancelled()),
            adapter_id=self.adapter_id,
            ttft_s=first[0] if first else None,
            seconds=time.monotonic() - started,
            settings=self.resolved_settings(sampling),
            tool_calls=output.tool_calls,
            logprobs=None if sampling.steering.logprobs is None else steering.logprobs,
            cached_tokens=cached,
        )

    def _generate(
        self,
        prompt: list[int],
        sampling: Sampling,
        on_token: Callable[[int], None],
        stop_now: Callable[[], bool],
        steering: Steering | None = None,
    ) -> int:
        """generate() over PEFT; returns how many prompt tokens came from the kept cache."""
        from transformers import LogitsProcessorList

        input_ids = torch.tensor([prompt], device=self.device)
        # Custom processors run before generate()'s temperature/top-k/top-p warpers.
        processors = LogitsProcessorList([_Steer(steering, len(prompt))] if steering else [])
        if self.token_count < self.vocab_size:
            processors.insert(0, _TokensOnly(self.token_count))
        cache, cached = self._cache_for(prompt)
        answer: list[int] = []

        def keep(token: int) -> None:
            answer.append(token)
            on_token(token)

        with torch.inference_mode(), self._adapter_context():
            self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                eos_token_id=self.stop_ids,
                pad_token_id=self.tokenizer.pad_token_id or self.stop_ids[0],
                streamer=_TokenSink(keep),
                stopping_criteria=StoppingCriteriaList([_StopWhen(stop_now)]),
                logits_processor=processors,
                past_key_values=cache,
                **self._generation_kwargs(sampling),
            )
        if cache is not None:
            # The cache holds every token fed: the prompt and the answer but its last token.
            self._kept_cache = cache
            self._kept_tokens = (prompt + answer)[: cache.get_seq_length()]
        return cached

    def _cache_for(self, prompt: list[int]) -> tuple[Any | None, int]:
        """The kept cache cut back to the longest prefix it shares with `prompt` (less one
        token: generate() needs one to start from), or a new one. A cache with sliding-window
        layers is only extended: once past the window such a layer cannot be cut back."""
        from transformers import DynamicCache

        kept, held = self._kept_cache, self._kept_tokens
        self._kept_cache, self._kept_tokens = None, []  # until this generation ends
        if self.backend != "transformers" or not self.settings.server.prompt_cache:
            return None, 0  # Unsloth's generate() brings its own cache
        if kept is not None:
            target = min(common_prefix(held, prompt), len(prompt) - 1)
            slides = any(getattr(layer, "is_sliding", False) for layer in kept.layers)
            if target > 0 and (target == len(held) or not slides):
                if target < len(held):
                    kept.crop(target - len(held))
                return kept, target
        return DynamicCache(config=self.base.config), 0

    def _picker(
        self, sampling: Sampling, steering: Steering | None = None
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """logits [1, V] -> next token [1], on the device, with generate()'s warpers."""
        from transformers import (
            LogitsProcessorList,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        kwargs = self._generation_kwargs(sampling)
        real = self.token_count  # ids past it are padding: a prefix slice leaves them out
        if not kwargs["do_sample"]:
            if steering is None:
                return lambda logits: logits[..., :real].argmax(-1)

            def pick_greedy(logits: torch.Tensor) -> torch.Tensor:
                token = steering.process(logits)[..., :real].argmax(-1)
                steering.sampled(token)
                return token

            return pick_greedy
        warpers = LogitsProcessorList([TemperatureLogitsWarper(kwargs["temperature"])])
        if kwargs["top_k"]:
            warpers.append(TopKLogitsWarper(kwargs["top_k"]))
        if kwargs["top_p"] is not None and kwargs["top_p"] < 1.0:
            warpers.append(TopPLogitsWarper(kwargs["top_p"]))

        def pick(logits: torch.Tensor) -> torch.Tensor:
            scores = steering.process(logits) if steering is not None else logits.float()
            scores = warpers(None, scores[..., :real])
            token = torch.multinomial(torch.softmax(scores, dim=-1), 1).view(1)
            if steering is not None:
                steering.sampled(token)
            return token

        return pick

    def _adapter_context(self) -> Any:
        from contextlib import nullcontext

        if self.adapter_id is None and self.model is not self.base:
            return self.model.disable_adapter()
        return nullcontext()
