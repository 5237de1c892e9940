"""The API worker: an OpenAI-compatible chat API over the base model + the current adapter.

    python -m production.server --home ~/.local/share/whetstone [--host 127.0.0.1] [--port 8321]

`whetstone serve` runs exactly this, with CUDA_VISIBLE_DEVICES set for the production device
before torch is imported. Every exchange is stored: the user turn and an answer placeholder
before generation starts, the answer as it streams (flushed every second) and when it ends;
an answer cut short by a disconnect or a dead worker is kept and marked `cut_off`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from candidates import Candidate, CandidateNotFound, Registry, RegistryError
from common.config import (
    ConfigError,
    Settings,
    check_bind,
    is_loopback,
    load_settings,
    parse_sets,
)
from common.fs import atomic_write_text
from common.run_state import read_state
from data.errors import Gone, InvalidInput, NotFound, StoreError
from data.store import Store
from orchestrator import experiments, jobs, promotion
from production.device_pin import pin_device
from production.openai_schema import ChatMessage, ChatRequest, CompletionRequest

if TYPE_CHECKING:
    from production.engine import Outcome
    from production.worker import Worker

log = logging.getLogger(__name__)

FLUSH_EVERY_S = 1.0
WATCH_EVERY_S = 1.0
RECENT_CONVERSATIONS = 50


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        **headers: str,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers
        self.code = code


# ------------------------------------------------------------------------ request bodies


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    message_id: str
    # Kept as sent: the store's validation names what is wrong with each value.
    rating: Any = None
    correction: Any = None
    comment: Any = None


class ConversationPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    title: str | None = None
    system_prompt: str | None = None
    reasoning_effort: Literal["low", "medium", "high"] | None = None


class PromoteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    force: bool = False  # promote without a passing evaluation (integrity is still checked)


class TrainRequest(BaseModel):
    """POST /v1/train: what `whetstone train [--profile P] [--force] [--no-promote]` does."""

    model_config = ConfigDict(extra="forbid", strict=True)
    profile: str | None = None  # None: training.default_profile
    force: bool = False
    promote: bool = True


# ----------------------------------------------------------------------------- helpers


# OpenAI's error `code` is a string; these name what went wrong per status.
_ERROR_CODES = {
    400: "invalid_request",
    401: "invalid_api_key",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    410: "gone",
    411: "length_required",
    413: "request_too_large",
    499: "client_closed_request",
    500: "server_error",
    503: "overloaded",
}


def _error_body(
    message: str, status: int, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    kind = "invalid_request_error" if status < 500 else "server_error"
    code = code or _ERROR_CODES.get(status, "error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _turns(messages: list[ChatMessage]) -> tuple[str | None, list[dict[str, Any]]]:
    """The system prompt, and the other messages as the store and the chat template take
    them (tool calls and tool results included; a tool turn carries its function's name)."""
    system = messages[0].text() if messages[0].role in ("system", "developer") else None
    body = messages[1:] if system is not None else messages
    names: dict[str, str] = {}
    turns: list[dict[str, Any]] = []
    for m in body:
        turn: dict[str, Any] = {"role": m.role, "content": m.text()}
        if m.tool_calls:
            turn["tool_calls"] = [c.model_dump() for c in m.tool_calls]
            names |= {c.id: c.function.name for c in m.tool_calls}
        if m.role == "tool":
            turn["tool_call_id"] = m.tool_call_id
            turn["name"] = m.name or names.get(m.tool_call_id or "", "")
        turns.append(turn)
    return system, turns


def _turn_key(role: str, content: str, tool_calls: Any, tool_call_id: str | None) -> tuple:
    """What makes a client's turn the same as a stored one (arguments compared as JSON, not
    text: clients re-serialise them)."""
    calls = []
    for call in tool_calls or []:
        try:
            arguments = json.dumps(json.loads(call["function"]["arguments"]), sort_keys=True)
        except (ValueError, TypeError):
            arguments = call["function"]["arguments"]
        calls.append((call["function"]["name"], arguments))
    return (role, content, tuple(calls), tool_call_id)


def _key_of(turn: dict[str, Any]) -> tuple:
    return _turn_key(
        turn["role"], turn["content"], turn.get("tool_calls"), turn.get("tool_call_id")
    )


def _active_path(conversation: Any) -> list[tuple]:
    """The conversation as a client sees it: each user or tool turn and its latest answer."""
    latest_answer: dict[str, Any] = {}
    for m in conversation.messages:
        if m.role == "assistant" and m.finish_reason is not None:
            latest_answer[m.reply_to_id] = m
    path = []
    for m in conversation.messages:
        if m.role in ("user", "tool"):
            path.append(_turn_key(m.role, m.content, None, m.tool_call_id))
            if m.id in latest_answer:
                answer = latest_answer[m.id]
                path.append(_turn_key("assistant", answer.content, answer.tool_calls, None))
    return path


def _host_name(host_header: str) -> str:
    """The name in a Host header, without the port ("[::1]:8321" -> "::1")."""
    if host_header.startswith("["):
        return host_header[1:].split("]", 1)[0]
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


def foreign_request(headers: Any, scheme: str, loopback_bind: bool) -> str | None:
    """Why a request must be refused as coming from another web site, or None.

    A page on any site can make the browser send requests to 127.0.0.1 (a form POST needs no
    CORS approval) and, by rebinding its own DNS name to 127.0.0.1, read the answers. Browsers
    name the page's origin in `Origin` (and `Sec-Fetch-Site`); a rebinding page still sends
    its own name in `Host`. Clients that are not browsers (the openai SDK, curl, the TUI) send
    neither Origin nor a foreign Host, and whetstone's own pages are same-origin."""
    host = headers.get("host", "")
    if loopback_bind and not is_loopback(_host_name(host).lower()):
        return (
            f"Host {host!r} is not this server: on a loopback bind it answers only to "
            "127.0.0.1, localhost or [::1] (a foreign name is how DNS rebinding reaches it)"
        )
    origin = headers.get("origin")
    if origin is not None and origin != f"{scheme}://{host}":
        return f"cross-origin request from {origin!r} refused: whetstone allows no other origin"
    if headers.get("sec-fetch-site") == "cross-site":
        return "cross-site request refused: whetstone allows no other origin"
    return None


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def _running_run(store: Store) -> dict[str, Any] | None:
    run = store.latest_run(status="running")
    if run is None:
        return None
    return {"id": run.id, "profile": run.profile, "trigger": run.trigger, "progress": run.progress}


REPORT_MD = "report.md"
REPORT_HTML = "report.html"


def _report_file(path: Path) -> bool:
    """Whether a candidate's report is a file whetstone wrote there: the evaluation writes
    regular files, so a symlink (to /etc/passwd, say) is never served."""
    return path.is_file() and not path.is_symlink()


def _find_candidate(registry: Registry, candidate_id: str) -> Candidate:
    """The candidate folder `candidate_id`: 400 for a malformed id, 404 for an unknown one."""
    try:
        registry.validate_id(candidate_id)
        candidate = registry.get(candidate_id)
    except CandidateNotFound:
        raise ApiError(404, f"unknown candidate {candidate_id!r}: no such folder") from None
    except (RegistryError, ValueError) as exc:
        raise ApiError(400, str(exc), param="id") from None
    if not candidate.path.is_dir() or candidate.path.is_symlink():
        # What `candidates` lists: plain folders only.
        raise ApiError(404, f"unknown candidate {candidate_id!r}: not a candidate folder")
    return candidate


def _reap(process: Any) -> None:
    """Wait for a child in the background so its exit leaves no zombie."""
    threading.Thread(target=process.wait, name=f"reap-{process.pid}", daemon=True).start()


def _last_promotion(store: Store) -> dict[str, Any] | None:
    found = store.list_promotions(limit=1)
    if not found:
        return None
    p = found[0]
    return {
        "action": p.action,
        "candidate_id": p.candidate_id,
        "previous_id": p.previous_id,
        "reason": p.reason,
        "created_at": p.created_at.isoformat(),
    }


# ------------------------------------------------------------------------------ the app


class Service:
    """What the handlers share: settings, store, registry, the model worker."""

    def __init__(self, settings: Settings, store: Store, worker: Worker, registry: Registry):
        self.settings = settings
        self.store = store
        self.worker = worker
        self.engine = worker.engine
        self.registry = registry
        self.started_at = datetime.now(UTC)
        self.served = 0
        self.swap_lock = asyncio.Lock()
        self.last_swap_error: str | None = None
        self.refused_target: str | None = None

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
        system, turns = _turns(req.messages)
        conversation = None
        if req.regenerate:
            earlier, new = turns, []
        else:
            # The new turns: what follows the client's last assistant turn.
            last = max((i for i, t in enumerate(turns) if t["role"] == "assistant"), default=-1)
            if turns[-1]["role"] == "user":
                last = max(last, len(turns) - 2)
            earlier, new = turns[: last + 1], turns[last + 1 :]
        wanted = [_key_of(t) for t in earlier]
        if req.conversation_id is not None:
            conversation = self.store.get_conversation(req.conversation_id)
        elif wanted:  # a first message continues nothing: skip the scan
            for summary in self.store.list_conversations(limit=RECENT_CONVERSATIONS):
                candidate = self.store.get_conversation(summary.id)
                if candidate.system_prompt != system:
                    continue
                path = _active_path(candidate)
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


def create_app(service: Service) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        watcher = asyncio.create_task(service.watch_current())
        yield
        watcher.cancel()
        # Here, not after serve() returns: uvicorn re-raises SIGTERM once it has shut down.
        _forget_address(service.settings.paths.server_file)

    app = FastAPI(title="whetstone", lifespan=lifespan)
    token = service.settings.bearer_token()
    loopback_bind = is_loopback(service.settings.server.host)

    @app.middleware("http")
    async def require_token(request: Request, call_next: Any) -> Any:
        given = request.headers.get("authorization", "")
        authorized = secrets.compare_digest(given.encode(), f"Bearer {token}".encode())
        if token and request.url.path != "/health" and not authorized:
            return JSONResponse(
                _error_body("missing or wrong bearer token (see <home>/token)", 401), 401
            )
        return await call_next(request)

    # Registered after require_token, so it runs first: a foreign page learns nothing.
    max_body = service.settings.server.max_request_bytes

    @app.middleware("http")
    async def bounded_body(request: Request, call_next: Any) -> Any:
        declared = request.headers.get("content-length")
        if declared is None and "transfer-encoding" in request.headers:
            return JSONResponse(
                _error_body("send the body with a Content-Length (no chunked uploads)", 411),
                411,
            )
        if declared is not None and (not declared.isdigit() or int(declared) > max_body):
            return JSONResponse(
                _error_body(
                    f"the request body is {declared} bytes; at most {max_body} are accepted "
                    "(server.max_request_bytes)",
                    413,
                ),
                413,
            )
        return await call_next(request)

    @app.middleware("http")
    async def same_origin_only(request: Request, call_next: Any) -> Any:
        problem = foreign_request(request.headers, request.url.scheme, loopback_bind)
        if problem is not None:
            log.warning("refused %s %s: %s", request.method, request.url.path, problem)
            return JSONResponse(_error_body(problem, 403), 403)
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(
            _error_body(exc.message, exc.status, exc.param, exc.code),
            exc.status,
            headers=exc.headers,
        )

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        params = []
        for err in exc.errors():
            parts = [str(p) for p in err["loc"] if p != "body"]
            # Union members add their type names to the path (tool_choice.literal[...]).
            parts = [p for p in parts if not ("[" in p or p in ("str", "list[str]", "int"))]
            loc = ".".join(parts)
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "json_invalid":
                problems.append(f"malformed JSON: {err.get('ctx', {}).get('error', err['msg'])}")
            elif not loc and err["type"] in ("model_attributes_type", "dict_type"):
                problems.append("the request body must be a JSON object")
            elif err["type"] == "missing":
                problems.append(f"{loc}: required")
            elif err["type"] == "extra_forbidden":
                problems.append(f"unknown parameter {loc!r}")
            else:
                problems.append(f"{loc}: {msg}" if loc else msg)
            if not loc and msg.split(" ", 1)[0].isidentifier():
                loc = msg.split(" ", 1)[0]  # a rule across fields names its field first
            if loc:
                params.append(loc)
        param = params[0] if params else None
        return JSONResponse(_error_body("; ".join(dict.fromkeys(problems)), 400, param), 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Unknown routes and wrong methods: OpenAI's error shape, not FastAPI's {"detail"}.
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return JSONResponse(
            _error_body(message, exc.status_code), exc.status_code, headers=exc.headers
        )

    @app.exception_handler(OperationalError)
    async def database_busy(request: Request, exc: OperationalError) -> JSONResponse:
        if "locked" not in str(exc.orig) and "busy" not in str(exc.orig):
            raise exc
        # Another process holds a write transaction past the busy timeout: try again soon.
        return JSONResponse(
            _error_body("the database is busy (another process is writing); try again", 503),
            503,
            headers={"Retry-After": "2"},
        )

    @app.exception_handler(StoreError)
    async def store_error(request: Request, exc: StoreError) -> JSONResponse:
        status = 404 if isinstance(exc, NotFound) else 410 if isinstance(exc, Gone) else 400
        if not isinstance(exc, NotFound | Gone | InvalidInput):
            status = 500
        return JSONResponse(_error_body(str(exc), status), status)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "adapter_id": service.engine.adapter_id}

    def model_cards() -> list[dict[str, Any]]:
        """What a request may name; each is an alias of what serves now (base + current
        adapter): `whetstone`, the base model's name, and `whetstone/<adapter id>`."""
        engine = service.engine
        adapter = engine.adapter_id
        cards = [
            _model_card(service, "whetstone", adapter),
            _model_card(service, engine.base_model_name, adapter),
        ]
        if adapter:
            cards.append(_model_card(service, f"whetstone/{adapter}", adapter))
        return cards

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": model_cards()}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        for card in model_cards():
            if card["id"] == model_id:
                return card
        _check_model(service, model_id)  # says why (404)
        raise ApiError(404, f"model {model_id!r} does not exist here", param="model")

    @app.get("/v1/status")
    async def status() -> dict[str, Any]:
        from production import gpu_memory

        engine = service.engine
        return {
            "run_state": "running",
            "base_model": engine.base_model_name,
            "backend": engine.backend,
            "decode": engine.decode,
            "device": engine.device,
            "chat_format": engine.chat_format,
            "adapter_id": engine.adapter_id,
            "adapter_loaded_at": engine.adapter_loaded_at.isoformat(),
            "last_swap_error": service.last_swap_error,
            "queue_waiting": service.worker.waiting,
            "busy": service.worker.busy,
            "requests_served": service.served,
            "started_at": service.started_at.isoformat(),
            "uptime_s": round((datetime.now(UTC) - service.started_at).total_seconds(), 1),
            "context_window": engine.context_window,
            "gpu_memory": gpu_memory.snapshot(
                engine.device, service.settings.devices.memory_limit_gb
            ),
            # The supervising daemon's run/daemon.json (schedule, device plan, running job,
            # recent errors); null when this worker runs alone (`whetstone serve`).
            "daemon": read_state(service.settings),
            "running_run": _running_run(service.store),
            "last_promotion": _last_promotion(service.store),
            # The training recipe the nightly run uses and the search's progress.
            "recipe": await asyncio.to_thread(experiments.summary, service.settings),
        }

    @app.post("/admin/reload")
    async def reload() -> dict[str, Any]:
        return await service.sync_adapter()

    # ----------------------------------------------------- candidates and training

    @app.get("/v1/candidates")
    async def candidates() -> dict[str, Any]:
        rows = promotion.candidate_rows(service.store, service.registry)
        return {"data": rows[::-1]}  # newest first

    @app.get("/v1/candidates/{candidate_id}")
    async def candidate(candidate_id: str) -> dict[str, Any]:
        found = _find_candidate(service.registry, candidate_id)
        md, page = found.path / REPORT_MD, found.path / REPORT_HTML
        try:
            markdown = md.read_text(encoding="utf-8") if _report_file(md) else None
        except (OSError, UnicodeDecodeError):
            markdown = None
        has_page = _report_file(page)
        return promotion.candidate_row(service.store, found) | {
            "report_markdown": markdown,
            "report_html_path": str(page.absolute()) if has_page else None,
            "report_html_url": f"/v1/candidates/{candidate_id}/{REPORT_HTML}" if has_page else None,
        }

    @app.get("/v1/candidates/{candidate_id}/report.html")
    async def candidate_report(candidate_id: str) -> FileResponse:
        page = _find_candidate(service.registry, candidate_id).path / REPORT_HTML
        if not _report_file(page):
            raise ApiError(
                404,
                f"candidate {candidate_id} has no report yet: run `whetstone eval {candidate_id}`",
            )
        return FileResponse(page, media_type="text/html")

    async def serve_new_current(result: Any) -> dict[str, Any]:
        """After a registry swap: serve it (an adapter the engine refuses: 409, said by it)."""
        await service.sync_adapter()
        return {
            "current": result.new_current,
            "previous": result.previous,
            "serving": service.engine.adapter_id,
        }

    @app.post("/v1/candidates/{candidate_id}/promote")
    async def promote(candidate_id: str, body: PromoteRequest | None = None) -> dict[str, Any]:
        force = body.force if body is not None else False
        from production.engine import AdapterLoadError

        found = _find_candidate(service.registry, candidate_id)
        serving = service.engine.adapter_id
        preloaded = False

        def load_first() -> None:
            # The worker loads the adapter before `current` moves: one it cannot load is
            # refused while nothing has changed (no swap, no audit row).
            service.registry.validate(candidate_id, base_model=service.settings.model.base_model)
            nonlocal preloaded
            if candidate_id not in service.engine.loaded:
                service.worker.call(lambda e: e.load_adapter(candidate_id, found.path)).result()
                preloaded = True

        def drop_preloaded() -> None:
            if preloaded and service.engine.adapter_id != candidate_id:
                service.worker.call(lambda e: e.unload_adapter(candidate_id))

        try:
            # In a thread: the registry takes its file lock and checks the weights.
            result = await asyncio.to_thread(
                promotion.promote,
                service.settings,
                service.store,
                service.registry,
                candidate_id,
                force=force,
                actor="api",
                before_swap=load_first,
            )
        except AdapterLoadError as exc:
            raise ApiError(
                409, f"{exc}; nothing changed, still serving {serving or 'the base model'}"
            ) from None
        except promotion.PromotionRefused as exc:
            raise ApiError(409, str(exc)) from None
        except CandidateNotFound as exc:
            drop_preloaded()
            raise ApiError(404, str(exc)) from None
        except (RegistryError, ValueError) as exc:
            drop_preloaded()
            raise ApiError(400, str(exc)) from None
        return await serve_new_current(result)

    @app.post("/v1/rollback")
    async def rollback() -> dict[str, Any]:
        try:
            result = await asyncio.to_thread(
                promotion.rollback, service.settings, service.store, service.registry, actor="api"
            )
        except RegistryError as exc:
            raise ApiError(409, str(exc)) from None
        return await serve_new_current(result)

    @app.post("/v1/train", status_code=202)
    async def train(body: TrainRequest | None = None) -> dict[str, Any]:
        body = body or TrainRequest()
        try:
            # In a thread: starting the job asks nvidia-smi for the device plan.
            request = await asyncio.to_thread(
                jobs.request_training,
                service.settings,
                service.store,
                body.profile,
                force=body.force,
                promote=body.promote,
            )
        except ConfigError as exc:
            raise ApiError(400, str(exc), param="profile") from None
        except jobs.JobBusy as exc:
            raise ApiError(409, str(exc)) from None
        if request.process is not None:
            _reap(request.process)
        return {
            "run_id": request.run_id,
            "profile": request.profile,
            "queued_with_daemon": request.queued_with_daemon,
            "log": str(request.log),
        }

    @app.post("/v1/feedback")
    async def feedback(body: FeedbackRequest) -> dict[str, Any]:
        fb = await asyncio.to_thread(
            service.store.add_feedback,
            body.message_id,
            rating=body.rating,
            correction=body.correction,
            comment=body.comment,
        )
        return {
            "id": fb.id,
            "message_id": fb.message_id,
            "rating": fb.rating,
            "correction": fb.correction,
            "comment": fb.comment,
            "created_at": fb.created_at.isoformat(),
        }

    @app.get("/v1/trend")
    async def trend(weeks: int = 4) -> dict[str, Any]:
        """`whetstone trend --json`, plus its text table (the TUI's status screen shows it)."""
        from data import trend as trends

        if not 1 <= weeks <= 520:
            raise ApiError(400, f"weeks must be 1..520; got {weeks}", param="weeks")
        found = await asyncio.to_thread(trends.trend, service.store, weeks)
        return found.as_dict() | {"weeks": weeks, "text": trends.text(found)}

    @app.get("/v1/conversations")
    async def conversations(limit: int = 50, offset: int = 0) -> dict[str, Any]:
        if not 1 <= limit <= 500:
            raise ApiError(400, f"limit must be 1..500; got {limit}", param="limit")
        if not 0 <= offset < 2**63:  # SQLite's integers are 64-bit
            raise ApiError(400, f"offset must be 0..2^63-1; got {offset}", param="offset")
        rows = await asyncio.to_thread(service.store.list_conversations, limit, offset)
        return {"data": [_conversation_summary(c) for c in rows]}

    @app.get("/v1/conversations/{conversation_id}")
    async def conversation(conversation_id: str) -> dict[str, Any]:
        conv = await asyncio.to_thread(service.store.get_conversation, conversation_id)
        return _conversation_summary(conv) | {"messages": [_message_dict(m) for m in conv.messages]}

    @app.patch("/v1/conversations/{conversation_id}")
    async def patch_conversation(conversation_id: str, body: ConversationPatch) -> dict[str, Any]:
        fields = body.model_dump(exclude_unset=True)
        if "title" in fields:
            service.store.rename_conversation(conversation_id, fields.pop("title"))
        if fields:
            service.store.update_conversation(conversation_id, **fields)
        return _conversation_summary(service.store.get_conversation(conversation_id))

    @app.delete("/v1/conversations/{conversation_id}")
    async def forget(conversation_id: str) -> dict[str, Any]:
        await asyncio.to_thread(service.store.forget_conversation, conversation_id)
        return {"id": conversation_id, "forgotten": True}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request) -> Any:
        return await _chat(service, req, request)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Any:
        return await _complete(service, req, request)

    app.openapi = lambda: _documented_schema(app)  # type: ignore[method-assign]
    return app


_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": "string"},
            },
        }
    },
}


# Statuses the middleware and the handlers send on routes they do not declare themselves.
_SENT_EVERYWHERE = {"503": "Busy: the database is locked or the queue is full (Retry-After)"}
_SENT_BY_MIDDLEWARE = {
    "400": "Invalid body or parameter",
    "401": "Missing or wrong bearer token (non-loopback binds)",
    "403": "Cross-origin or foreign-Host request",
    "411": "Chunked body without Content-Length",
    "413": "Body larger than server.max_request_bytes",
}


def _documented_schema(app: FastAPI) -> dict[str, Any]:
    """FastAPI's OpenAPI schema with the errors this server sends: a bad body or parameter is
    a 400 with an OpenAI-style error object (the handler above), never FastAPI's 422."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    components["Error"] = _ERROR_SCHEMA
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            responses = operation.get("responses", {})
            if responses.pop("422", None) is not None:
                responses["400"] = {"description": "Invalid body or parameter"} | error
            sent = dict(_SENT_EVERYWHERE)
            if path != "/health":
                sent |= _SENT_BY_MIDDLEWARE
            if "{" in path or method != "get":  # an id in the path or the body
                sent |= {"404": "No such id", "410": "The conversation was forgotten"}
            if method in ("post", "patch", "delete"):
                sent |= {"409": "Conflicts with the current state (busy, refused promotion)"}
            for status, description in sent.items():
                responses.setdefault(status, {"description": description} | error)
    # stream: true answers with server-sent events (OpenAI's streaming format).
    for path in ("/v1/chat/completions", "/v1/completions"):
        ok = schema["paths"][path]["post"]["responses"]["200"]
        ok.setdefault("content", {})["text/event-stream"] = {"schema": {"type": "string"}}
    app.openapi_schema = schema
    return schema


def _conversation_summary(c: Any) -> dict[str, Any]:
    return {
        "id": c.id,
        "title": c.title,
        "system_prompt": c.system_prompt,
        "reasoning_effort": c.reasoning_effort,
        "created_at": c.created_at.isoformat(),
        "updated_at": c.updated_at.isoformat(),
        "message_count": getattr(c, "message_count", None),
    }


def _message_dict(m: Any) -> dict[str, Any]:
    fb = getattr(m, "current_feedback", None)
    return {
        "id": m.id,
        "role": m.role,
        "content": m.content,
        "reasoning": m.reasoning,
        "reply_to_id": m.reply_to_id,
        "adapter_id": m.adapter_id,
        "finish_reason": m.finish_reason,
        "completion_tokens": m.completion_tokens,
        "latency_ms": m.latency_ms,
        "created_at": m.created_at.isoformat(),
        "feedback": None
        if fb is None
        else {"rating": fb.rating, "correction": fb.correction, "comment": fb.comment},
    }


def _served_model(engine: Any) -> str:
    """The model id that answers now: the current adapter, or the base model."""
    return f"whetstone/{engine.adapter_id}" if engine.adapter_id else engine.base_model_name


def _fingerprint(adapter_id: str | None) -> str:
    return f"whetstone-{adapter_id or 'base'}"


def _check_model(service: Service, name: str | None) -> None:
    """A request names what serves (or an alias of it); anything else is refused, 404."""
    engine = service.engine
    if name is None or name in ("whetstone", engine.base_model_name, _served_model(engine)):
        return
    if engine.adapter_id and name == engine.adapter_id:
        return
    adapter = name.removeprefix("whetstone/")
    known = service.registry.path(adapter).is_dir() if _safe_id(service, adapter) else False
    if known:
        raise ApiError(
            404,
            f"model {name!r} is a candidate but does not serve now ({_served_model(engine)} "
            f"does): promote it to chat with it",
            param="model",
            code="model_not_found",
        )
    names = dict.fromkeys(["whetstone", engine.base_model_name, _served_model(engine)])
    raise ApiError(
        404,
        f"model {name!r} does not exist here: use one of {', '.join(map(repr, names))}, each "
        "an alias of what serves now (GET /v1/models)",
        param="model",
        code="model_not_found",
    )


def _safe_id(service: Service, candidate_id: str) -> bool:
    try:
        service.registry.validate_id(candidate_id)
    except (RegistryError, ValueError):
        return False
    return True


def _model_card(service: Service, model_id: str, adapter_id: str | None) -> dict[str, Any]:
    card = {
        "id": model_id,
        "object": "model",
        "created": int(service.started_at.timestamp()),
        "owned_by": "whetstone",
        "adapter_id": adapter_id,
    }
    return card | ({"current": True} if adapter_id else {})


def _sampling(
    service: Service,
    req: Any,
    max_tokens: int,
    *,
    grammar: Any = None,
    logprobs: int | None = None,
    **more: Any,
) -> Any:
    """The engine's Sampling for a chat or completions request (`more`: tools, raw)."""
    from production.engine import Sampling
    from production.steering import SteeringSpec

    bias = []
    for token, value in (req.logit_bias or {}).items():
        if int(token) >= service.engine.vocab_size:
            raise ApiError(
                400,
                f"logit_bias: token {token} is past the vocabulary ({service.engine.vocab_size})",
                param="logit_bias",
            )
        bias.append((int(token), float(value)))
    steering = SteeringSpec(
        logit_bias=tuple(bias),
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        logprobs=logprobs,
        grammar=grammar,
    )
    return Sampling(
        req.temperature,
        req.top_p,
        req.top_k,
        max_tokens,
        req.seed,
        stop=req.stop_strings(),
        steering=steering,
        **more,
    )


def _answer_grammar(
    engine: Any, req: ChatRequest, tools: list[dict[str, Any]] | None, max_tokens: int
) -> Any:
    """What the answer must match: the tools' call format, or the response_format (None:
    free text). Harmony models may think first, on at most half of max_tokens."""
    from production import tool_calls
    from production.steering import Grammar, schema_text

    fmt = tool_calls.tool_format(engine.chat_format)
    if tools:
        choice = req.tool_choice or "auto"
        if not isinstance(choice, str):
            choice = choice.model_dump()
        parallel = req.parallel_tool_calls is not False
        return tool_calls.structural_tag(fmt, tools, choice, parallel, max_tokens // 2)
    rf = req.response_format
    if rf is None or rf.type == "text":
        return None
    schema = rf.json_schema.schema_ if rf.type == "json_schema" else None
    if fmt == "harmony":
        return tool_calls.harmony_json(schema, max_tokens // 2)
    if schema is None:  # json_object, or json_schema without a schema: any JSON object
        return Grammar("json_object")
    return Grammar("json_schema", schema_text(schema), bool(rf.json_schema.strict))


async def _chat(service: Service, req: ChatRequest, request: Request) -> Any:
    from production import tool_calls
    from production.steering import GrammarError

    engine = service.engine
    _check_model(service, req.model)
    system, turns = _turns(req.messages)
    prompt_messages = ([{"role": "system", "content": system}] if system else []) + turns
    window = engine.context_window
    chars = sum(len(m["content"]) for m in prompt_messages)
    most = window * await asyncio.to_thread(engine.longest_token_chars)
    if chars > most:
        raise ApiError(
            400,
            f"the prompt is {chars} characters; no more than {most} fit in the context window "
            f"of {window} tokens (model.max_seq_length): shorten the conversation",
            param="messages",
        )
    tools = None
    if req.tools and req.tool_choice != "none":
        tools = [t.model_dump(exclude_none=True) for t in req.tools]
    fmt = tool_calls.tool_format(engine.chat_format)
    template_messages, template_tools = tool_calls.template_messages(
        prompt_messages, tools, fmt, engine.tokenizer
    )

    def render(effort: str | None) -> list[int]:
        return engine.prompt_ids(template_messages, effort, template_tools)

    # Off the event loop: tokenising a long prompt takes long enough to miss /health.
    prompt = await asyncio.to_thread(render, req.reasoning_effort)
    if len(prompt) >= window:
        raise ApiError(
            400,
            f"the prompt is {len(prompt)} tokens; the context window is {window} "
            "(model.max_seq_length): shorten the conversation",
            param="messages",
        )
    requested = req.max_completion_tokens or req.max_tokens
    if requested is not None and requested > window:
        raise ApiError(400, f"max_tokens must be between 1 and {window}", param="max_tokens")
    max_tokens = min(requested or 512, window - len(prompt))
    grammar_param = "tools" if tools else "response_format"
    try:  # compiled here so a bad schema is a 400; the worker then finds it cached
        grammar = _answer_grammar(engine, req, tools, max_tokens)
        if grammar is not None:
            await asyncio.to_thread(engine.grammars.compile, grammar)
    except (GrammarError, ValueError) as exc:  # xgrammar's tool-format builder: ValueError
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ApiError(
            400, f"{grammar_param}: the schema cannot be used: {reason}", param=grammar_param
        ) from None
    sampling = _sampling(
        service,
        req,
        max_tokens,
        grammar=grammar,
        logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        tools=fmt if tools else None,
    )
    if service.worker.waiting >= service.worker.max_queue:
        raise ApiError(503, "the model is busy: too many requests waiting", **{"Retry-After": "5"})

    conversation, asked_id = await asyncio.to_thread(service.thread, req)
    effort = req.reasoning_effort or conversation.reasoning_effort
    if effort != req.reasoning_effort:
        # The conversation's own effort (set by PATCH) is what the answer is made with.
        prompt = await asyncio.to_thread(render, effort)
        room = max(1, window - len(prompt))
        sampling = replace(sampling, max_tokens=min(sampling.max_tokens, room))
    recorded: dict[str, Any] = {}
    if effort:
        recorded["reasoning_effort"] = effort
    if req.tools:
        recorded["tools"] = [t.model_dump(exclude_none=True) for t in req.tools]
        recorded["tool_choice"] = (
            req.tool_choice.model_dump()
            if hasattr(req.tool_choice, "model_dump")
            else req.tool_choice
        )
    if req.response_format is not None:
        recorded["response_format"] = req.response_format.model_dump(
            by_alias=True, exclude_none=True
        )
    recorded |= req.recorded()
    return await _generate(
        service,
        request,
        prompt,
        sampling,
        conversation.id,
        asked_id,
        recorded,
        stream=req.stream,
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
        include_reasoning=req.include_reasoning,
        kind="chat",
    )


async def _complete(service: Service, req: CompletionRequest, request: Request) -> Any:
    """POST /v1/completions: the prompt as raw text (no chat template), logged like chat (a
    conversation holding the prompt as the user turn and the completion as the answer)."""

    engine = service.engine
    _check_model(service, req.model)
    text = req.text()
    window = engine.context_window
    if len(text) > window * await asyncio.to_thread(engine.longest_token_chars):
        raise ApiError(400, "the prompt does not fit in the context window", param="prompt")
    prompt = await asyncio.to_thread(
        lambda: engine.tokenizer(text, add_special_tokens=True)["input_ids"]
    )
    if not prompt or len(prompt) >= window:
        raise ApiError(
            400,
            f"the prompt is {len(prompt)} tokens; it must be 1..{window - 1} "
            "(model.max_seq_length)",
            param="prompt",
        )
    if req.max_tokens is not None and req.max_tokens > window:
        raise ApiError(400, f"max_tokens must be between 1 and {window}", param="max_tokens")
    # OpenAI's default for this endpoint is 16 tokens.
    max_tokens = min(req.max_tokens or 16, window - len(prompt))
    sampling = _sampling(service, req, max_tokens, logprobs=req.logprobs, raw=True)
    if service.worker.waiting >= service.worker.max_queue:
        raise ApiError(503, "the model is busy: too many requests waiting", **{"Retry-After": "5"})

    def start() -> tuple[str, str]:
        conversation = service.store.create_conversation(system_prompt=None, title=text[:60])
        user = service.store.add_message(conversation.id, "user", text)
        return conversation.id, user.id

    conversation_id, asked_id = await asyncio.to_thread(start)
    recorded: dict[str, Any] = {"endpoint": "completions"}
    recorded |= req.recorded()
    return await _generate(
        service,
        request,
        prompt,
        sampling,
        conversation_id,
        asked_id,
        recorded,
        stream=req.stream,
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
        include_reasoning=False,
        kind="text",
    )


async def _generate(
    service: Service,
    request: Request,
    prompt: list[int],
    sampling: Any,
    conversation_id: str,
    asked_id: str,
    recorded: dict[str, Any],
    *,
    stream: bool,
    include_usage: bool,
    include_reasoning: bool,
    kind: Literal["chat", "text"],
) -> Any:
    from production.worker import QueueFull

    engine = service.engine
    placeholder = await asyncio.to_thread(
        service.store.add_message,
        conversation_id,
        "assistant",
        "",
        reply_to_id=asked_id,
        adapter_id=engine.adapter_id,
        base_model=engine.base_model_name,
        generation=engine.resolved_settings(sampling) | recorded,
    )
    try:
        job = service.worker.submit(prompt, sampling)
    except QueueFull as exc:
        service.store.complete_message(placeholder.id, content="", finish_reason="error")
        raise ApiError(503, f"the model is busy: {exc}", **{"Retry-After": "5"}) from None
    recorder = _Recorder(service, placeholder.id, time.monotonic())
    headers = {
        "X-Whetstone-Message-Id": placeholder.id,
        "X-Whetstone-Conversation-Id": conversation_id,
    }
    base = {
        "id": placeholder.id,
        "created": int(time.time()),
        "model": _served_model(engine),
        "system_fingerprint": _fingerprint(engine.adapter_id),
    }
    extra = {"conversation_id": conversation_id}
    wants_logprobs = sampling.steering.logprobs is not None
    if stream:
        logprobs_of = (lambda o: _logprobs(engine, o.logprobs, kind)) if wants_logprobs else None
        chunks = _ChatChunks(include_reasoning) if kind == "chat" else _TextChunks()
        return StreamingResponse(
            _sse(job, recorder, base, extra, include_usage, chunks, logprobs_of),
            media_type="text/event-stream",
            headers=headers | {"Cache-Control": "no-cache"},
        )
    outcome = await _collect(job, recorder, request)
    base["system_fingerprint"] = _fingerprint(outcome.adapter_id)
    logprobs = _logprobs(engine, outcome.logprobs, kind) if wants_logprobs else None
    if kind == "text":
        choice = {
            "index": 0,
            "text": outcome.text,
            "logprobs": logprobs,
            "finish_reason": _finish(outcome),
        }
        body = base | {"object": "text_completion", "choices": [choice], "usage": _usage(outcome)}
        return JSONResponse(body | {"adapter_id": outcome.adapter_id} | extra, headers=headers)
    message: dict[str, Any] = {"role": "assistant", "content": outcome.text}
    if outcome.tool_calls:
        message["content"] = outcome.text or None
        message["tool_calls"] = [c.as_openai() for c in outcome.tool_calls]
    if include_reasoning:
        message["reasoning_content"] = outcome.reasoning
    choice = {
        "index": 0,
        "message": message,
        "logprobs": logprobs,
        "finish_reason": _finish(outcome),
    }
    body = (
        base
        | {
            "object": "chat.completion",
            "choices": [choice],
            "usage": _usage(outcome),
            "adapter_id": outcome.adapter_id,
        }
        | extra
    )
    return JSONResponse(body, headers=headers)


def _finish(outcome: Outcome) -> str:
    if outcome.finish_reason in ("length", "tool_calls"):
        return outcome.finish_reason
    return "stop"


def _usage(outcome: Outcome) -> dict[str, int]:
    return {
        "prompt_tokens": outcome.prompt_tokens,
        "completion_tokens": outcome.completion_tokens,
        "total_tokens": outcome.prompt_tokens + outcome.completion_tokens,
    }


def _token_text(engine: Any, token: int) -> str:
    return engine.tokenizer.decode([token])


def _logprobs(engine: Any, entries: list[Any] | None, kind: str) -> dict[str, Any] | None:
    """OpenAI's logprobs object: chat's {content: [...]} or completions' parallel lists."""
    if entries is None:
        return None
    if kind == "chat":
        content = []
        for e in entries:
            text = _token_text(engine, e.token)
            content.append(
                {
                    "token": text,
                    "logprob": e.logprob,
                    "bytes": list(text.encode()),
                    "top_logprobs": [
                        {
                            "token": (t := _token_text(engine, i)),
                            "logprob": v,
                            "bytes": list(t.encode()),
                        }
                        for i, v in e.top
                    ],
                }
            )
        return {"content": content, "refusal": None}
    tokens = [_token_text(engine, e.token) for e in entries]
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{_token_text(engine, i): v for i, v in e.top} for e in entries],
        "text_offset": offsets,
    }


class _Recorder:
    """Keeps the stored answer in step with the stream: flushes, finishes, or cuts off."""

    def __init__(self, service: Service, message_id: str, started: float) -> None:
        self.service = service
        self.message_id = message_id
        self.started = started
        self.text: list[str] = []
        self.reasoning: list[str] = []
        self.adapter_id: str | None = None
        self.last_flush = started
        self.finished = False

    def add(self, delta: Any) -> None:
        self.text.append(delta.text)
        self.reasoning.append(delta.reasoning)
        now = time.monotonic()
        if now - self.last_flush >= FLUSH_EVERY_S:
            self.last_flush = now
            self.service.store.save_partial(
                self.message_id, "".join(self.text), reasoning="".join(self.reasoning) or None
            )

    def done(self, outcome: Outcome) -> None:
        self.finished = True
        self.service.served += 1
        cut = outcome.finish_reason == "cancelled"
        calls = [c.as_openai() for c in outcome.tool_calls] or None
        self.service.store.complete_message(
            self.message_id,
            content=outcome.text,
            finish_reason="cut_off" if cut else outcome.finish_reason,
            reasoning=outcome.reasoning or None,
            adapter_id=outcome.adapter_id,
            prompt_tokens=outcome.prompt_tokens,
            completion_tokens=outcome.completion_tokens,
            latency_ms=round(outcome.seconds * 1000, 1),
            ttft_ms=None if outcome.ttft_s is None else round(outcome.ttft_s * 1000, 1),
            tool_calls=calls,
        )

    def cut_off(self, reason: str = "cut_off") -> None:
        """Client gone or generation failed: keep what was said so far."""
        if self.finished:
            return
        self.finished = True
        self.service.store.complete_message(
            self.message_id,
            content="".join(self.text),
            finish_reason=reason,
            reasoning="".join(self.reasoning) or None,
            adapter_id=self.adapter_id,
            latency_ms=round((time.monotonic() - self.started) * 1000, 1),
        )


async def _collect(job: Any, recorder: _Recorder, request: Request) -> Outcome:
    try:
        while True:
            try:
                kind, payload = await asyncio.wait_for(job.events.get(), timeout=0.5)
            except TimeoutError:
                if await request.is_disconnected():
                    job.cancel()
                    recorder.cut_off()
                    raise ApiError(499, "client disconnected") from None
                continue
            if kind == "start":
                recorder.adapter_id = payload
            elif kind == "delta":
                recorder.add(payload)
            elif kind == "done":
                recorder.done(payload)
                return payload
            elif kind == "error":
                recorder.cut_off("error")
                raise ApiError(500, f"generation failed: {payload}")
    finally:
        if not recorder.finished:
            job.cancel()
            recorder.cut_off()


def _data(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body)}\n\n"


class _ChatChunks:
    """chat.completion.chunk choices. A tool call is one delta carrying its whole arguments;
    log-probs come with the finishing chunk (the engine reports them per answer)."""

    object = "chat.completion.chunk"

    def __init__(self, include_reasoning: bool) -> None:
        self.include_reasoning = include_reasoning
        self.calls_sent = 0

    def opening(self) -> dict[str, Any] | None:
        return self.choice({"role": "assistant", "content": ""})

    @staticmethod
    def choice(delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> dict:
        return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    def delta(self, payload: Any) -> dict[str, Any] | None:
        delta: dict[str, Any] = {}
        if payload.text:
            delta["content"] = payload.text
        if self.include_reasoning and payload.reasoning:
            delta["reasoning_content"] = payload.reasoning
        if payload.tool_calls:
            delta["tool_calls"] = [
                c.as_openai(self.calls_sent + i) for i, c in enumerate(payload.tool_calls)
            ]
            self.calls_sent += len(payload.tool_calls)
        return self.choice(delta) if delta else None

    def finish(self, outcome: Outcome, logprobs: Any) -> dict[str, Any]:
        return self.choice({}, _finish(outcome), logprobs)


class _TextChunks:
    """text_completion choices (POST /v1/completions)."""

    object = "text_completion"

    def opening(self) -> dict[str, Any] | None:
        return None

    @staticmethod
    def choice(text: str, finish: str | None = None, logprobs: Any = None) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def delta(self, payload: Any) -> dict[str, Any] | None:
        return self.choice(payload.text) if payload.text else None

    def finish(self, outcome: Outcome, logprobs: Any) -> dict[str, Any]:
        return self.choice("", _finish(outcome), logprobs)


async def _sse(
    job: Any,
    recorder: _Recorder,
    base: dict[str, Any],
    extra: dict[str, Any],
    include_usage: bool,
    chunks: _ChatChunks | _TextChunks,
    logprobs_of: Any,
) -> AsyncIterator[str]:
    """OpenAI's server-sent events for one answer, chat or completions (`chunks`)."""

    def event(choices: list[dict[str, Any]], **more: Any) -> str:
        return _data(base | {"object": chunks.object, "choices": choices} | extra | more)

    try:
        opening = chunks.opening()
        if opening is not None:
            yield event([opening])
        while True:
            kind, payload = await job.events.get()
            if kind == "start":
                recorder.adapter_id = payload
                base["system_fingerprint"] = _fingerprint(payload)
            elif kind == "delta":
                recorder.add(payload)
                choice = chunks.delta(payload)
                if choice is not None:
                    yield event([choice])
            elif kind == "done":
                recorder.done(payload)
                logprobs = logprobs_of(payload) if logprobs_of else None
                yield event([chunks.finish(payload, logprobs)], adapter_id=payload.adapter_id)
                if include_usage:
                    yield event([], usage=_usage(payload))
                yield "data: [DONE]\n\n"
                return
            elif kind == "error":
                recorder.cut_off("error")
                yield _data(_error_body(f"generation failed: {payload}", 500))
                return
    finally:
        # Client gone (the task is cancelled or the generator closed): synchronous only.
        if not recorder.finished:
            job.cancel()
            recorder.cut_off()


# ---------------------------------------------------------------------------------- main


async def _serve(settings: Settings, service: Service) -> None:
    import uvicorn

    config = uvicorn.Config(
        create_app(service),
        host=settings.server.host,
        port=settings.server.port,
        log_level="warning",
        lifespan="on",
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if server.started:
        sock = server.servers[0].sockets[0]
        port = sock.getsockname()[1]
        host = settings.server.host
        url_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        if ":" in url_host:
            url_host = f"[{url_host}]"
        info = {
            "url": f"http://{url_host}:{port}",
            "host": host,
            "port": port,
            "pid": os.getpid(),
            "started_at": service.started_at.isoformat(),
        }
        _write_json_atomic(settings.paths.server_file, info)
        log.info("serving %s at %s", service.engine.base_model_name, info["url"])
    parent = os.environ.get(PARENT_ENV)
    watchdog = None
    if parent:
        die_with_parent(int(parent), on=False)
        watchdog = asyncio.create_task(_exit_with_parent(server, int(parent)))
    try:
        await task
    finally:
        if watchdog is not None:
            watchdog.cancel()
        _forget_address(settings.paths.server_file)


# Set by the daemon: its pid. A worker whose daemon died (kill -9, OOM) stops by itself
# instead of holding the port against the next daemon.
PARENT_ENV = "WHETSTONE_DAEMON_PID"


# A worker whose daemon died gives the streams in flight this long, then cuts them: nobody
# restarts it or waits for it, and a long answer kept it alive for minutes.
ORPHAN_GRACE_S = 5


async def _exit_with_parent(server: Any, parent: int) -> None:
    while os.getppid() == parent:
        await asyncio.sleep(1.0)
    log.warning("the daemon (pid %d) is gone; stopping", parent)
    server.config.timeout_graceful_shutdown = ORPHAN_GRACE_S
    server.should_exit = True


def die_with_parent(parent: int, *, on: bool = True) -> None:
    """While the model loads (before the watchdog above runs), the kernel ends this worker
    when the daemon dies (Linux prctl PR_SET_PDEATHSIG). Turned off once serving: SIGTERM
    then means uvicorn's unbounded graceful stop, and the watchdog bounds it instead."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM if on else 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return  # not Linux: the watchdog alone
    if on and os.getppid() != parent:  # died before the call: no signal will come
        raise SystemExit(f"the daemon (pid {parent}) is gone")


def _forget_address(server_file: Path) -> None:
    """Remove the recorded address if it is ours (a newer worker may have replaced it)."""
    try:
        if json.loads(server_file.read_text()).get("pid") == os.getpid():
            server_file.unlink()
    except (OSError, ValueError):
        pass


def build_service(settings: Settings, device: str) -> Service:
    from production.engine import Engine
    from production.worker import Worker

    settings.paths.create()
    store = Store(settings.db_url)
    cut = store.cut_off_unfinished()
    if cut:
        log.warning("marked %d answers cut off by an earlier stop as cut_off", cut)
    registry = Registry(settings.paths.candidates_dir)
    engine = Engine(settings, device)
    worker = Worker(engine, settings.server.max_queue)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the whetstone API worker.")
    parser.add_argument("--home", type=Path, default=None)
    parser.add_argument("--host", default=None)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE config override")
    args = parser.parse_args(argv)
    try:
        overrides: dict[str, Any] = parse_sets(args.set)
    except ConfigError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    overrides.setdefault("server", {})
    if args.host is not None:
        overrides["server"]["host"] = args.host
    if args.port is not None:
        overrides["server"]["port"] = args.port
    try:
        settings = load_settings(args.home, overrides)
        check_bind(settings)
    except ConfigError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from common.config import log_resolved

    log_resolved(settings)
    if settings.server.port != 0:
        probe = socket.socket()
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((settings.server.host, settings.server.port))
        except OSError as exc:
            sys.stderr.write(
                f"error: cannot listen on {settings.server.host}:"
                f"{settings.server.port}: {exc.strerror}\n"
            )
            return 2
        finally:
            probe.close()
    if os.environ.get(PARENT_ENV):
        die_with_parent(int(os.environ[PARENT_ENV]))
    device = pin_device(settings, "production")
    service = build_service(settings, device)
    try:
        asyncio.run(_serve(settings, service))
    except KeyboardInterrupt:
        pass
    finally:
        service.worker.stop()
        service.store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
