"""The Responses API's `encrypted_content` of a reasoning item: the reasoning text, carried
by the client from one turn to the next.

Codex CLI (and any client with `store: false`) keeps no reasoning text of its own: it asks
for `include: ["reasoning.encrypted_content"]` and sends the token back with the reasoning
item on the next turn. OpenAI encrypts it; whetstone has no secret to keep (the same text is
in the item's `content`), so the token is the text in base64url, signed with an HMAC key
kept in the home (<home>/reasoning.key, mode 0600). The signature is what matters: a token
another server made (OpenAI's, a second whetstone home) or one changed on the way is refused
by name instead of being read as analysis the model never wrote.

Format: `wsr1.<base64url(text)>.<base64url(HMAC-SHA256(key, "wsr1." + payload))>`.

Standard library only.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

PREFIX = "wsr1."


class BadToken(ValueError):
    """A token this home did not make, or one changed since."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _signature(key: bytes, payload: str) -> str:
    return _b64(hmac.new(key, (PREFIX + payload).encode("ascii"), hashlib.sha256).digest())


def seal(key: bytes, text: str) -> str:
    """The token of `text`."""
    payload = _b64(text.encode("utf-8"))
    return f"{PREFIX}{payload}.{_signature(key, payload)}"


def open_token(key: bytes, token: str) -> str:
    """The text `token` carries; BadToken when this key did not sign it as it is."""
    if not token.startswith(PREFIX) or token.count(".") != 2:
        raise BadToken("not a reasoning token of this server")
    payload, signature = token.removeprefix(PREFIX).split(".")
    if not hmac.compare_digest(signature, _signature(key, payload)):
        raise BadToken("its signature does not match (changed, or made by another server)")
    try:
        return _unb64(payload).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):  # signed, so only a bug gets here
        raise BadToken("its text does not decode") from None
