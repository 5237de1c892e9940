"""The terminal UI driven by Textual's pilot against a real API worker on 127.0.0.1 with the
embedded model: chat, rate, correct, regenerate, stop, the daemon going away and coming
back, the status screen with a real training job, and the reports screen.

The layout is pinned by snapshots (tests/__snapshots__/test_tui/); after a deliberate change
of the look, update them with `pytest tests/test_tui.py --snapshot-update` and review the SVGs.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from textual.pilot import Pilot

from common.config import load_settings
from data.store import Store
from tests.conftest import ServerProcess, kill_training_processes, run_cli
from tests.scripted_person import store_corrections, taught
from tui.app import Connection, WhetstoneApp, make_api
from tui.client import Api
from tui.screens.chat import ChatScreen
from tui.screens.dialogs import ConfirmScreen, EditScreen
from tui.screens.memory import MemoryScreen
from tui.screens.reports import ReportScreen, ReportsScreen
from tui.screens.status import StatusScreen
from tui.widgets.message import AnswerView, UserMessage
from tui.widgets.sidebar import ConnectionBar, ConversationList, SearchBox

STORY = "Write a very long story about a dragon and a knight."
WIDE, NARROW = (120, 40), (80, 24)


def app_for(home: Path, url: str | None = None, retry_s: float = 0.5) -> WhetstoneApp:
    return WhetstoneApp(make_api(load_settings(home), url), retry_s=retry_s)


async def until(
    pilot: Pilot, condition: Callable[[], Any], timeout: float = 60, what: str = ""
) -> Any:
    """Let the app run until `condition()` is truthy; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        await pilot.pause(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what or condition}")


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())


def chat_screen(app: WhetstoneApp) -> ChatScreen:
    return next(s for s in app.screen_stack if isinstance(s, ChatScreen))


def answers(app: WhetstoneApp) -> list[AnswerView]:
    return list(chat_screen(app).query(AnswerView))


async def send(pilot: Pilot, text: str) -> AnswerView:
    """Type a message, press Enter, and return the answer view that appears."""
    before = len(answers(pilot.app))
    await pilot.click("#prompt")
    await pilot.press(*text)
    await pilot.press("enter")
    return await until(
        pilot,
        lambda: len(answers(pilot.app)) > before and answers(pilot.app)[-1],
        10,
        "the answer to appear",
    )


async def finished(pilot: Pilot, view: AnswerView, timeout: float = 120) -> AnswerView:
    await until(pilot, lambda: view.done, timeout, "the answer to finish")
    return view


def store_of(home: Path) -> Store:
    return Store(load_settings(home).db_url)


def stored(home: Path, query: str, *args: Any) -> Any:
    """One read from the home's store, opened and closed around it."""
    with store_of(home) as store:
        return getattr(store, query)(*args)


async def connected(pilot: Pilot, timeout: float = 30) -> None:
    await until(pilot, lambda: pilot.app.connection.up, timeout, "the daemon to be reachable")


# ------------------------------------------------------------------------------ chat


@pytest.mark.slow
def test_chat_streams_an_answer_and_rating_and_correction_are_stored(
    server: ServerProcess,
) -> None:
    async def scenario() -> None:
        app = app_for(server.home)
        async with app.run_test(size=WIDE) as pilot:
            await connected(pilot)
            view = await send(pilot, "What is the capital of France?")
            await finished(pilot, view)
            assert view.deltas >= 2, "the answer arrived in one piece, not streamed"
            assert view.text.strip()
            assert view.body.source == view.text  # what is shown is what was streamed
            meta = str(view.meta_line())
            assert "base model" in meta and "tok/s" in meta

            # Up in the empty box picks the answer; 4 rates it, shown at once.
            await pilot.press("up")
            assert app.focused is chat_screen(app).transcript
            assert view.has_class("-selected")
            await pilot.press("4")
            assert "★★★★☆ 4" in str(view.meta_line())
            await until(pilot, lambda: view.answer.rating.state == "saved", 10, "rating saved")

            # c opens an editor prefilled with the answer; Ctrl+S stores the correction.
            await pilot.press("c")
            editor = await until(pilot, lambda: isinstance(app.screen, EditScreen) and app.screen)
            assert editor.query_one("#editor").text == view.text
            assert "Ctrl+R clears it" in _shown(editor.query_one(".dialog-detail"))
            await pilot.press("ctrl+r")  # clears the answer to write the wanted one
            assert editor.query_one("#editor").text == ""
            await pilot.press(*"Paris is the capital of France.")
            await pilot.press("ctrl+s")
            await until(
                pilot,
                lambda: view.answer.correction and view.answer.correction.state == "saved",
                10,
                "correction saved",
            )
            assert "corrected ✓" in str(view.meta_line())
            # The correction stays in sight under the answer it corrects.
            shown = view.query_one(".correction")
            assert shown.display and view.has_class("-corrected")
            assert "your correction: Paris is the capital of France." in _shown(shown)
            message_id = view.answer.message_id

            # The sidebar lists the conversation under its first message.
            sidebar = chat_screen(app).query_one(ConversationList)
            await until(pilot, lambda: len(sidebar.children) == 1, 10, "the sidebar entry")

        with store_of(server.home) as store:
            feedback = store.current_feedback(message_id)
            assert feedback.rating == 4
            assert feedback.correction == "Paris is the capital of France."
            assert store.get_message(message_id).content == view.text

    run(scenario)


@pytest.mark.slow
def test_regenerate_keeps_both_answers_in_a_narrow_terminal(server: ServerProcess) -> None:
    async def scenario() -> None:
        app = app_for(server.home)
        async with app.run_test(size=NARROW) as pilot:
            await connected(pilot)
            screen = chat_screen(app)
            assert screen.has_class("-narrow")
            assert not screen.query_one("#sidebar").display  # hidden below 100 columns
            first = await finished(pilot, await send(pilot, "Name a colour."))
            await pilot.press("escape")  # reply done: Esc picks it
            assert first.has_class("-selected")
            await pilot.press("r")
            second = await until(pilot, lambda: len(answers(app)) == 2 and answers(app)[1])
            await finished(pilot, second)
            assert first.answer.superseded and not second.answer.superseded
            assert "earlier answer" in str(first.meta_line())
            # The message box is still on screen and works at 80x24.
            prompt = screen.prompt
            assert prompt.region.bottom <= NARROW[1] and prompt.region.height >= 3
            await pilot.press("ctrl+b")
            assert screen.query_one("#sidebar").display
            ids = (first.answer.message_id, second.answer.message_id)

        with store_of(server.home) as store:
            one, two = (store.get_message(i) for i in ids)
            conversation = store.get_conversation(one.conversation_id)
        assert one.reply_to_id == two.reply_to_id is not None
        assert one.content == first.text and two.content == second.text
        # The first answer is greedy; the regenerated one is sampled, so the two can differ.
        assert (one.generation["temperature"], two.generation["temperature"]) == (0.0, 0.8)
        assert [m.role for m in conversation.messages] == ["user", "assistant", "assistant"]

    run(scenario)


@pytest.mark.slow
def test_escape_stops_a_generation_and_the_next_message_works(server: ServerProcess) -> None:
    async def scenario() -> None:
        app = app_for(server.home)
        async with app.run_test(size=WIDE) as pilot:
            await connected(pilot)
            story = await send(pilot, STORY)
            await until(pilot, lambda: story.deltas >= 3, 60, "the story to start")
            await pilot.press("escape")
            await until(pilot, lambda: story.done, 5, "the stop")
            assert story.answer.finish_reason == "stopped"
            assert "stopped" in str(story.meta_line())
            partial = story.text
            message_id = story.answer.message_id

            answer = await finished(pilot, await send(pilot, "What is 2 + 2?"), 60)
            assert answer.answer.finish_reason == "stop" and answer.text.strip()

        message = stored(server.home, "get_message", message_id)
        assert message.finish_reason == "cut_off"
        assert message.content.strip() and partial.startswith(message.content.strip()[:10])

    run(scenario)


@pytest.mark.slow
def test_a_long_answer_is_followed_as_it_streams_until_the_person_reads_back(
    server: ServerProcess,
) -> None:
    """Seen in the first hour: the transcript stopped following a streaming answer until Up
    was pressed."""

    async def scenario() -> None:
        app = app_for(server.home)
        # A short terminal: the story passes the bottom within a few lines.
        async with app.run_test(size=(80, 12)) as pilot:
            await connected(pilot)
            transcript = chat_screen(app).transcript
            story = await send(pilot, STORY)
            await until(pilot, lambda: transcript.max_scroll_y >= 2, 90, "the story to overflow")
            grown = story.deltas
            await until(pilot, lambda: story.deltas >= grown + 5, 30, "more of the story")
            await pilot.pause()
            assert transcript.scroll_y == transcript.max_scroll_y > 0, "stopped following"
            # Reading back: the view stays where the person put it while the answer grows.
            transcript.focus()
            await pilot.press("pageup")
            await pilot.wait_for_scheduled_animations()  # Page Up scrolls smoothly
            await pilot.pause()
            kept, bottom = transcript.scroll_y, transcript.max_scroll_y
            assert kept < bottom
            await until(pilot, lambda: transcript.max_scroll_y > bottom, 30, "more lines")
            await pilot.pause()
            assert transcript.scroll_y == kept
            await pilot.press("escape", "escape")  # back to the message box, then stop
            await until(pilot, lambda: story.done, 5, "the stop")

    run(scenario)


@pytest.mark.slow
def test_conversation_list_switches_renames_and_forgets(server: ServerProcess) -> None:
    async def scenario() -> None:
        app = app_for(server.home)
        async with app.run_test(size=WIDE) as pilot:
            await connected(pilot)
            screen = chat_screen(app)
            first = await finished(pilot, await send(pilot, "Say hello."))
            await pilot.press("ctrl+n")
            await until(pilot, lambda: not answers(app), 5, "an empty transcript")
            await finished(pilot, await send(pilot, "Say goodbye."))
            sidebar = screen.query_one(ConversationList)
            await until(pilot, lambda: len(sidebar.children) == 2, 10, "two conversations")

            # Open the older one (the list is newest first).
            sidebar.focus()
            sidebar.index = 1
            await pilot.press("enter")
            await until(
                pilot,
                lambda: [v.text for v in screen.query(UserMessage)] == ["Say hello."],
                10,
                "the first conversation",
            )
            assert answers(app)[0].text == first.text
            conversation_id = screen.conversation["id"]

            # Its system prompt and reasoning effort (Ctrl+O) are stored with it.
            await pilot.press("ctrl+o")
            await until(pilot, lambda: app.screen.__class__.__name__ == "SettingsScreen")
            await pilot.press(*"Answer briefly.", "ctrl+s")
            await until(
                pilot, lambda: "system prompt set" in str(screen.query_one("#chat-info").render())
            )

            await until(
                pilot,
                lambda: (
                    stored(server.home, "get_conversation", conversation_id).system_prompt
                    == "Answer briefly."
                ),
                10,
                "the stored system prompt",
            )

            # Rename it.
            sidebar.focus()
            await pilot.press("e")
            await until(pilot, lambda: app.screen.__class__.__name__ == "RenameScreen")
            title = app.screen.query_one("#title")
            title.value = ""
            await pilot.press(*"Greetings", "enter")
            await until(
                pilot,
                lambda: any(
                    "Greetings" in str(i.query_one("Label").render()) for i in sidebar.children
                ),
                10,
                "the new title",
            )

            # Delete it, after confirming.
            sidebar.focus()
            sidebar.index = next(
                n
                for n, item in enumerate(sidebar.children)
                if item.conversation_id == conversation_id
            )
            await pilot.press("d")
            await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
            await pilot.press("y")
            await until(pilot, lambda: len(sidebar.children) == 1, 10, "the list without it")
            assert not answers(app)  # it was open: the transcript starts over

        titles = [c.title for c in stored(server.home, "list_conversations")]
        assert titles == ["Say goodbye."]

    run(scenario)


@pytest.mark.slow
def test_search_box_filters_the_list_through_the_api_and_opens_a_match(
    server: ServerProcess,
) -> None:
    with store_of(server.home) as store:
        for question, answer in [
            ("Where do barn owls nest?", "In old barns and hollow trees."),
            ("Do herons eat frogs?", "Yes: grey herons eat frogs, fish and voles."),
            ("What do owls eat?", "Mostly voles."),
        ]:
            conversation = store.create_conversation(title=question)
            store.add_message(conversation.id, "user", question)
            store.add_message(conversation.id, "assistant", answer, finish_reason="stop")
        herons = store.search_conversations("herons")[0].conversation.id

    def titles(sidebar: ConversationList) -> list[str]:
        return [item.summary["title"] for item in sidebar.children]

    async def scenario() -> None:
        app = app_for(server.home)
        async with app.run_test(size=WIDE) as pilot:
            await connected(pilot)
            screen = chat_screen(app)
            sidebar = screen.query_one(ConversationList)
            await until(pilot, lambda: len(sidebar.children) == 3, 10, "three conversations")

            # Ctrl+F to the box; the words match the answer, not the title.
            await pilot.press("ctrl+f")
            assert app.focused is screen.query_one(SearchBox)
            await pilot.press(*"FROGS grey")
            await until(
                pilot,
                lambda: titles(sidebar) == ["Do herons eat frogs?"],
                10,
                "only the heron conversation",
            )
            shown = await until(
                pilot, lambda: sidebar.children[0].query(".snippet"), 5, "the snippet shown"
            )
            snippet = str(shown.first().render())
            assert "grey herons eat frogs" in snippet, snippet

            # Esc: the whole list again.
            await pilot.press("escape")
            await until(pilot, lambda: len(sidebar.children) == 3, 10, "the whole list again")
            assert app.focused is sidebar

            # Found as it is typed ("owl" is the start of "owls"); Enter opens the newest.
            await pilot.press("ctrl+f", *"owl")
            await until(pilot, lambda: len(sidebar.children) == 2, 10, "the two owl ones")
            assert titles(sidebar) == ["What do owls eat?", "Where do barn owls nest?"]
            await pilot.press(*" nest")  # every word, in one message (or the title)
            await until(
                pilot, lambda: titles(sidebar) == ["Where do barn owls nest?"], 10, "the barn owl"
            )
            await pilot.press("enter")
            await until(
                pilot,
                lambda: [v.text for v in screen.query(UserMessage)] == ["Where do barn owls nest?"],
                10,
                "the barn owl conversation open",
            )
            assert answers(app)[0].text == "In old barns and hollow trees."

            # Down to the matches, and Enter there opens as the list does.
            await pilot.press("ctrl+f")
            screen.query_one(SearchBox).value = ""
            await pilot.press(*"voles frogs")
            await until(
                pilot, lambda: titles(sidebar) == ["Do herons eat frogs?"], 10, "the heron one"
            )
            await pilot.press("down", "enter")
            await until(
                pilot,
                lambda: screen.conversation and screen.conversation["id"] == herons,
                10,
                "the heron conversation open",
            )
            assert answers(app)[0].text == "Yes: grey herons eat frogs, fish and voles."

            # Nothing matches: an empty list, not an error.
            await pilot.press("ctrl+f", *" zebra")
            await until(pilot, lambda: not sidebar.children, 10, "no matches")

    run(scenario)


# ----------------------------------------------------------------------- resilience


@pytest.mark.slow
def test_starts_with_the_daemon_down_keeps_the_message_and_connects_when_it_starts(
    home_with_model: Path,
) -> None:
    async def scenario() -> None:
        app = app_for(home_with_model)
        async with app.run_test(size=WIDE) as pilot:
            bar = chat_screen(app).query_one(ConnectionBar)
            await until(pilot, lambda: bar.has_class("-down"), 10, "the daemon-down bar")
            assert "daemon not reachable" in str(bar.render())
            assert "whetstone up" in str(bar.render())

            await pilot.click("#prompt")
            await pilot.press(*"Are you there?", "enter")
            await pilot.pause(0.5)
            assert chat_screen(app).prompt.text == "Are you there?"  # kept, not lost
            assert not answers(app)

            server = ServerProcess(home_with_model).wait_ready()
            try:
                await connected(pilot)
                assert not bar.has_class("-down")
                await pilot.click("#prompt")
                await pilot.press("enter")
                answer = await until(pilot, lambda: answers(app) and answers(app)[-1])
                await finished(pilot, answer, 60)
                assert answer.answer.finish_reason == "stop"
            finally:
                server.stop()

    run(scenario)


@pytest.mark.slow
def test_daemon_killed_mid_answer_marks_it_cut_off_and_the_next_message_works(
    home_with_model: Path,
) -> None:
    async def scenario() -> None:
        server = ServerProcess(home_with_model).wait_ready()
        app = app_for(home_with_model)
        try:
            async with app.run_test(size=WIDE) as pilot:
                await connected(pilot)
                story = await send(pilot, STORY)
                await until(pilot, lambda: story.deltas >= 3, 60, "the story to start")
                os.kill(server.proc.pid, signal.SIGKILL)
                server.proc.wait()
                await until(pilot, lambda: story.done, 15, "the answer to be marked")
                assert story.answer.finish_reason == "cut_off"
                assert "daemon went away" in str(story.meta_line())
                assert story.text.strip()
                await until(pilot, lambda: not app.connection.up, 10, "the down bar")

                server = ServerProcess(home_with_model).wait_ready()
                await connected(pilot)
                answer = await finished(pilot, await send(pilot, "What is 2 + 2?"), 60)
                assert answer.answer.finish_reason == "stop" and answer.text.strip()
                # The cut-off answer is stored and can be rated.
                chat_screen(app).transcript.focus()
                chat_screen(app).transcript.select(story)
                await pilot.press("2")
                await until(pilot, lambda: story.answer.rating.state == "saved", 10)
                message_id = story.answer.message_id
        finally:
            server.stop()
        message = stored(home_with_model, "get_message", message_id)
        assert message.finish_reason == "cut_off"
        assert stored(home_with_model, "current_feedback", message_id).rating == 2

    run(scenario)


@pytest.mark.slow
def test_a_rating_that_fails_to_store_is_shown_and_sent_when_the_daemon_is_back(
    home_with_model: Path,
) -> None:
    async def scenario() -> None:
        server = ServerProcess(home_with_model).wait_ready()
        app = app_for(home_with_model)
        try:
            async with app.run_test(size=WIDE) as pilot:
                await connected(pilot)
                view = await finished(pilot, await send(pilot, "Name a fruit."))
                server.stop()
                await pilot.press("up", "5")
                await until(pilot, lambda: view.answer.rating.state == "failed", 15)
                assert "NOT SAVED" in str(view.meta_line())

                server = ServerProcess(home_with_model).wait_ready()
                await until(pilot, lambda: view.answer.rating.state == "saved", 30, "the retry")
                message_id = view.answer.message_id
        finally:
            server.stop()
        assert stored(home_with_model, "current_feedback", message_id).rating == 5

    run(scenario)


# ------------------------------------------------------------------- status, reports


@pytest.mark.slow
def test_status_screen_trains_now_and_shows_the_job_progress(home_for_training: Path) -> None:
    # No epoch cap, so the bar's total is quick_test's own steps (24 items would cap it);
    # no paraphrases of the corrected questions (the model writing them is a wait before the
    # first step, not the progress this shows).
    (home_for_training / "config.toml").write_text(
        '[training]\ndefault_profile = "quick_test"\nmax_epochs = 100\n'
        "correction_variants = 0\n\n"
        '[schedule]\nnightly_profile = "standard"\n'
    )
    store_corrections(home_for_training, taught(24))
    # A recipe the search adopted for the nightly profile (`t` trains quick_test: unaffected).
    recipe = {
        "profile": "standard",
        "base_model": load_settings(home_for_training).model.base_model,
        "params": {"learning_rate": 0.0005, "max_steps": 100, "lora_r": 8, "replay_fraction": 0.4},
        "study": "recipe-standard-20261201-030000",
        "trial": 3,
        "validation_nll": 1.1,
        "baseline_validation_nll": 1.3,
        "adopted_at": "2026-12-01T05:00:00+00:00",
    }
    (home_for_training / "recipe.json").write_text(json.dumps({"current": recipe, "history": []}))
    server = ServerProcess(home_for_training).wait_ready()

    async def scenario() -> None:
        app = app_for(home_for_training)
        async with app.run_test(size=WIDE) as pilot:
            await connected(pilot)
            await pilot.press("f3")
            screen = await until(pilot, lambda: isinstance(app.screen, StatusScreen) and app.screen)
            await until(
                pilot,
                lambda: "no training job" in str(screen.query_one("#run-line").render()),
                10,
            )
            overview = _shown(screen.query_one("#overview"))
            assert (
                "learning_rate=0.0005" in overview
                and "recipe-standard-20261201-030000 #3" in overview
            )
            # 24 corrections of schedule.every_n_feedback's 25: one more queues a run.
            assert "after 1 more rating(s) or correction(s), or nightly" in overview
            # The last weeks day by day: today, 24 answers, every one corrected.
            trend = screen.query_one("#trend")
            await until(pilot, lambda: "100%" in str(trend.render()), 10, "the trend panel")
            assert time.strftime("%Y-%m-%d", time.gmtime()) in str(trend.render())
            await pilot.press("t")
            await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
            await pilot.press("y")
            bar = screen.query_one("#run-progress")
            line = screen.query_one("#run-line")
            await until(
                pilot, lambda: (bar.progress or 0) >= 2, 240, "training steps on the status screen"
            )
            text = str(line.render())
            steps = load_settings(home_for_training).profile("quick_test").max_steps
            assert "quick_test" in text and "step " in text and f"/{steps}" in text
            assert "loss " in text and "ETA " in text
            assert bar.total == steps

    try:
        run(scenario)
    finally:
        kill_training_processes(home_for_training)
        server.stop()


def _shown(widget: Any) -> str:
    """A Static's content as the terminal shows its text (tables included)."""
    from rich.console import Console

    console = Console(width=200, file=io.StringIO())
    console.print(widget.content)
    return console.file.getvalue()


def _candidate_with_report(home: Path, prepared: Path, candidate_id: str, decision: str) -> None:
    """A real adapter on the embedded model with an evaluation and a rendered report."""
    from candidates import Registry
    from development import report
    from tests.test_report import full_report
    from tests.test_server import make_lora

    make_lora(home, candidate_id, prepared)
    data = full_report() | {"candidate_id": candidate_id, "decision": decision}
    md, _ = report.render(data, Registry(home / "candidates").path(candidate_id))
    store = store_of(home)
    try:
        store.record_evaluation(
            candidate_id,
            decision=decision,
            rule=data["rule"],
            metrics={
                "reason": data["reason"],
                "candidate": {"correction_accuracy": 0.75, "general_facts": 24},
            },
            report_path=str(md),
        )
    finally:
        store.close()


@pytest.mark.slow
def test_reports_screen_lists_opens_and_promotes_after_confirming(
    home_with_model: Path, prepared_model_dir: Path
) -> None:
    candidate_id = "20261121-031500-abcdef"
    _candidate_with_report(home_with_model, prepared_model_dir, candidate_id, "reject")
    server = ServerProcess(home_with_model).wait_ready()
    opened: list[str] = []

    async def scenario() -> None:
        app = app_for(home_with_model)
        app.open_url = lambda url, **_: opened.append(url)  # no browser here
        async with app.run_test(size=WIDE) as pilot:
            await connected(pilot)
            await pilot.press("f4")
            screen = await until(
                pilot, lambda: isinstance(app.screen, ReportsScreen) and app.screen
            )
            await until(pilot, lambda: screen.rows, 10, "the candidate list")
            table = screen.query_one("#candidates")
            row = [str(cell) for cell in table.get_row_at(0)]
            assert candidate_id in row and "reject" in row and "75%" in row

            await pilot.press("enter")
            report = await until(pilot, lambda: isinstance(app.screen, ReportScreen) and app.screen)
            await until(pilot, lambda: report.detail is not None, 10, "the report")
            body = report.query_one("#report-body")
            assert candidate_id in body.source and "general-probe NLL rose" in body.source

            await pilot.press("o")
            assert opened and opened[0].startswith("file://") and opened[0].endswith("report.html")
            # Over SSH or tmux nothing opens: the path is said too.
            assert any(opened[0] in n.message for n in app._notifications), "path not shown"

            # Promote: it did not pass the gate, so the dialog says so and asks first.
            await pilot.press("p")
            dialog = await until(
                pilot, lambda: isinstance(app.screen, ConfirmScreen) and app.screen
            )
            assert "did NOT pass the gate" in dialog.detail
            # The whole detail is on screen, wrapped (it was cut: "(decision: reject, gene").
            detail = dialog.query_one(".dialog-detail")
            assert detail.size.height >= 2 and "Promote anyway?" in _shown(detail)
            await pilot.press("n")
            assert app.connection.adapter_id is None  # refused: nothing changed
            await pilot.press("p")
            await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
            await pilot.press("y")
            await until(pilot, lambda: app.connection.adapter_id == candidate_id, 30, "the swap")

            await pilot.press("escape")
            await until(pilot, lambda: isinstance(app.screen, ReportsScreen))
            await until(pilot, lambda: str(table.get_row_at(0)[0]) == "●", 10, "the serving mark")
            await pilot.press("b")
            await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
            await pilot.press("y")
            await until(pilot, lambda: app.connection.adapter_id is None, 30, "the rollback")

    try:
        run(scenario)
    finally:
        server.stop()
    actions = [p.action for p in stored(home_with_model, "list_promotions")]
    assert actions == ["rollback", "promote"]


@pytest.mark.slow
def test_memory_screen_lists_the_notes_and_forgets_one_after_confirming(
    home_with_model: Path,
) -> None:
    (home_with_model / "config.toml").write_text("[memory]\nenabled = true\n")
    with store_of(home_with_model) as store:
        cat = store.add_note("Your cat is called Mochi.", question="What is my cat's name?")
        store.add_note("You live in Lyon.", question="Which city do I live in?")
    server = ServerProcess(home_with_model).wait_ready()

    async def scenario() -> None:
        app = app_for(home_with_model)
        async with app.run_test(size=NARROW) as pilot:
            await connected(pilot)
            await pilot.press("f5")
            screen = await until(pilot, lambda: isinstance(app.screen, MemoryScreen) and app.screen)
            await until(pilot, lambda: len(screen.notes) == 2, 10, "the notes")
            table = screen.query_one("#notes")
            newest = [str(cell) for cell in table.get_row_at(0)]
            assert newest == ["active", "Which city do I live in?", "You live in Lyon."]
            assert "given to the model" in _shown(screen.query_one("#memory-info"))

            table.move_cursor(row=1)  # the cat's note
            await pilot.press("f")
            dialog = await until(
                pilot, lambda: isinstance(app.screen, ConfirmScreen) and app.screen
            )
            assert "Mochi" in dialog.detail
            await pilot.press("n")  # kept
            await until(pilot, lambda: isinstance(app.screen, MemoryScreen))
            assert len(stored(home_with_model, "list_notes")) == 2
            await pilot.press("f")
            await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
            await pilot.press("y")
            await until(pilot, lambda: len(screen.notes) == 1, 10, "the list without it")

    try:
        run(scenario)
    finally:
        server.stop()
    assert cat.id not in [n.id for n in stored(home_with_model, "list_notes")]
    assert [n.text for n in stored(home_with_model, "list_notes")] == ["You live in Lyon."]


def test_the_analysis_channel_shows_only_when_asked() -> None:
    harmony = {
        "id": "conv_harmony",
        "title": "Sum",
        "messages": [
            {"id": "msg_u", "role": "user", "content": "What is 17 + 25?"},
            {
                "id": "msg_a",
                "role": "assistant",
                "content": "42",
                "reasoning": "17 + 25: 17 + 20 = 37, plus 5 is 42.",
                "reply_to_id": "msg_u",
                "finish_reason": "stop",
            },
        ],
    }

    async def scenario() -> None:
        app = _snapshot_app()
        async with app.run_test(size=WIDE) as pilot:
            screen = chat_screen(app)
            await screen.show_conversation(harmony)
            await pilot.pause()
            reasoning = answers(app)[0].query_one(".reasoning")
            assert not reasoning.display or reasoning.region.height == 0
            await pilot.press("ctrl+t")
            await pilot.pause()
            assert reasoning.region.height >= 1
            assert "17 + 20 = 37" in str(reasoning.render())
            await pilot.press("ctrl+t")
            await pilot.pause()
            assert reasoning.region.height == 0

    run(scenario)


def test_quitting_with_feedback_not_saved_asks_first() -> None:
    async def scenario() -> None:
        app = _snapshot_app()  # nothing listens: the rating cannot be stored
        async with app.run_test(size=WIDE) as pilot:
            screen = chat_screen(app)
            await screen.show_conversation(SNAPSHOT_CONVERSATION)
            screen.transcript.focus()
            screen.transcript.select(answers(app)[0])
            await pilot.press("5")
            view = answers(app)[0]
            await until(pilot, lambda: view.answer.rating.state == "failed", 10)
            assert "NOT SAVED" in str(view.meta_line())

            await pilot.press("ctrl+q")
            dialog = await until(
                pilot, lambda: isinstance(app.screen, ConfirmScreen) and app.screen
            )
            assert "1 rating(s)/correction(s) are NOT SAVED" in dialog.question
            await pilot.press("n")
            await pilot.pause()
            assert app.is_running
            await pilot.press("ctrl+q", "y")
            await pilot.pause()
            assert not app.is_running

    run(scenario)


# ------------------------------------------------------------------------- the CLI


def test_chat_refuses_a_url_that_is_not_http(home: Path) -> None:
    result = run_cli("chat", "--home", str(home), "--url", "localhost:8321")
    assert result.returncode == 1
    assert "--url 'localhost:8321' must start with http://" in result.stderr


def test_whetstone_chat_runs_in_a_real_terminal_and_says_the_daemon_is_down(home: Path) -> None:
    import shutil
    import subprocess
    import sys

    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    session = f"whetstone-test-{os.getpid()}"
    command = f"{sys.executable} -m orchestrator.cli chat --home {home}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WHETSTONE_")}
    subprocess.run(
        ["tmux", "new-session", "-d", "-s", session, "-x", "80", "-y", "24", command],
        check=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 30
        screen = ""
        while time.monotonic() < deadline and "daemon not reachable" not in screen:
            time.sleep(0.3)
            screen = subprocess.run(
                ["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True
            ).stdout
        assert "daemon not reachable" in screen, screen
        assert "Help" in screen  # the footer shows the keys
        subprocess.run(["tmux", "send-keys", "-t", session, "C-q"], check=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            alive = subprocess.run(["tmux", "has-session", "-t", session], capture_output=True)
            if alive.returncode != 0:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("Ctrl+Q did not quit")
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


# ------------------------------------------------------------------------ snapshots

SNAPSHOT_CONVERSATION = {
    "id": "conv_snapshot",
    "title": "Capital of France",
    "system_prompt": None,
    "reasoning_effort": None,
    "messages": [
        {"id": "msg_u1", "role": "user", "content": "What is the capital of France?"},
        {
            "id": "msg_a1",
            "role": "assistant",
            "content": "The capital of France is **Paris**.",
            "reasoning": None,
            "reply_to_id": "msg_u1",
            "adapter_id": "20261121-031500-ab12cd",
            "finish_reason": "stop",
            "completion_tokens": 9,
            "latency_ms": 480.0,
            "feedback": {"rating": 4, "correction": None},
        },
        {"id": "msg_u2", "role": "user", "content": "And of Portugal?"},
        {
            "id": "msg_a2",
            "role": "assistant",
            "content": "The capital of Portugal is Lisbon. It lies on the Tagus.",
            "reasoning": None,
            "reply_to_id": "msg_u2",
            "adapter_id": "20261121-031500-ab12cd",
            "finish_reason": "stop",
            "completion_tokens": 14,
            "latency_ms": 700.0,
            "feedback": {"rating": 2, "correction": "Lisbon, on the Tagus estuary."},
        },
    ],
}


def _snapshot_app() -> WhetstoneApp:
    # Nothing listens on port 9; the state shown is set below, so the picture is stable.
    return WhetstoneApp(Api(lambda: "http://127.0.0.1:9"), retry_s=3600)


async def _show_snapshot_conversation(pilot: Pilot) -> None:
    app = pilot.app
    await until(pilot, lambda: app.connection.detail != "connecting", 10)
    app.connection = Connection(True, "http://127.0.0.1:8321", adapter_id="20261121-031500-ab12cd")
    app.sub_title = "http://127.0.0.1:8321 · 20261121-031500-ab12cd"
    screen = chat_screen(app)
    summaries = [
        {"id": "conv_snapshot", "title": "Capital of France"},
        {"id": "conv_other", "title": "Dinner ideas for Sunday"},
    ]
    screen.query_one(ConversationList).show(summaries, "conv_snapshot")
    await screen.show_conversation(SNAPSHOT_CONVERSATION)
    screen.transcript.focus()
    screen.transcript.select(answers(app)[-1])
    await pilot.pause()


def test_chat_screen_layout_80x24(snap_compare) -> None:
    assert snap_compare(
        _snapshot_app(), terminal_size=NARROW, run_before=_show_snapshot_conversation
    )


def test_chat_screen_layout_120x40(snap_compare) -> None:
    assert snap_compare(_snapshot_app(), terminal_size=WIDE, run_before=_show_snapshot_conversation)
