"""The conversation list, newest first, its search box, and the bar that says when the daemon
is away."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.binding import Binding
from textual.message import Message
from textual.widgets import Input, Label, ListItem, ListView, Static

# Characters of a snippet kept before its first match: the sidebar is narrow, and a match
# past its edge would be cut off by the ellipsis.
SNIPPET_LEAD = 6


class SearchBox(Input):
    """Filters the conversation list by the words typed (the screen asks the daemon);
    Esc clears it, back to the whole list; Down goes to the list."""

    BINDINGS = [
        Binding("escape", "clear", "Clear search", show=False),
        Binding("down", "to_list", "Results", show=False),
    ]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(placeholder="Search  (^f)", compact=True, **kwargs)

    def action_clear(self) -> None:
        self.value = ""
        self.action_to_list()

    def action_to_list(self) -> None:
        results = self.screen.query_one(ConversationList)
        results.focus()
        if results.index is None and results.children:
            results.index = 0


def snippet_text(summary: dict[str, Any]) -> Text:
    """A search result's snippet with the matched words in bold, starting near the first."""
    snippet = summary.get("snippet") or ""
    spans = [(int(a), int(b)) for a, b in summary.get("highlights") or []]
    cut = max(0, spans[0][0] - SNIPPET_LEAD) if spans else 0
    text = Text(("…" if cut else "") + snippet[cut:], style="dim")
    shift = 1 - cut if cut else 0
    for start, end in spans:
        if start >= cut:
            text.stylize("bold not dim", start + shift, end + shift)
    return text


class ConversationItem(ListItem):
    def __init__(self, summary: dict[str, Any]) -> None:
        labels = [Label(Text(summary.get("title") or "(untitled)"), shrink=True)]
        if summary.get("snippet"):  # a search result: what matched, under the title
            labels.append(Label(snippet_text(summary), shrink=True, classes="snippet"))
        super().__init__(*labels)
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
