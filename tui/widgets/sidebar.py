"""The conversation list, newest first, and the bar that says when the daemon is away."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.binding import Binding
from textual.message import Message
from textual.widgets import Label, ListItem, ListView, Static


class ConversationItem(ListItem):
    def __init__(self, summary: dict[str, Any]) -> None:
        super().__init__(Label(Text(summary.get("title") or "(untitled)"), shrink=True))
        self.summary = summary

    @property
    def conversation_id(self) -> str:
        return self.summary["id"]


class ConversationList(ListView):
    BINDINGS = [
        Binding("n", "new", "New"),
        Binding("e", "rename", "Rename"),
        Binding("d,delete", "forget", "Delete", key_display="d"),
    ]

    class Action(Message):
        """new / rename / forget, for the conversation under the cursor (None for new)."""

        def __init__(self, action: str, conversation: dict[str, Any] | None) -> None:
            super().__init__()
            self.action, self.conversation = action, conversation

    def show(self, summaries: list[dict[str, Any]], active_id: str | None) -> None:
        self.clear()
        items = [ConversationItem(s) for s in summaries]
        self.extend(items)
        for index, item in enumerate(items):
            if item.conversation_id == active_id:
                self.index = index

    def _highlighted_summary(self) -> dict[str, Any] | None:
        item = self.highlighted_child
        return item.summary if isinstance(item, ConversationItem) else None

    def action_new(self) -> None:
        self.post_message(self.Action("new", None))

    def action_rename(self) -> None:
        if (summary := self._highlighted_summary()) is not None:
            self.post_message(self.Action("rename", summary))

    def action_forget(self) -> None:
        if (summary := self._highlighted_summary()) is not None:
            self.post_message(self.Action("forget", summary))


class ConnectionBar(Static):
    """Shown only while the daemon cannot be reached; says where it looked."""

    def on_mount(self) -> None:
        self.watch(self.app, "connection", self._show)

    def _show(self, connection: Any) -> None:
        self.set_class(not connection.up, "-down")
        if not connection.up:
            self.update(
                Text.assemble(
                    ("daemon not reachable ", "bold"),
                    f"at {connection.url}: {connection.detail}. Retrying every "
                    f"{connection.retry_s:g} s; start it with `whetstone up`.",
                )
            )
