"""The chat: conversations on the left (with a search box), the transcript, the message box.

Answers stream in as Markdown (MarkdownStream batches fragments, so a fast model never
makes typing stutter). Feedback goes to /v1/feedback at once and shows on the answer as
saving / saved / NOT SAVED; what could not be saved is retried when the daemon is back.
"""

from __future__ import annotations

import asyncio
from typing import Any

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Footer, Header, Markdown, Static

from tui.client import ApiRefused, DaemonUnreachable, Delta, Finished, Started
from tui.screens.dialogs import ConfirmScreen, EditScreen, RenameScreen, SettingsScreen
from tui.widgets.message import Answer, AnswerView, FeedbackState, UserMessage
from tui.widgets.prompt import PromptInput
from tui.widgets.sidebar import ConnectionBar, ConversationItem, ConversationList, SearchBox
from tui.widgets.transcript import Transcript

FEEDBACK_FIELDS = ("rating", "correction")
# The search waits this long after a key: a word typed fast is one request, not one a letter.
SEARCH_DELAY_S = 0.25


class ChatScreen(Screen[None]):
    BINDINGS = [
        Binding("escape", "escape", "Stop/pick", key_display="esc"),
        Binding("ctrl+n", "new_conversation", "New", key_display="^n"),
        Binding("ctrl+b", "toggle_sidebar", "Chats", key_display="^b"),
        Binding("ctrl+f", "search", "Search", show=False),
        # In the help screen (F1); the footer has no room for them at 80 columns.
        Binding("ctrl+o", "settings", "System/effort", show=False),
        Binding("ctrl+t", "toggle_reasoning", "Analysis", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.conversation: dict[str, Any] | None = None  # None: a new, unsaved conversation
        self.system_prompt: str | None = None
        self.effort: str | None = None
        self.generating: AnswerView | None = None
        # message id -> feedback fields the daemon has not stored yet (retried on reconnect).
        self.unsaved: dict[str, dict[str, Any]] = {}

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal():
            with Vertical(id="sidebar"):
                yield SearchBox(id="search")
                yield ConversationList(id="conversations")
            with Vertical(id="main"):
                yield ConnectionBar(id="connection")
                yield Static(id="chat-info")
                yield Transcript(id="transcript")
                yield PromptInput(id="prompt", placeholder="Message  (Enter sends, ^j new line)")
        yield Footer()

    def on_mount(self) -> None:
        self.watch(self.app, "connection", self._connection_changed)
        self.query_one(PromptInput).focus()
        self._show_info()

    @property
    def api(self) -> Any:
        return self.app.api  # type: ignore[attr-defined]

    @property
    def transcript(self) -> Transcript:
        return self.query_one(Transcript)

    @property
    def prompt(self) -> PromptInput:
        return self.query_one(PromptInput)

    def _connection_changed(self, connection: Any) -> None:
        self._show_info()
        if connection.up:
            self.refresh_conversations()
            if self.unsaved:
                self.retry_unsaved()

    def _show_info(self) -> None:
        title = (self.conversation or {}).get("title") or "new conversation"
        parts = [title, f"effort {self.effort or 'default'}"]
        if self.system_prompt:
            parts.append("system prompt set")
        connection = self.app.connection  # type: ignore[attr-defined]
        if connection.up:
            parts.append(f"serving {connection.adapter_id or 'the base model'}")
        self.query_one("#chat-info", Static).update(" · ".join(parts))

    # ---------------------------------------------------------------- conversations

    # Its own group: a list arriving late is replaced by the next (typing in the search box
    # cancels the search before), and opening a conversation is not cancelled by either.
    @work(exclusive=True, group="sidebar")
    async def refresh_conversations(self, delay: float = 0.0, open_first: bool = False) -> None:
        """Fill the sidebar: the conversations matching the search box, or all of them."""
        q = self.query_one(SearchBox).value
        searching = any(ch.isalnum() for ch in q)  # the daemon would refuse it as no words
        await asyncio.sleep(delay)  # a debounce: the next key cancels this worker
        try:
            if searching:
                summaries = await self.api.search_conversations(q)
            else:
                summaries = await self.api.conversations()
        except DaemonUnreachable:
            return  # the connection bar says so; the next reconnect refreshes
        except ApiRefused as exc:
            if searching:
                self.notify(f"search: {exc.message}", severity="warning")
            return
        if self.query_one(SearchBox).value != q:
            return  # typed on since: that search is on its way
        active = (self.conversation or {}).get("id")
        self.query_one(ConversationList).show(summaries, active)
        if open_first and summaries:
            self.open_conversation(summaries[0]["id"])
        for summary in summaries:
            if summary["id"] == active:  # its title as stored (first message, or renamed)
                self.conversation = summary
                self._show_info()

    @on(SearchBox.Changed, "#search")
    def _search_typed(self, event: SearchBox.Changed) -> None:
        self.refresh_conversations(delay=SEARCH_DELAY_S if event.value.strip() else 0.0)

    @on(SearchBox.Submitted, "#search")
    def _search_entered(self) -> None:
        """Enter in the search box opens the newest match."""
        self.refresh_conversations(open_first=True)

    def action_search(self) -> None:
        if self.has_class("-narrow"):
            self.add_class("-show-sidebar")
        self.remove_class("-hide-sidebar")
        self.query_one(SearchBox).focus()

    @on(ConversationList.Selected)
    def _pick(self, event: ConversationList.Selected) -> None:
        if isinstance(event.item, ConversationItem):
            self.open_conversation(event.item.conversation_id)

    @work(exclusive=True, group="conversations")
    async def open_conversation(self, conversation_id: str) -> None:
        if self.generating is not None:
            self.notify("wait for the answer, or press Esc to stop it", severity="warning")
            return
        try:
            data = await self.api.conversation(conversation_id)
        except (DaemonUnreachable, ApiRefused) as exc:
            self.notify(f"could not open the conversation: {exc}", severity="error")
            return
        await self.show_conversation(data)
        self.prompt.focus()

    async def show_conversation(self, data: dict[str, Any] | None) -> None:
        """Rebuild the transcript from a stored conversation (None: start a new one)."""
        self.conversation = (
            None if data is None else {k: v for k, v in data.items() if k != "messages"}
        )
        self.system_prompt = None if data is None else data.get("system_prompt")
        self.effort = None if data is None else data.get("reasoning_effort")
        transcript = self.transcript
        await transcript.remove_children()
        views: list[Any] = []
        latest: dict[str, AnswerView] = {}
        for m in (data or {}).get("messages", []):
            if m["role"] == "user":
                views.append(UserMessage(m["content"]))
            elif m["role"] == "assistant":
                view = _stored_answer(m, self.unsaved.get(m["id"], {}))
                if m.get("reply_to_id") in latest:
                    latest[m["reply_to_id"]].answer.superseded = True
                latest[m.get("reply_to_id")] = view
                views.append(view)
        await transcript.mount_all(views)
        transcript.scroll_end(animate=False)
        self._show_info()

    def action_new_conversation(self) -> None:
        if self.generating is not None:
            self.notify("wait for the answer, or press Esc to stop it", severity="warning")
            return
        self.run_worker(self.show_conversation(None), group="conversations", exclusive=True)
        self.query_one(ConversationList).index = None
        self.prompt.focus()

    @on(ConversationList.Action)
    def _conversation_action(self, event: ConversationList.Action) -> None:
        summary = event.conversation
        if event.action == "new":
            self.action_new_conversation()
        elif event.action == "rename" and summary is not None:

            def renamed(title: str | None) -> None:
                if title:
                    self.update_conversation(summary["id"], title=title)

            self.app.push_screen(RenameScreen(summary.get("title") or ""), renamed)
        elif event.action == "forget" and summary is not None:

            def confirmed(yes: bool | None) -> None:
                if yes:
                    self.forget_conversation(summary["id"])

            self.app.push_screen(
                ConfirmScreen(
                    f"Delete “{summary.get('title') or summary['id']}”?",
                    "Its messages and feedback are forgotten by the store and never trained on.",
                ),
                confirmed,
            )

    @work(group="conversation-edit")
    async def update_conversation(self, conversation_id: str, **fields: Any) -> None:
        try:
            summary = await self.api.update_conversation(conversation_id, **fields)
        except (DaemonUnreachable, ApiRefused) as exc:
            self.notify(f"not saved: {exc}", severity="error")
            return
        if self.conversation and self.conversation["id"] == conversation_id:
            self.conversation = summary
            self._show_info()
        self.refresh_conversations()

    @work(group="conversation-edit")
    async def forget_conversation(self, conversation_id: str) -> None:
        try:
            await self.api.forget_conversation(conversation_id)
        except (DaemonUnreachable, ApiRefused) as exc:
            self.notify(f"not deleted: {exc}", severity="error")
            return
        if self.conversation and self.conversation["id"] == conversation_id:
            await self.show_conversation(None)
        self.notify("conversation deleted")
        self.refresh_conversations()

    def action_settings(self) -> None:
        def chosen(values: dict[str, Any] | None) -> None:
            if values is None:
                return
            self.system_prompt = values["system_prompt"]
            self.effort = values["reasoning_effort"]
            self._show_info()
            if self.conversation is not None:
                self.update_conversation(self.conversation["id"], **values)

        self.app.push_screen(SettingsScreen(self.system_prompt, self.effort), chosen)

    def action_toggle_sidebar(self) -> None:
        # Narrow terminals start without the list; wide ones with it.
        narrow = self.has_class("-narrow")
        self.toggle_class("-show-sidebar" if narrow else "-hide-sidebar")

    def action_toggle_reasoning(self) -> None:
        self.toggle_class("-show-reasoning")
        shown = self.has_class("-show-reasoning")
        self.notify("analysis channel shown" if shown else "analysis channel hidden")

    # ----------------------------------------------------------------- talking

    def _history(self, *, until_last_user: bool = False) -> list[dict[str, str]]:
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        children = list(self.transcript.children)
        if until_last_user:
            users = [i for i, c in enumerate(children) if isinstance(c, UserMessage)]
            children = children[: users[-1] + 1] if users else []
        for child in children:
            if isinstance(child, UserMessage):
                messages.append({"role": "user", "content": child.text})
            elif isinstance(child, AnswerView) and not child.answer.superseded and child.text:
                messages.append({"role": "assistant", "content": child.text})
        return messages

    def _request(self, messages: list[dict[str, str]], **more: Any) -> dict[str, Any]:
        body: dict[str, Any] = {"messages": messages, "include_reasoning": True} | more
        if self.conversation is not None:
            body["conversation_id"] = self.conversation["id"]
        if self.effort:
            body["reasoning_effort"] = self.effort
        return body

    @on(PromptInput.Submitted)
    async def _submitted(self, event: PromptInput.Submitted) -> None:
        if self.generating is not None:
            self.notify("an answer is still coming: Esc stops it", severity="warning")
            return
        text = event.text.strip()
        self.prompt.clear()
        user = UserMessage(text)
        answer = AnswerView()
        await self.transcript.mount_all([user, answer])
        self.transcript.scroll_end(animate=False)
        body = self._request(self._history())
        self.generate(answer, body, unsent=(user, text))

    @on(Transcript.Regenerate)
    async def _regenerate(self, event: Transcript.Regenerate) -> None:
        if self.generating is not None:
            self.notify("an answer is still coming: Esc stops it", severity="warning")
            return
        children = list(self.transcript.children)
        last_user = max(i for i, c in enumerate(children) if isinstance(c, UserMessage))
        if children.index(event.answer) < last_user or self.conversation is None:
            self.notify("regenerate works on the answer to your latest message", severity="warning")
            return
        earlier = [c for c in children[last_user + 1 :] if isinstance(c, AnswerView)]
        for view in earlier:
            view.answer.superseded = True
            view.refresh_meta()
        answer = AnswerView()
        await self.transcript.mount(answer)
        self.transcript.scroll_end(animate=False)
        body = self._request(self._history(until_last_user=True), regenerate=True)
        self.generate(answer, body, unsent=None, superseded=earlier)

    @work(exclusive=True, group="generate")
    async def generate(
        self,
        view: AnswerView,
        body: dict[str, Any],
        *,
        unsent: tuple[UserMessage, str] | None,
        superseded: list[AnswerView] | None = None,
    ) -> None:
        self.generating = view
        stream = Markdown.get_stream(view.body)
        started = taken_back = False
        try:
            async for event in self.api.stream_chat(body):
                if isinstance(event, Started):
                    started = True
                    view.answer.message_id = event.message_id
                    if self.conversation is None and event.conversation_id:
                        # The store titles a conversation with its first message.
                        title = body["messages"][-1]["content"][:60]
                        self.conversation = {"id": event.conversation_id, "title": title}
                        self._show_info()
                elif isinstance(event, Delta):
                    view.deltas += 1
                    if event.text:
                        view.text += event.text
                        await stream.write(event.text)
                    if event.reasoning:
                        view.set_reasoning(view.reasoning + event.reasoning)
                    self.transcript.follow()
                elif isinstance(event, Finished):
                    a = view.answer
                    a.finish_reason = event.finish_reason
                    a.adapter_id = event.adapter_id
                    a.completion_tokens = event.completion_tokens
                    a.seconds = event.seconds
        except asyncio.CancelledError:
            view.answer.finish_reason = "stopped"
            raise
        except (DaemonUnreachable, ApiRefused) as exc:
            if not started:
                # Nothing reached the store: take the turn back, keep what was typed.
                taken_back = True
                await view.remove()
                for earlier in superseded or []:
                    earlier.answer.superseded = False
                    earlier.refresh_meta()
                if unsent is not None:
                    await unsent[0].remove()
                    if not self.prompt.text:
                        self.prompt.text = unsent[1]
                self.notify(f"not sent: {exc}", severity="error", timeout=8)
            else:
                view.answer.finish_reason = "cut_off"
                view.answer.problem = (
                    "cut off: the daemon went away mid-answer"
                    if isinstance(exc, DaemonUnreachable)
                    else f"failed: {exc.message}"
                )
            self.app.check_connection()  # type: ignore[attr-defined]
        finally:
            await stream.stop()
            self.generating = None
            if not taken_back:
                view.refresh_meta()
            self._show_info()
            self.refresh_conversations()

    def action_escape(self) -> None:
        """Esc: stop an answer that is coming; otherwise pick the latest answer to rate."""
        if self.generating is not None:
            for worker in self.workers:
                if worker.group == "generate":
                    worker.cancel()
            return
        self._select_answers()

    @on(PromptInput.AnswersWanted)
    def _select_answers(self) -> None:
        if self.transcript.select_latest() is not None:
            self.transcript.focus()

    @on(Transcript.Leave)
    def _leave(self) -> None:
        self.prompt.focus()

    # ------------------------------------------------------------------ feedback

    @on(Transcript.Rate)
    def _rate(self, event: Transcript.Rate) -> None:
        self.give_feedback(event.answer, rating=event.rating)

    @on(Transcript.Correct)
    def _correct(self, event: Transcript.Correct) -> None:
        view = event.answer
        unsaved = view.answer.correction
        text = unsaved.value if unsaved is not None and unsaved.state == "failed" else view.text

        def saved(correction: str | None) -> None:
            if correction is not None:
                self.give_feedback(view, correction=correction)
            self.transcript.focus()

        self.app.push_screen(
            EditScreen("Correct the answer: write the one you wanted", text), saved
        )

    def give_feedback(self, view: AnswerView, **fields: Any) -> None:
        message_id = view.answer.message_id
        if not message_id or not view.done or view.answer.finish_reason == "error":
            self.notify("this answer is not stored yet, so it cannot be rated", severity="warning")
            return
        for name, value in fields.items():
            setattr(view.answer, name, FeedbackState(value))
        view.refresh_meta()
        self.store_feedback(message_id, fields)

    @work(group="feedback")
    async def store_feedback(self, message_id: str, fields: dict[str, Any]) -> None:
        error = None
        try:
            await self.api.feedback(message_id, **fields)
        except (DaemonUnreachable, ApiRefused) as exc:
            error = exc.message if isinstance(exc, ApiRefused) else "daemon not reachable"
            if isinstance(exc, DaemonUnreachable):
                self.unsaved[message_id] = self.unsaved.get(message_id, {}) | fields
            self.notify(f"feedback not saved: {exc}", severity="error", timeout=8)
        else:
            pending = self.unsaved.get(message_id, {})
            for name in fields:
                if pending.get(name) == fields[name]:
                    pending.pop(name)
            if not pending:
                self.unsaved.pop(message_id, None)
        for view in self.transcript.query(AnswerView):
            if view.answer.message_id != message_id:
                continue
            for name, value in fields.items():
                shown = getattr(view.answer, name)
                if shown is not None and shown.value == value:
                    shown.state, shown.error = ("failed", error) if error else ("saved", None)
            view.refresh_meta()

    def retry_unsaved(self) -> None:
        for message_id, fields in list(self.unsaved.items()):
            self.store_feedback(message_id, dict(fields))


def _stored_answer(message: dict[str, Any], unsaved: dict[str, Any]) -> AnswerView:
    """An answer as the store has it, with feedback not yet stored shown as not saved."""
    latency = message.get("latency_ms")
    answer = Answer(
        message_id=message["id"],
        adapter_id=message.get("adapter_id"),
        completion_tokens=message.get("completion_tokens"),
        seconds=latency / 1000 if latency else None,
        finish_reason=message.get("finish_reason") or "cut_off",
    )
    feedback = message.get("feedback") or {}
    for name in FEEDBACK_FIELDS:
        if name in unsaved:
            setattr(answer, name, FeedbackState(unsaved[name], "failed", "daemon not reachable"))
        elif feedback.get(name) is not None:
            setattr(answer, name, FeedbackState(feedback[name], "saved"))
    return AnswerView(message.get("content") or "", message.get("reasoning") or "", answer)
