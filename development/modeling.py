"""Loading the base model for training and evaluation, and the two measurements both need:
per-token log-likelihood of an answer given its prompt, and batched greedy generation.

Tokenisation follows TRL's conversational prompt-completion handling: the prompt is the
chat template with the generation prompt, the completion is what the full conversation adds
after it (for ChatML: the answer, `<|im_end|>` and a newline). Scoring and training therefore
see the same tokens.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
from transformers import PreTrainedTokenizerBase, StoppingCriteria

from common.config import Settings
from common.devices import choose_backend
from production.chat import formats
from production.model.loading import load_model

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]


def load_base(settings: Settings, device: str, *, for_training: bool) -> tuple[Any, Any]:
    """The base model and tokenizer on `device` (the loader serving shares), with a pad
    token for batching and the KV cache off while training."""
    started = time.monotonic()
    model, tokenizer = load_model(settings, device, for_training=for_training)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.use_cache = not for_training
    log.info(
        "loaded %s (%s) on %s in %.1f s",
        settings.model.base_model,
        choose_backend(settings, device),
        device,
        time.monotonic() - started,
    )
    return model, tokenizer


# Rows decoded together when building the replay cache. A batch decodes until its longest
# answer ends (a third of the 68 prompts run to the 160-token limit), and on 2 CPU cores with
# the embedded model a step's fixed cost dominates (ms per step: 104 at 16 rows, 239 at 68),
# so all 68 prompts in one batch took 56 s where batches of 16 took 86 s. On a GPU the KV
# cache of many long harmony answers would crowd a 24 GB card that also holds the model.
BASE_ANSWER_BATCH = {"cpu": 128, "cuda": 16}

# progress(step, steps): decode steps done of an upper bound (batches x max_new_tokens).
Progress = Callable[[int, int], None]


def base_answers(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    settings: Settings,
    prompts: list[str],
    progress: Progress | None = None,
) -> list[tuple[str, bool]]:
    """Greedy one-turn answers to `prompts` as (text, finished), for the replay cache."""
    from development.training_data import REPLAY_MAX_NEW_TOKENS

    device = next(model.parameters()).device.type
    out = generate(
        model,
        tokenizer,
        [[{"role": "user", "content": p}] for p in prompts],
        max_new_tokens=REPLAY_MAX_NEW_TOKENS,
        chat_format=settings.model.chat_format,
        batch_size=BASE_ANSWER_BATCH.get(device, 16),
        progress=progress,
    )
    return [(g.text, g.finished) for g in out]


def _ids(tokenizer: PreTrainedTokenizerBase, messages: Messages, *, generation: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=generation, tokenize=True, return_dict=False
    )
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: Messages) -> list[int]:
    return _ids(tokenizer, prompt, generation=True)


def pair_ids(
    tokenizer: PreTrainedTokenizerBase, prompt: Messages, answer: str
) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) for an assistant answer to `prompt`."""
    head = _ids(tokenizer, prompt, generation=True)
    full = _ids(tokenizer, [*prompt, {"role": "assistant", "content": answer}], generation=False)
    if full[: len(head)] != head:
        raise ValueError("the chat template renders the prompt differently inside a conversation")
    return head, full[len(head) :]


def token_count(tokenizer: PreTrainedTokenizerBase, prompt: Messages, answer: str) -> int:
    head, tail = pair_ids(tokenizer, prompt, answer)
    return len(head) + len(tail)


@dataclass(frozen=True)
class Score:
    """Log-likelihood of one answer: the sum over its tokens, and how many tokens."""

    logprob: float
    tokens: int

    @property
    def nll_per_token(self) -> float:
        return -self.logprob / max(1, self.tokens)


@contextmanager
def contiguous_head_input(model: Any) -> Iterator[None]:
    """Hand the output head a contiguous input while inside.

    With `logits_to_keep` (scoring) and in generate() (one position per step) the head gets a
    slice of the hidden states. On the CPU, a PEFT-wrapped model then multiplies it through a
    batched matmul that copies the whole head weight once per row: 8 rows x 49,152 x 576 on
    SmolLM2, a second per forward. Measured on 2 cores: a forward of 8 x 60 tokens 1.88 s ->
    0.68 s; the 26 general-knowledge probes 23.6 s -> 6.5 s, 8 answers of 32 tokens 5.8 s ->
    3.6 s. Elsewhere it costs one copy of the kept positions."""
    head = model.get_output_embeddings()
    if head is None:
        yield
        return
    hook = head.register_forward_pre_hook(lambda _m, args: (args[0].contiguous(), *args[1:]))
    try:
        yield
    finally:
        hook.remove()


def score_answers(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[Messages, str]],
    *,
    max_length: int,
    batch_size: int = 8,
) -> list[Score]:
    """Log p(answer | prompt) for each (prompt, answer), batched. Prompts longer than
    max_length lose their oldest tokens (the answer is always scored whole).

    Only the answer span's logits are made, and turned into float32 one row at a time: rows
    are left-padded so every answer ends at the last position, and the model is asked for the
    last (longest answer + 1) positions only. Full-length float32 logits over GPT-OSS's
    201,088-token vocabulary would be ~13 GB for 8 rows of 2,048 tokens, on a 24 GB card that
    already holds the model."""
    with torch.no_grad(), contiguous_head_input(model):
        return _score_answers(model, tokenizer, pairs, max_length, batch_size)


def _score_answers(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[Messages, str]],
    max_length: int,
    batch_size: int,
) -> list[Score]:
    model.eval()
    device = next(model.parameters()).device
    encoded = []
    for prompt, answer in pairs:
        head, tail = pair_ids(tokenizer, prompt, answer)
        keep = max(1, max_length - len(tail))
        encoded.append((head[-keep:], tail))
    # Batches of similar lengths pad less: every row costs as much as its batch's longest.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]) + len(encoded[i][1]))
    scores: list[Score | None] = [None] * len(encoded)
    pad = tokenizer.pad_token_id
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        batch = [encoded[i] for i in indices]
        width = max(len(h) + len(t) for h, t in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (head, tail) in enumerate(batch):
            ids = head + tail
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention[row, width - len(ids) :] = 1
        # Positions count real tokens only, as generate() does for left-padded rows.
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        # Token i+1 is predicted at position i: an answer of n tokens needs the predictions
        # at the n positions before the last one, so the last n_max + 1 logits are enough.
        span = max(len(tail) for _, tail in batch) + 1
        logits = model(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            position_ids=positions.to(device),
            logits_to_keep=span,
        ).logits
        for row, (_, tail) in enumerate(batch):
            n = len(tail)
            predicted = logits[row, span - 1 - n : span - 1].float()
            targets = torch.tensor(tail, device=predicted.device)
            picked = predicted.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            logprob = picked - torch.logsumexp(predicted, dim=-1)
            scores[indices[row]] = Score(float(logprob.sum()), n)
        del logits
    return cast(list[Score], scores)  # every slot was filled: order covers each row once


class _StepReport(StoppingCriteria):
    """Never stops generation: reports each decode step to a Progress callback (generate()
    calls its stopping criteria once per step, which is the only per-step hook it has)."""

    def __init__(self, progress: Progress, done: int, total: int) -> None:
        self.progress, self.step, self.total = progress, done, total

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        self.step += 1
        self.progress(self.step, self.total)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@dataclass(frozen=True)
class Generated:
    text: str
    tokens: int
    finished: bool  # ended with an end-of-turn token rather than at max_new_tokens
    seconds: float  # this row's share of its batch's wall time


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Messages],
    *,
    max_new_tokens: int,
    chat_format: str = "plain",
    batch_size: int = 16,
    progress: Progress | None = None,
) -> list[Generated]:
    """Greedy answers, batched with left padding. For harmony models the text is the final
    channel (generation runs past the analysis channel's `<|end|>` to the real stop).
    `progress` is called after every decode step (see Progress)."""
    model.eval()
    device = next(model.parameters()).device
    fmt = formats.chat_format(chat_format, tokenizer)
    eos = fmt.stop_ids
    results: list[Generated] = []
    batches = -(-len(prompts) // batch_size)
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        with contiguous_head_input(model):
            for start in range(0, len(prompts), batch_size):
                batch = [prompt_ids(tokenizer, p) for p in prompts[start : start + batch_size]]
                width = max(len(ids) for ids in batch)
                input_ids = torch.full(
                    (len(batch), width), tokenizer.pad_token_id, dtype=torch.long
                )
                attention = torch.zeros((len(batch), width), dtype=torch.long)
                for row, ids in enumerate(batch):
                    input_ids[row, width - len(ids) :] = torch.tensor(ids)
                    attention[row, width - len(ids) :] = 1
                started = time.monotonic()
                stopping = None
                if progress is not None:
                    done = start // batch_size * max_new_tokens
                    stopping = [_StepReport(progress, done, batches * max_new_tokens)]
                out = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention.to(device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    use_cache=True,  # a model loaded for training has it off in its config
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    eos_token_id=eos,
                    pad_token_id=tokenizer.pad_token_id,
                    stopping_criteria=stopping,
                )
                seconds = (time.monotonic() - started) / len(batch)
                for row in out[:, width:].tolist():
                    ended = next((i for i, t in enumerate(row) if t in eos), None)
                    results.append(
                        Generated(
                            text=fmt.completion_text(row).strip(),
                            tokens=len(row) if ended is None else ended + 1,
                            finished=ended is not None,
                            seconds=seconds,
                        )
                    )
    finally:
        tokenizer.padding_side = padding_side
    return results
