"""Per-request control of the next-token distribution: logit bias, presence and frequency
penalties, grammar-constrained decoding (xgrammar) and log-probabilities.

One `Steering` object per request sits between the model's logits and the sampler, on both
decode paths: inside `generate()` as a logits processor (`SteeringProcessor`), and in the static
CUDA-graph decoder's eager `pick` (the captured step produces the logits; this runs after it).

    steering = Steering(spec, grammars, vocab_size, device)
    logits = steering.process(logits)      # [1, V] raw logits -> logits to sample from
    token = sample(logits)
    steering.sampled(token)                 # device-side bookkeeping (penalty counts)
    steering.accept(int(token))             # host-side: grammar state, log-probs entry

Why xgrammar: it is what vLLM and SGLang constrain with, it ships the per-model tool-call
formats (harmony's commentary channel, Qwen/Hermes `<tool_call>`) as structural tags, and on
SmolLM2's 49k vocabulary it cost 0.19 ms per token on the CPU (benchmarks/constrained.py);
llguidance 1.9 refused SmolLM2's byte-level tokens outright (its HF tokenizer import misread
`Ġ`), and outlines-core compiles a regex index per schema up front.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch

log = logging.getLogger(__name__)

GrammarKind = Literal["json_object", "json_schema", "structural_tag"]


@dataclass(frozen=True)
class Grammar:
    """What the output must match: `json_object` (any JSON object), `json_schema` (`source` is
    the schema, `strict` as OpenAI's flag: no properties beyond the schema's) or a structural
    tag (`source` is xgrammar's JSON form: tool calls in the model's own format)."""

    kind: GrammarKind
    source: str = ""
    strict: bool = True


@dataclass(frozen=True)
class SteeringSpec:
    """The request's parameters that act on the logits (all off by default)."""

    logit_bias: tuple[tuple[int, float], ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: none; 0: the chosen token's; k: and the top k
    grammar: Grammar | None = None

    @property
    def active(self) -> bool:
        return bool(
            self.logit_bias
            or self.presence_penalty
            or self.frequency_penalty
            or self.logprobs is not None
            or self.grammar is not None
        )

    @property
    def needs_each_token(self) -> bool:
        """Whether the next step's logits need the host to have seen this token first (the
        grammar's state, the log-probs read back): the static decoder then does not overlap
        one step's launch with the previous token's read."""
        return self.grammar is not None or self.logprobs is not None


class GrammarError(ValueError):
    """A schema or grammar xgrammar cannot compile: the request is refused (400)."""


class Grammars:
    """xgrammar's compiler for one tokenizer, built on first use (about 0.2 s for a 49k
    vocabulary) and shared by all requests; compiled grammars are cached by xgrammar.

    Control tokens (the tokenizer's special added tokens: harmony's `<|channel|>` and
    `<|end|>`, ChatML's `<|im_start|>`) are given to the compiler as text that begins with a
    NUL byte. xgrammar otherwise reads them as their literal text, so `<|end|>` was a valid
    piece of a JSON string: a random GPT-OSS closed its final message from inside a string
    value, 4 of 20 answers. No text a grammar here accepts holds a raw NUL (JSON forbids it),
    so a control token now matches only where a structural tag names it (TokenFormat), by
    id: structural tags name control tokens by their text and `compile` turns those into ids.
    Stop tokens stay stop tokens: the matcher allows them only once the grammar is done."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_ids = stop_ids
        self._compiler: Any = None
        self._lock = threading.Lock()
        decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        # Read once: every structural tag a request brings is resolved against it.
        self._control_ids = {
            t.content: i for i, t in decoder.items() if t.special and i < vocab_size
        }

    def control_token_ids(self) -> dict[str, int]:
        """The tokenizer's control tokens by text (its special added tokens)."""
        return dict(self._control_ids)

    def tokenizer_info(self) -> Any:
        import xgrammar

        detected = xgrammar.TokenizerInfo.from_huggingface(
            self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_ids
        )
        vocab = list(detected.decoded_vocab)
        for token_id in self._control_ids.values():
            vocab[token_id] = b"\x00" + vocab[token_id]
        # RAW: `vocab` is already decoded (byte-level and byte-fallback spellings undone).
        return xgrammar.TokenizerInfo(
            vocab,
            xgrammar.VocabType.RAW,
            vocab_size=self.vocab_size,
            stop_token_ids=self.stop_ids,
            add_prefix_space=detected.add_prefix_space,
        )

    @property
    def compiler(self) -> Any:
        with self._lock:
            if self._compiler is None:
                import xgrammar

                started = time.monotonic()
                self._compiler = xgrammar.GrammarCompiler(self.tokenizer_info(), max_threads=2)
                log.info("grammar compiler ready in %.2f s", time.monotonic() - started)
            return self._compiler

    def _token_ids(self, node: Any) -> Any:
        """A structural tag with its control tokens named by id (see the class docstring)."""
        if isinstance(node, list):
            return [self._token_ids(item) for item in node]
        if not isinstance(node, dict):
            return node
        out = {key: self._token_ids(value) for key, value in node.items()}
        ids = self._control_ids

        def resolve(token: Any) -> Any:
            if isinstance(token, str):
                if token not in ids:
                    raise GrammarError(f"{token!r} is not one of the tokenizer's control tokens")
                return ids[token]
            return token

        if node.get("type") == "token":
            out["token"] = resolve(node["token"])
        if node.get("type") in ("exclude_token", "any_tokens"):
            out["exclude_tokens"] = [resolve(t) for t in node.get("exclude_tokens", [])]
        return out

    def compile(self, grammar: Grammar) -> Any:
        """The compiled grammar; a schema it cannot take raises GrammarError."""
        try:
            if grammar.kind == "json_object":
                # OpenAI's JSON mode answers an object; xgrammar's builtin JSON takes any value.
                return self.compiler.compile_json_schema(
                    '{"type": "object"}', any_whitespace=False, strict_mode=False
                )
            if grammar.kind == "json_schema":
                return self.compiler.compile_json_schema(
                    grammar.source, any_whitespace=False, strict_mode=grammar.strict
                )
            tag = self._token_ids(json.loads(grammar.source))
            return self.compiler.compile_structural_tag(json.dumps(tag))
        except GrammarError:
            raise
        except Exception as exc:  # xgrammar raises RuntimeError/ValueError with its reason
            lines = str(exc).strip().splitlines() or [repr(exc)]
            # "[14:30:43] /project/cpp/json_schema_converter.cc:5082: Unsupported type ..."
            reason = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", lines[0])
            raise GrammarError(reason) from exc

    def matcher(self, grammar: Grammar) -> Any:
        import xgrammar

        return xgrammar.GrammarMatcher(self.compile(grammar))


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]


class Steering:
    """The state of one request's logits control; see the module docstring for the calls."""

    def __init__(
        self, spec: SteeringSpec, grammars: Grammars | None, vocab_size: int, device: Any
    ) -> None:
        self.spec = spec
        self.vocab_size = vocab_size
        self.device = device
        self.bias: torch.Tensor | None = None
        if spec.logit_bias:
            self.bias = torch.zeros(vocab_size, dtype=torch.float32)
            for token, value in spec.logit_bias:
                self.bias[token] = value
            self.bias = self.bias.to(device)
        self.counts: torch.Tensor | None = None
        if spec.presence_penalty or spec.frequency_penalty:
            self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
        self.matcher: Any = None
        self.bitmask: torch.Tensor | None = None
        if spec.grammar is not None:
            import xgrammar

            assert grammars is not None
            self.matcher = grammars.matcher(spec.grammar)
            self.bitmask = xgrammar.allocate_token_bitmask(1, vocab_size)
        self.last_logprobs: torch.Tensor | None = None
        self.logprobs: list[TokenLogprob] = []
        self.grammar_broken = False

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """[1, V] raw logits (V: the model's vocabulary, padding included) -> the logits to
        sample from (float32; a new tensor)."""
        scores = logits.to(torch.float32, copy=True)
        if self.spec.logprobs is not None:
            # The model's own distribution, before bias, penalties and the grammar (as vLLM
            # reports it by default): what the model thought, not what it was allowed.
            self.last_logprobs = torch.log_softmax(scores, dim=-1)[0]
        if self.bias is not None:
            scores += self.bias
        if self.counts is not None:
            counts = self.counts
            scores -= self.spec.frequency_penalty * counts
            scores -= self.spec.presence_penalty * (counts > 0).float()
        if self.matcher is not None and not self.matcher.is_terminated():
            import xgrammar

            self.matcher.fill_next_token_bitmask(self.bitmask)
            mask = self.bitmask.to(scores.device, non_blocking=True)
            xgrammar.apply_token_bitmask_inplace(scores, mask, vocab_size=self.vocab_size)
        return scores

    def sampled(self, token: torch.Tensor) -> None:
        """Device-side: count the sampled token for the penalties (no host sync)."""
        if self.counts is not None:
            self.counts.index_add_(
                0, token.view(-1).to(self.counts.device), torch.ones(1, device=self.counts.device)
            )

    def accept(self, token: int) -> None:
        """Host-side, once the token is known: advance the grammar, keep the log-probs."""
        grammar_open = self.matcher is not None and not self.matcher.is_terminated()
        if grammar_open and not self.matcher.accept_token(token):
            # Only a sampler that ignored the mask gets here; say so once, keep going.
            if not self.grammar_broken:
                log.warning("token %d does not match the request's grammar", token)
            self.grammar_broken = True
        if self.last_logprobs is not None:
            row = self.last_logprobs
            top: list[tuple[int, float]] = []
            if self.spec.logprobs:
                values, ids = row.topk(self.spec.logprobs)
                top = list(zip(ids.tolist(), values.tolist(), strict=True))
            self.logprobs.append(TokenLogprob(token, float(row[token]), top))
            self.last_logprobs = None


def schema_text(schema: Any) -> str:
    return schema if isinstance(schema, str) else json.dumps(schema)
