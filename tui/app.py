"""The terminal UI: chat, rate, correct, watch training, review promotions.

    whetstone chat [--home H] [--url URL]
    python -m tui [--home H] [--url URL]

It talks only HTTP to the daemon's API worker (found through the home's run/server.json,
or the URL given) and keeps working while the daemon is away: it says so and retries.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from textual import work
from textual.app import App
from textual.binding import Binding
from textual.reactive import reactive

from common.config import Settings, load_settings
from tui.client import Api, ApiRefused, DaemonUnreachable, home_locator
from tui.screens.chat import ChatScreen
from tui.screens.dialogs import ConfirmScreen
from tui.screens.help import HelpScreen
from tui.screens.memory import MemoryScreen
from tui.screens.reports import ReportsScreen
from tui.screens.status import StatusScreen

RETRY_S = 2.0


@dataclass(frozen=True)
class Connection:
    up: bool
    url: str
    detail: str = ""  # why not, while down
    adapter_id: str | None = None
    retry_s: float = RETRY_S


class WhetstoneApp(App[None]):
    CSS_PATH = "app.tcss"
    TITLE = "whetstone"
    # Every action has a key in the footer or the help screen (F1); the palette's slot in
    # the footer is worth more at 80 columns.
    ENABLE_COMMAND_PALETTE = False
    # Below 100 columns the conversation list hides (Ctrl+B shows it).
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (100, "-wide")]
    MODES = {
        "chat": ChatScreen,
        "status": StatusScreen,
        "reports": ReportsScreen,
        "memory": MemoryScreen,
    }
    DEFAULT_MODE = "chat"
    BINDINGS = [
        Binding("f1", "help", "Help"),
        Binding("f2", "switch_mode('chat')", "Chat"),
        Binding("f3", "switch_mode('status')", "Status"),
        Binding("f4", "switch_mode('reports')", "Reports"),
        Binding("f5", "switch_mode('memory')", "Memory"),
        Binding("ctrl+q", "quit", "Quit", key_display="^q"),
    ]

    connection: reactive[Connection] = reactive(Connection(False, "", "connecting"))

    def __init__(self, api: Api, *, retry_s: float = RETRY_S) -> None:
        super().__init__()
        self.api = api
        self.retry_s = retry_s

    def on_mount(self) -> None:
        self.set_interval(self.retry_s, self.check_connection)
        self.check_connection()

    async def on_unmount(self) -> None:
        await self.api.close()

    @work(exclusive=True, group="connection")
    async def check_connection(self) -> None:
        url = self.api.url
        try:
            health = await self.api.health()
        except (DaemonUnreachable, ApiRefused) as exc:
            detail = exc.message if isinstance(exc, ApiRefused) else "nothing answers"
            self.connection = Connection(False, url, detail, retry_s=self.retry_s)
            self.sub_title = "daemon not reachable"
            return
        self.connection = Connection(True, url, adapter_id=health.get("adapter_id"))
        self.sub_title = f"{url} · {health.get('adapter_id') or 'base model'}"

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # The footer offers the other screens, not the one already shown.
        return not (action == "switch_mode" and parameters and parameters[0] == self.current_mode)

    async def action_quit(self) -> None:
        """Quit; first ask when feedback the daemon has not stored would be lost."""
        unsaved = sum(len(fields) for fields in self._chat().unsaved.values())
        if not unsaved:
            self.exit()
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self.exit()

        self.push_screen(
            ConfirmScreen(
                f"{unsaved} rating(s)/correction(s) are NOT SAVED: quit and lose them?",
                "They are sent as soon as the daemon answers again; wait for the ✓ to keep them.",
            ),
            answered,
        )

    def _chat(self) -> ChatScreen:
        return next(s for s in self.get_screen_stack("chat") if isinstance(s, ChatScreen))

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="The whetstone terminal UI.")
    parser.add_argument("--home", type=Path, default=None)
    parser.add_argument("--url", default=None, help="the API worker's URL (default: the home's)")
    args = parser.parse_args(argv)
    WhetstoneApp(make_api(load_settings(args.home), args.url)).run()
    return 0


def make_api(settings: Settings, url: str | None) -> Api:
    """The client for a home's daemon, or for `url` (with the home's token, if any)."""
    locate, token = home_locator(settings)
    if url is not None:
        fixed = url.rstrip("/")
        return Api(lambda: fixed, token)
    return Api(locate, token)
