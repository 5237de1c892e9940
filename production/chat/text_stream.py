"""Incremental detokenising: generated token ids into settled text, one id at a time.

The tokenizers library's `DecodeStream` does the work (a character split across tokens comes
out whole once its last byte arrives; a SentencePiece-style leading space stays right); this
adds what it lacks for an answer that ends mid-character: `flush()` hands out the held-back
ids, as U+FFFD, instead of dropping them.
"""

from __future__ import annotations

from typing import Any

from tokenizers.decoders import DecodeStream


class TextStream:
    """One message's text. `tokenizer`: a transformers fast tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)
        # Ids fed since the last text came out: an unfinished character, or special tokens.
        self._held: list[int] = []

    def push(self, token_id: int) -> str:
        chunk = self._stream.step(self._tokenizer.backend_tokenizer, token_id)
        if chunk is None:
            self._held.append(token_id)
            return ""
        self._held.clear()
        return chunk

    def flush(self) -> str:
        """What was held back, a genuine trailing U+FFFD included; the stream starts over."""
        held, self._held = self._held, []
        self._stream = DecodeStream(skip_special_tokens=True)
        if not held:
            return ""
        return self._tokenizer.decode(
            held, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
