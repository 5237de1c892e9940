"""What the handlers share (the Service: settings, store, registry, the model worker and
the adapter it serves), how the process builds it, and the dependency routes take it by."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Request

from candidates import Registry, RegistryError
from common.config import Settings
from data.store import Store
from production.api.errors import ApiError
from production.api.openai_schema import ChatRequest
from production.api.turns import active_path, key_of, turns_of

if TYPE_CHECKING:
    from production.worker import GenerationWorker

log = logging.getLogger(__name__)

WATCH_EVERY_S = 1.0
RECENT_CONVERSATIONS = 50


class Service:
    """What the handlers share: settings, store, registry, the model worker."""

    def __init__(
        self, settings: Settings, store: Store, worker: GenerationWorker, registry: Registry
    ):
        self.settings = settings
        self.store = store
        # The answers' writes to the store, in order, off the event loop: a write waits up to
        # the store's busy timeout while a training job holds the database, and on the loop
        # that wait would stall every request.
        self.writes = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="store-writes")
        self.worker = worker
        self.engine = worker.engine
        self.registry = registry
        self.started_at = datetime.now(UTC)
        self.served = 0
        self.swap_lock = asyncio.Lock()
        self.last_swap_error: str | None = None
        self.refused_target: str | None = None
        self._reasoning_key: bytes | None = None

    def reasoning_key(self) -> bytes:
        """The home's key for the Responses API's reasoning tokens (read or made once)."""
        if self._reasoning_key is None:
            try:
                self._reasoning_key = self.settings.paths.ensure_reasoning_key()
            except (OSError, ValueError) as exc:
                # The home's file, not the request, is wrong: a server error that says which
                # file and what to do, before any answer is generated.
                raise ApiError(500, f"the reasoning key cannot be used: {exc}") from None
        return self._reasoning_key

    # --------------------------------------------------------------- adapter swap

    async def sync_adapter(self) -> dict[str, Any]:
        """Make the engine serve what `current` points to; refuse an invalid target."""
        async with self.swap_lock:
            target = self.registry.current_id()
            old = self.engine.adapter_id
            if target == old:
                return {"adapter_id": old, "changed": False}
            started = time.monotonic()
            try:
                path = None
                if target is not None:
                    self.registry.validate(target, base_model=self.settings.model.base_model)
                    path = self.registry.path(target)

                def swap(engine: Any) -> None:
                    if target is not None:
                        engine.load_adapter(target, path)
                    engine.activate(target)
                    if old is not None:
                        engine.unload_adapter(old)

                await asyncio.wrap_future(self.worker.call(swap))
            except Exception as exc:
                self.last_swap_error = f"{target}: {exc}"
                self.refused_target = target
                log.error("refused to swap to %s, still serving %s: %s", target, old, exc)
                raise ApiError(
                    409, f"adapter {target} was refused, still serving {old}: {exc}"
                ) from exc
            self.last_swap_error = None
            self.refused_target = None
            log.info("now serving adapter %s (was %s)", target, old)
            return {
                "adapter_id": target,
                "previous": old,
                "changed": True,
                "seconds": round(time.monotonic() - started, 3),
            }

    async def watch_current(self) -> None:
        """Catch swaps made by hand (or by another process) on the `current` symlink."""
        while True:
            await asyncio.sleep(WATCH_EVERY_S)
            try:
                target = self.registry.current_id()
                if target != self.engine.adapter_id and target != self.refused_target:
                    await self.sync_adapter()
            except ApiError:
                pass
            except Exception:
                log.exception("watching candidates/current failed")

    # ------------------------------------------------------------- conversations

    def thread(self, req: ChatRequest) -> tuple[Any, str]:
        """Find or start the conversation; returns (conversation, id of the turn to answer:
        the user's message, or the last tool result)."""
        system, turns = turns_of(req.messages)
        conversation = None
        if req.regenerate:
            earlier, new = turns, []
        else:
            # The new turns: what follows the client's last assistant turn.
            last = max((i for i, t in enumerate(turns) if t["role"] == "assistant"), default=-1)
            if turns[-1]["role"] == "user":
                last = max(last, len(turns) - 2)
            earlier, new = turns[: last + 1], turns[last + 1 :]
        wanted = [key_of(t) for t in earlier]
        if req.conversation_id is not None:
            conversation = self.store.get_conversation(req.conversation_id)
        elif wanted:  # a first message continues nothing: skip the scan
            for summary in self.store.list_conversations(limit=RECENT_CONVERSATIONS):
                candidate = self.store.get_conversation(summary.id)
                if candidate.system_prompt != system:
                    continue
                path = active_path(candidate)
                if req.regenerate and path and path[-1][0] == "assistant":
                    path = path[:-1]
                if path == wanted:
                    conversation = candidate
                    break
        if conversation is None:
            conversation = self.store.create_conversation(
                system_prompt=system,
                reasoning_effort=req.reasoning_effort,
                title=next((t["content"] for t in turns if t["role"] == "user"), "")[:60],
            )
            # Earlier turns the client sent become part of the record, so the context an
            # answer was made in can be rebuilt for training.
            for turn in earlier:
                self._add_turn(conversation.id, turn)
        if req.regenerate:
            asked = [m for m in conversation.messages if m.role in ("user", "tool")]
            if not asked:
                raise ApiError(400, "regenerate: the conversation has no user message to answer")
            return conversation, asked[-1].id
        added = [self._add_turn(conversation.id, turn) for turn in new]
        return conversation, added[-1].id

    def _add_turn(self, conversation_id: str, turn: dict[str, Any]) -> Any:
        fields: dict[str, Any] = {}
        if turn["role"] == "assistant":
            fields["finish_reason"] = "tool_calls" if turn.get("tool_calls") else "stop"
        if turn.get("tool_calls"):
            fields["tool_calls"] = turn["tool_calls"]
        if turn["role"] == "tool":
            fields["tool_call_id"] = turn["tool_call_id"]
        return self.store.add_message(conversation_id, turn["role"], turn["content"], **fields)


def build_service(settings: Settings, device: str) -> Service:
    from production.engine import Engine
    from production.worker import GenerationWorker

    settings.paths.create()
    store = Store(settings.db_url)
    cut = store.cut_off_unfinished()
    if cut:
        log.warning("marked %d answers cut off by an earlier stop as cut_off", cut)
    registry = Registry(settings.paths.candidates_dir)
    engine = Engine(settings, device)
    worker = GenerationWorker(engine, settings.server.max_queue)
    service = Service(settings, store, worker, registry)
    target = registry.current_id()
    if target is not None:
        try:
            registry.validate(target, base_model=settings.model.base_model)
            engine.load_adapter(target, registry.path(target))
            engine.activate(target)
        except (RegistryError, RuntimeError) as exc:
            service.last_swap_error = f"{target}: {exc}"
            service.refused_target = target
            log.error("current adapter %s refused, serving the base model: %s", target, exc)
    return service


async def get_service(request: Request) -> Service:
    # Async so FastAPI calls it on the event loop, not in its thread pool.
    return request.app.state.service


# A route's `service: ServiceDep` parameter: the app's one Service.
ServiceDep = Annotated[Service, Depends(get_service)]
