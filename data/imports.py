"""History the person already has, imported into the store: ChatGPT's data export
(conversations.json, or the export's zip), Open WebUI's chat export (JSON) and chat files in
OpenAI's format (JSONL, one ``{"messages": [...]}`` per line, as fine-tuning data and
`whetstone export`'s sft.jsonl and tools.jsonl are written).

    conversations = parse(data)                 # the format is recognised, or named
    result = import_conversations(store, conversations)

Reading and writing are apart: `parse` reads the whole file and refuses it (ImportRefused,
naming the entry: "conversation 3 (id ..., 'title'): ...", "line 7: ...") before anything is
written; `import_conversations` writes every conversation in one transaction, so a file is
imported whole or not at all.

What is kept:

- Each conversation with its source, its id there (a JSONL line has none: the hash of its
  content stands in) and its own times (created, updated, each message's); importing the
  same file again adds nothing, and a conversation forgotten since is not brought back.
- A branching conversation (ChatGPT and Open WebUI keep every edit and regeneration as a
  tree): the branch the person saw last (ChatGPT's current_node, Open WebUI's currentId).
- Text only. ChatGPT's own tool steps (browsing, code, images: messages to or from its
  tools) are left out and the answer around them kept; so are messages hidden from the
  person and empty ones. Open WebUI's collapsible reasoning block becomes the answer's
  reasoning, kept apart from its text as a harmony model's analysis is.

What training uses (the answers were written by another model): an imported answer becomes
feedback, and so a training row, only where the person said something about it:

- rated: Open WebUI's thumbs up is a rating of 5, thumbs down 1, with its comment;
- kept: an answer the person regenerated and then stayed with (the branch seen last passes
  through it, and its question has other answers beside it), and every assistant turn of a
  JSONL line not marked ``"weight": 0`` (a file in OpenAI's fine-tuning format is answers
  someone chose to train on): a rating of 4, with a comment saying so.

Every other imported answer is context only: the conversation the person had, never a
target. Imported feedback is placed in the holdout, validation or training like any other
(data/splits.py) and is new feedback from the time of the import.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, tuple_

from data.errors import InvalidInput
from data.feedback_rules import place_new
from data.models import IMPORT_SOURCES, Conversation, Feedback, Message, new_id, utcnow
from data.store import Store
from data.validation import unencodable

log = logging.getLogger(__name__)

THUMBS_UP, THUMBS_DOWN, KEPT = 5, 1, 4
KEPT_AFTER_REGENERATING = "imported: kept after regenerating it in {source}"
KEPT_IN_FILE = "imported: an answer of a chat file (OpenAI format)"
SOURCE_NAMES = {"chatgpt": "ChatGPT", "openwebui": "Open WebUI", "jsonl": "a chat file"}
TITLE_CHARS = 60
EXTERNAL_ID_CHARS = 255  # conversations.external_id


class ImportRefused(InvalidInput):
    """A file that cannot be imported; the message names the entry and what is wrong with it.
    Nothing of the file is stored."""


@dataclass
class ImportedMessage:
    role: str  # user, assistant or tool
    content: str
    created_at: datetime | None = None
    reasoning: str | None = None
    model: str | None = None  # the model that wrote an assistant answer, where the export says
    tool_calls: list[dict[str, Any]] | None = None  # OpenAI's shape, arguments as JSON text
    tool_call_id: str | None = None
    rating: int | None = None  # feedback to record on an assistant answer (1-5)
    comment: str | None = None


@dataclass
class ImportedConversation:
    source: str
    external_id: str
    title: str | None
    system_prompt: str | None
    created_at: datetime | None
    updated_at: datetime | None
    messages: list[ImportedMessage] = field(default_factory=list)
    tools: list[dict[str, Any]] | None = None  # the functions offered (JSONL's "tools")


@dataclass
class ImportResult:
    source: str
    conversations: int = 0  # imported now
    messages: int = 0
    feedback: int = 0  # ratings recorded: rated and kept answers
    already_imported: int = 0  # conversations imported before (or twice in the file)

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "conversations": self.conversations,
            "messages": self.messages,
            "feedback": self.feedback,
            "already_imported": self.already_imported,
        }


# --- reading a file -----------------------------------------------------------------------


def parse(data: bytes, source: str | None = None) -> list[ImportedConversation]:
    """The conversations of an export file's bytes. `source` names the format (chatgpt,
    openwebui, jsonl); None recognises it. ImportRefused for anything else, naming what is
    wrong and where."""
    if source is not None and source not in IMPORT_SOURCES:
        raise ImportRefused(f"unknown format {source!r}: one of {', '.join(IMPORT_SOURCES)}")
    if data.startswith(b"PK\x03\x04"):
        data = _from_zip(data)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ImportRefused(f"the file is not UTF-8 text (byte {exc.start})") from None
    if source == "jsonl":
        return read_jsonl(text)
    try:
        document = json.loads(text)
    except ValueError as exc:
        if source is None and _looks_like_jsonl(text):
            return read_jsonl(text)
        raise ImportRefused(f"the file is not JSON: {exc}") from None
    found = source or detect(document)
    if found == "chatgpt":
        return read_chatgpt(document)
    if found == "openwebui":
        return read_openwebui(document)
    # {"messages": [...]} as one JSON document (or a list of them) rather than lines.
    entries = document if isinstance(document, list) else [document]
    return [_jsonl_conversation(e, f"conversation {i}") for i, e in enumerate(entries)]


def _from_zip(data: bytes) -> bytes:
    """conversations.json out of ChatGPT's export zip (it sits at the top of the archive)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = [n for n in archive.namelist() if n.rsplit("/", 1)[-1] == "conversations.json"]
            if not names:
                raise ImportRefused(
                    "the zip holds no conversations.json (ChatGPT's export has it at the top)"
                )
            return archive.read(min(names, key=len))
    except zipfile.BadZipFile as exc:
        raise ImportRefused(f"the zip cannot be read: {exc}") from None


def _looks_like_jsonl(text: str) -> bool:
    first = next((line for line in text.splitlines() if line.strip()), "")
    try:
        return isinstance(json.loads(first), dict)
    except ValueError:
        return False


def detect(document: Any) -> str:
    """Which export a parsed JSON document is: ChatGPT's (conversations with a `mapping`
    tree) or Open WebUI's (chats with `chat.history` or `chat.messages`)."""
    entries = document if isinstance(document, list) else [document]
    first = next((e for e in entries if isinstance(e, dict)), None)
    if first is None:
        if isinstance(document, list) and not document:
            raise ImportRefused("the file holds no conversations (an empty list)")
        raise ImportRefused(
            "the file is neither ChatGPT's conversations.json nor Open WebUI's chat export: "
            "expected a list of conversations"
        )
    if "mapping" in first:
        return "chatgpt"
    if isinstance(first.get("chat"), dict) or "history" in first:
        return "openwebui"
    if "messages" in first:
        return "jsonl"  # one {"messages": [...]} as a JSON document
    if "prompt" in first:
        raise ImportRefused(
            "the file holds prompt rows (preference rows, DPO or KTO, or completions), "
            "not conversations to import"
        )
    raise ImportRefused(
        "the file is neither ChatGPT's conversations.json (conversations with a 'mapping') "
        f"nor Open WebUI's chat export (chats with a 'chat'); its first entry has keys "
        f"{', '.join(sorted(map(str, first))[:8])}"
    )


def _when(value: Any, where: str) -> datetime | None:
    """A time as the exports write it: Unix seconds (ChatGPT: with a fraction), or
    milliseconds (Open WebUI's chat.timestamp); None where the export has none."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ImportRefused(f"{where}: a time must be a Unix timestamp; got {value!r}")
    try:
        seconds = value / 1000 if value > 1e11 else value
        return datetime.fromtimestamp(seconds, UTC)
    except (OverflowError, OSError, ValueError):
        raise ImportRefused(f"{where}: {str(value)[:40]!r} is not a time") from None


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ImportRefused(f"{where}: must be text; got {type(value).__name__}")
    try:
        unencodable("text", value)
    except InvalidInput as exc:
        raise ImportRefused(f"{where}: {str(exc).removeprefix('text ')}") from None
    return value


def _conversation_name(index: int, entry: dict[str, Any]) -> str:
    name = f"conversation {index}"
    ident = entry.get("id") or entry.get("conversation_id")
    if isinstance(ident, str):
        name += f" (id {ident}"
        title = entry.get("title")
        if isinstance(title, str) and title:
            name += f", {title[:40]!r}"
        name += ")"
    return name


def _entries(document: Any, what: str) -> list[dict[str, Any]]:
    entries = document if isinstance(document, list) else [document]
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ImportRefused(
                f"conversation {index}: must be a JSON object ({what}); got {type(entry).__name__}"
            )
    return entries


@dataclass
class _Node:
    """One node of an export's tree, as read: what the person saw, and the tree's links."""

    id: str
    parent: str | None
    children: list[str]
    message: ImportedMessage | None  # None: not shown (a tool step, hidden, empty)


def _branch(nodes: dict[str, _Node], current: str, where: str) -> list[_Node]:
    """The nodes from the root to `current`: the branch the person saw last."""
    branch, seen = [], set()
    node_id: str | None = current
    while node_id is not None:
        if node_id in seen:
            raise ImportRefused(f"{where}: the tree has a cycle through node {node_id}")
        seen.add(node_id)
        node = nodes.get(node_id)
        if node is None:
            raise ImportRefused(f"{where}: node {node_id} is named but not in the tree")
        branch.append(node)
        node_id = node.parent
    return branch[::-1]


def _turns(branch: list[_Node], nodes: dict[str, _Node], source: str) -> list[ImportedMessage]:
    """The branch's messages as turns: what was not shown left out, consecutive messages of
    one role joined (ChatGPT splits an answer around its tool steps), and the answer to a
    question the person had answered again (regenerated) marked kept unless they rated it.
    A rated answer beside the branch (regenerated away from, or another model's, in Open
    WebUI) comes too, as an earlier answer to the same question: the person's rating of it
    is feedback, and with the branch's answer it can make a preference pair."""
    turns: list[ImportedMessage] = []
    alternatives: set[int] = set()  # indexes of such answers: never joined with another
    on_branch = {node.id for node in branch}
    regenerated = False  # the question just asked has other answers beside this branch's
    for node in branch:
        message = node.message
        if message is None:
            continue
        joinable = turns and turns[-1].role == message.role and len(turns) - 1 not in alternatives
        if joinable:
            last = turns[-1]
            last.content = "\n\n".join(t for t in (last.content, message.content) if t)
            if message.reasoning:
                last.reasoning = "\n\n".join(t for t in (last.reasoning, message.reasoning) if t)
            last.rating = message.rating if message.rating is not None else last.rating
            last.comment = message.comment or last.comment
            last.model = message.model or last.model
        else:
            turns.append(message)
        if message.role == "user":
            regenerated = len(node.children) > 1
            for child in node.children:
                beside = nodes.get(child)
                if child in on_branch or beside is None or beside.message is None:
                    continue
                if beside.message.role == "assistant" and beside.message.rating is not None:
                    alternatives.add(len(turns))
                    turns.append(beside.message)
        elif regenerated and turns[-1].rating is None:
            turns[-1].rating = KEPT
            turns[-1].comment = KEPT_AFTER_REGENERATING.format(source=SOURCE_NAMES[source])
    return turns


def _finish(
    conversation: ImportedConversation, turns: list[ImportedMessage], where: str
) -> ImportedConversation:
    if len(conversation.external_id) > EXTERNAL_ID_CHARS:
        raise ImportRefused(f"{where}: its id is longer than {EXTERNAL_ID_CHARS} characters")
    if not turns:
        raise ImportRefused(f"{where}: no message to import on the branch seen last")
    times = [t.created_at for t in turns if t.created_at is not None]
    conversation.created_at = conversation.created_at or (min(times) if times else None)
    conversation.updated_at = max(
        [t for t in (conversation.updated_at, *times) if t is not None], default=None
    )
    if not conversation.title:
        first = next((t.content for t in turns if t.role == "user"), "")
        conversation.title = first[:TITLE_CHARS] or None
    conversation.messages = turns
    return conversation


# --- ChatGPT ------------------------------------------------------------------------------


def read_chatgpt(document: Any) -> list[ImportedConversation]:
    """ChatGPT's conversations.json: a list of conversations, each a `mapping` of nodes
    ({id, message, parent, children}) and the `current_node` the person saw last."""
    conversations = []
    for index, entry in enumerate(_entries(document, "a ChatGPT conversation")):
        where = _conversation_name(index, entry)
        conversations.append(_chatgpt_conversation(entry, where))
    return conversations


def _chatgpt_conversation(entry: dict[str, Any], where: str) -> ImportedConversation:
    ident = entry.get("id") or entry.get("conversation_id")
    if not isinstance(ident, str) or not ident:
        raise ImportRefused(f"{where}: no id (ChatGPT's conversations carry 'id')")
    mapping = entry.get("mapping")
    if not isinstance(mapping, dict) or not mapping:
        raise ImportRefused(f"{where}: 'mapping' must be the conversation's tree of nodes")
    current = entry.get("current_node")
    if not isinstance(current, str):
        raise ImportRefused(f"{where}: 'current_node' must name the node the person saw last")
    title = entry.get("title")
    conversation = ImportedConversation(
        source="chatgpt",
        external_id=ident,
        title=_text(title, f"{where}: title") if title is not None else None,
        system_prompt=None,
        created_at=_when(entry.get("create_time"), f"{where}: create_time"),
        updated_at=_when(entry.get("update_time"), f"{where}: update_time"),
    )
    nodes: dict[str, _Node] = {}
    for key, node in mapping.items():
        at = f"{where}: node {key}"
        if not isinstance(node, dict):
            raise ImportRefused(f"{at}: must be a JSON object")
        parent, children = node.get("parent"), node.get("children", [])
        if parent is not None and not isinstance(parent, str):
            raise ImportRefused(f"{at}: 'parent' must be a node id or null")
        if not isinstance(children, list) or not all(isinstance(c, str) for c in children):
            raise ImportRefused(f"{at}: 'children' must be a list of node ids")
        message = node.get("message")
        if message is not None and not isinstance(message, dict):
            raise ImportRefused(f"{at}: 'message' must be a JSON object or null")
        shown = _chatgpt_message(message, at, conversation) if message else None
        nodes[key] = _Node(key, parent, children, shown)
    return _finish(conversation, _turns(_branch(nodes, current, where), nodes, "chatgpt"), where)


def _chatgpt_message(
    message: dict[str, Any], where: str, conversation: ImportedConversation
) -> ImportedMessage | None:
    """A node's message as the person saw it, or None where it was not shown: ChatGPT's tool
    steps (a message to a tool, a tool's output), hidden messages, content that is no text."""
    author = message.get("author")
    if not isinstance(author, dict) or not isinstance(author.get("role"), str):
        raise ImportRefused(f"{where}: the message has no author.role")
    content = message.get("content")
    if not isinstance(content, dict) or not isinstance(content.get("content_type"), str):
        raise ImportRefused(f"{where}: the message has no content.content_type")
    role, kind = author["role"], content["content_type"]
    metadata = message.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise ImportRefused(f"{where}: 'metadata' must be a JSON object")
    if metadata.get("is_visually_hidden_from_conversation"):
        return None
    if role == "system" and kind == "user_editable_context":
        # The person's custom instructions: the context every answer was made in.
        parts = [content.get("user_profile"), content.get("user_instructions")]
        text = "\n\n".join(_text(p, f"{where}: content") for p in parts if p)
        conversation.system_prompt = text or conversation.system_prompt
        return None
    recipient = message.get("recipient", "all")
    if role not in ("user", "assistant") or recipient not in ("all", None):
        return None  # the system's and ChatGPT's own tool steps
    if kind not in ("text", "multimodal_text"):
        return None  # code for a tool, thoughts, browsing displays
    parts = content.get("parts")
    if not isinstance(parts, list):
        raise ImportRefused(f"{where}: content.parts must be a list")
    # multimodal_text: images and files are objects among the parts; their text is kept.
    text = "".join(_text(p, f"{where}: content.parts") for p in parts if isinstance(p, str))
    if not text.strip():
        return None
    model = metadata.get("model_slug")
    return ImportedMessage(
        role=role,
        content=text,
        created_at=_when(message.get("create_time"), f"{where}: create_time"),
        model=model if isinstance(model, str) else None,
    )


# --- Open WebUI ---------------------------------------------------------------------------

_DETAILS = re.compile(r'<details\s+type="(?P<kind>[^"]*)"[^>]*>(?P<body>.*?)</details>\s*', re.S)
_SUMMARY = re.compile(r"<summary>.*?</summary>\s*", re.S)


def _openwebui_text(content: str) -> tuple[str, str | None]:
    """An Open WebUI answer's text and its reasoning: the app writes a reasoning model's
    thinking (and its tool calls) into the answer as collapsible <details> blocks."""
    reasoning = []
    for block in _DETAILS.finditer(content):
        if block["kind"] == "reasoning":
            body = _SUMMARY.sub("", block["body"])
            lines = [line.removeprefix(">").removeprefix(" ") for line in body.splitlines()]
            reasoning.append("\n".join(lines).strip())
    text = _DETAILS.sub("", content).strip() if "<details" in content else content
    return text, "\n\n".join(r for r in reasoning if r) or None


def read_openwebui(document: Any) -> list[ImportedConversation]:
    """Open WebUI's chat export: a list of chats (or one), each {id, title, chat: {history:
    {messages: {id: {parentId, childrenIds, role, content, timestamp, model, annotation}},
    currentId}, messages: [...]}, created_at, updated_at}."""
    conversations = []
    for index, entry in enumerate(_entries(document, "an Open WebUI chat")):
        where = _conversation_name(index, entry)
        conversations.append(_openwebui_conversation(entry, where))
    return conversations


def _openwebui_conversation(entry: dict[str, Any], where: str) -> ImportedConversation:
    chat = entry.get("chat", entry)
    if not isinstance(chat, dict):
        raise ImportRefused(f"{where}: 'chat' must be a JSON object")
    title = entry.get("title") or chat.get("title")
    ident = entry.get("id") or chat.get("id")
    if not isinstance(ident, str) or not ident:
        # A chat exported without its id: its content identifies it.
        ident = "sha256:" + _digest(chat)
    params = chat.get("params") or {}
    system = chat.get("system") or (params.get("system") if isinstance(params, dict) else None)
    conversation = ImportedConversation(
        source="openwebui",
        external_id=ident,
        title=_text(title, f"{where}: title") if title else None,
        system_prompt=_text(system, f"{where}: system") if system else None,
        created_at=_when(entry.get("created_at", chat.get("timestamp")), f"{where}: created_at"),
        updated_at=_when(entry.get("updated_at"), f"{where}: updated_at"),
    )
    history = chat.get("history")
    if history is not None:
        if not isinstance(history, dict) or not isinstance(history.get("messages"), dict):
            raise ImportRefused(f"{where}: chat.history.messages must be a JSON object")
        current = history.get("currentId")
        if not isinstance(current, str):
            raise ImportRefused(f"{where}: chat.history.currentId must name the last message")
        nodes = {}
        for key, message in history["messages"].items():
            at = f"{where}: message {key}"
            if not isinstance(message, dict):
                raise ImportRefused(f"{at}: must be a JSON object")
            parent, children = message.get("parentId"), message.get("childrenIds", [])
            if parent is not None and not isinstance(parent, str):
                raise ImportRefused(f"{at}: 'parentId' must be a message id or null")
            if not isinstance(children, list) or not all(isinstance(c, str) for c in children):
                raise ImportRefused(f"{at}: 'childrenIds' must be a list of message ids")
            shown = _openwebui_message(message, at, conversation)
            nodes[key] = _Node(key, parent, children, shown)
        branch = _branch(nodes, current, where)
    else:
        nodes = {}
        messages = chat.get("messages")
        if not isinstance(messages, list):
            raise ImportRefused(f"{where}: the chat has neither history nor a messages list")
        branch = []
        for position, message in enumerate(messages):
            at = f"{where}: messages[{position}]"
            if not isinstance(message, dict):
                raise ImportRefused(f"{at}: must be a JSON object")
            shown = _openwebui_message(message, at, conversation)
            branch.append(_Node(str(position), None, [], shown))
    return _finish(conversation, _turns(branch, nodes, "openwebui"), where)


def _openwebui_message(
    message: dict[str, Any], where: str, conversation: ImportedConversation
) -> ImportedMessage | None:
    role = message.get("role")
    if role not in ("user", "assistant", "system"):
        raise ImportRefused(f"{where}: role must be user, assistant or system; got {role!r}")
    content = _text(message.get("content", ""), f"{where}: content")
    if role == "system":
        conversation.system_prompt = content or conversation.system_prompt
        return None
    reasoning = None
    if role == "assistant":
        content, reasoning = _openwebui_text(content)
    if not content.strip():
        return None
    rating, comment = None, None
    annotation = message.get("annotation")
    if role == "assistant" and annotation is not None:
        if not isinstance(annotation, dict):
            raise ImportRefused(f"{where}: 'annotation' must be a JSON object")
        thumbs = annotation.get("rating")
        if thumbs not in (None, 0, 1, -1) or isinstance(thumbs, bool):
            raise ImportRefused(
                f"{where}: annotation.rating must be 1 (thumbs up) or -1 (down); got {thumbs!r}"
            )
        if thumbs:
            rating = THUMBS_UP if thumbs == 1 else THUMBS_DOWN
            said = [annotation.get("reason"), annotation.get("comment")]
            comment = ": ".join(_text(s, f"{where}: annotation") for s in said if s) or None
    model = message.get("model")
    return ImportedMessage(
        role=role,
        content=content,
        reasoning=reasoning,
        created_at=_when(message.get("timestamp"), f"{where}: timestamp"),
        model=model if isinstance(model, str) else None,
        rating=rating,
        comment=comment,
    )


# --- JSONL --------------------------------------------------------------------------------

_LINE_KEYS = {"messages", "tools", "parallel_tool_calls"}
_MESSAGE_KEYS = {"role", "content", "name", "tool_calls", "tool_call_id", "weight"}


def _digest(value: Any) -> str:
    canonical = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def read_jsonl(text: str) -> list[ImportedConversation]:
    """One conversation per line: {"messages": [...], "tools"?: [...]} in OpenAI's chat
    format; an assistant turn with "weight": 0 is context only, the others are kept."""
    conversations = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"line {number}"
        try:
            entry = json.loads(line)
        except ValueError as exc:
            raise ImportRefused(f"{where}: not JSON: {exc}") from None
        conversations.append(_jsonl_conversation(entry, where))
    if not conversations:
        raise ImportRefused("the file holds no conversations (no line with messages)")
    return conversations


def _jsonl_conversation(entry: Any, where: str) -> ImportedConversation:
    if not isinstance(entry, dict) or "messages" not in entry:
        kinds = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise ImportRefused(
            f"{where}: expected an object with 'messages' (OpenAI's chat format); got {kinds}"
            " (preference rows, DPO or KTO, are not conversations to import)"
        )
    unknown = sorted(set(entry) - _LINE_KEYS)
    if unknown:
        raise ImportRefused(f"{where}: unknown key(s) {', '.join(unknown)}")
    messages = entry["messages"]
    if not isinstance(messages, list) or not messages:
        raise ImportRefused(f"{where}: 'messages' must be a non-empty list")
    tools = entry.get("tools")
    if tools is not None and not (
        isinstance(tools, list) and all(isinstance(t, dict) for t in tools)
    ):
        raise ImportRefused(f"{where}: 'tools' must be a list of function tools")
    conversation = ImportedConversation(
        source="jsonl",
        external_id="sha256:" + _digest(entry),
        title=None,
        system_prompt=None,
        created_at=None,
        updated_at=None,
        tools=tools or None,
    )
    turns: list[ImportedMessage] = []
    calls: set[str] = set()
    for position, message in enumerate(messages):
        at = f"{where}: messages[{position}]"
        turn = _jsonl_message(message, at, calls)
        if turn is None:  # a system message
            if position != 0:
                raise ImportRefused(f"{at}: a system message may only come first")
            conversation.system_prompt = _content(message.get("content"), at)
            continue
        turns.append(turn)
    return _finish(conversation, turns, where)


def _content(value: Any, where: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return _text(value, f"{where}: content")
    if isinstance(value, list):
        texts = []
        for index, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ImportRefused(
                    f"{where}: content[{index}] is {kind!r}: only text parts are imported"
                )
            texts.append(_text(part.get("text"), f"{where}: content[{index}].text"))
        return "".join(texts)
    raise ImportRefused(f"{where}: content must be text or a list of text parts")


def _jsonl_message(message: Any, where: str, calls: set[str]) -> ImportedMessage | None:
    if not isinstance(message, dict):
        raise ImportRefused(f"{where}: must be a JSON object")
    unknown = sorted(set(message) - _MESSAGE_KEYS)
    if unknown:
        raise ImportRefused(f"{where}: unknown key(s) {', '.join(unknown)}")
    role = message.get("role")
    if role in ("system", "developer"):
        return None
    if role not in ("user", "assistant", "tool"):
        raise ImportRefused(
            f"{where}: role must be system, developer, user, assistant or tool; got {role!r}"
        )
    if message.get("name") is not None and role != "tool":
        raise ImportRefused(f"{where}: 'name' belongs to tool messages, not {role}")
    content = _content(message.get("content"), where)
    turn = ImportedMessage(role=role, content=content)
    weight = message.get("weight")
    if weight is not None and (role != "assistant" or weight not in (0, 1)):
        raise ImportRefused(f"{where}: 'weight' is 0 or 1, on assistant messages only")
    if role == "assistant":
        turn.tool_calls = _tool_calls(message.get("tool_calls"), where, calls)
        if not content and not turn.tool_calls:
            raise ImportRefused(f"{where}: an assistant message needs content or tool_calls")
        if weight != 0:
            turn.rating, turn.comment = KEPT, KEPT_IN_FILE
    elif message.get("tool_calls") is not None:
        raise ImportRefused(f"{where}: tool_calls belong to assistant messages, not {role}")
    if role == "tool":
        call_id = message.get("tool_call_id")
        if call_id not in calls:
            raise ImportRefused(
                f"{where}: tool_call_id {call_id!r} answers no tool call of an earlier "
                "assistant message"
            )
        turn.tool_call_id = call_id
    elif message.get("tool_call_id") is not None:
        raise ImportRefused(f"{where}: tool_call_id belongs to tool messages, not {role}")
    if role == "user" and not content:
        raise ImportRefused(f"{where}: a user message needs content")
    return turn


def _tool_calls(value: Any, where: str, calls: set[str]) -> list[dict[str, Any]] | None:
    """Calls in OpenAI's shape, arguments as JSON text (TRL's rows, as `whetstone export`
    writes tools.jsonl, give them as an object)."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise ImportRefused(f"{where}: tool_calls must be a list")
    out = []
    for index, call in enumerate(value):
        at = f"{where}: tool_calls[{index}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ImportRefused(f"{at}: needs function.name")
        arguments = function.get("arguments", "{}")
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        try:
            json.loads(arguments)
        except ValueError:
            raise ImportRefused(f"{at}: function.arguments is not JSON") from None
        call_id = call.get("id")
        if call_id is None:
            # TRL's rows carry no call ids: the call is answered by the next tool turn.
            call_id = f"call_{index}_{_digest([where, function])[:12]}"
        if not isinstance(call_id, str):
            raise ImportRefused(f"{at}: id must be a string")
        calls.add(call_id)
        out.append(
            {
                "id": call_id,
                "type": "function",
                "function": {"name": function["name"], "arguments": arguments},
            }
        )
    return out or None


# --- writing ------------------------------------------------------------------------------


def import_conversations(
    store: Store,
    conversations: Iterable[ImportedConversation],
    *,
    progress: Callable[[int], None] | None = None,
) -> ImportResult:
    """Store the conversations not imported before, in one transaction (all or none), with
    their messages and the feedback their rated and kept answers carry."""
    conversations = list(conversations)
    source = conversations[0].source if conversations else "jsonl"
    result = ImportResult(source)
    now = utcnow()
    with store.session() as session:
        known = _imported_before(session, [(c.source, c.external_id) for c in conversations])
        rated: list[tuple[Message, int]] = []
        for done, conversation in enumerate(conversations):
            key = (conversation.source, conversation.external_id)
            if key in known:
                result.already_imported += 1
                continue
            known.add(key)
            result.messages += _write(session, conversation, now, rated)
            result.conversations += 1
            if progress is not None:
                progress(done + 1)
        session.flush()
        place_new(session, rated)
        for message, rating in rated:
            session.add(
                Feedback(
                    id=new_id("fb"),
                    message_id=message.id,
                    rating=rating,
                    comment=_comment_of(message),
                    is_current=True,
                    created_at=now,
                )
            )
        result.feedback = len(rated)
    log.info(
        "imported %d conversations (%d messages, %d ratings) from %s; %d imported before",
        result.conversations,
        result.messages,
        result.feedback,
        source,
        result.already_imported,
    )
    return result


def _imported_before(session: Any, keys: list[tuple[str, str]]) -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    for start in range(0, len(keys), 400):  # SQLite's bound-parameter limit
        chunk = keys[start : start + 400]
        found.update(
            session.execute(
                select(Conversation.source, Conversation.external_id).where(
                    tuple_(Conversation.source, Conversation.external_id).in_(chunk)
                )
            ).tuples()
        )
    return found


def _comment_of(message: Message) -> str | None:
    return (message.generation or {}).get("imported", {}).get("comment")


def _write(
    session: Any,
    imported: ImportedConversation,
    now: datetime,
    rated: list[tuple[Message, int]],
) -> int:
    started = imported.created_at or now
    conversation = Conversation(
        id=new_id("conv"),
        title=imported.title,
        system_prompt=imported.system_prompt,
        created_at=started,
        updated_at=imported.updated_at or started,
        source=imported.source,
        external_id=imported.external_id,
        imported_at=now,
    )
    session.add(conversation)
    asked: str | None = None  # the user or tool turn the next answer replies to
    at = started
    for position, turn in enumerate(imported.messages):
        at = turn.created_at or at  # a message without a time is as old as the one before
        message = Message(
            id=new_id("msg"),
            conversation_id=conversation.id,
            position=position,
            role=turn.role,
            content=turn.content,
            reasoning=turn.reasoning,
            created_at=at,
            completed_at=at,
            tool_calls=turn.tool_calls,
            tool_call_id=turn.tool_call_id,
        )
        if turn.role == "assistant":
            message.reply_to_id = asked
            message.finish_reason = "tool_calls" if turn.tool_calls else "stop"
            # adapter_id and base_model stay null: no model of this home wrote it.
            imported_from: dict[str, Any] = {"source": imported.source, "model": turn.model}
            if turn.comment:
                imported_from["comment"] = turn.comment
            message.generation = {"imported": imported_from}
            if imported.tools:
                message.generation["tools"] = imported.tools
            if turn.rating is not None:
                rated.append((message, turn.rating))
        else:
            asked = message.id
        session.add(message)
    return len(imported.messages)
