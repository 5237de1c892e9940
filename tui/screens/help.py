"""F1: every key, by where it works."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown

HELP = """\
# whetstone keys

| anywhere | |
|---|---|
| F1 | this help |
| F2 / F3 / F4 / F5 | chat / status / reports / memory |
| Ctrl+Q | quit |

| chat: the message box | |
|---|---|
| Enter | send |
| Ctrl+J (or Shift/Alt+Enter where the terminal sends them) | new line |
| Esc | stop the answer that is coming; otherwise pick the latest answer |
| Up (box empty) | pick the latest answer |
| Ctrl+N | new conversation |
| Ctrl+B | show / hide the conversation list |
| Ctrl+F | search the conversations (the box above the list) |
| Ctrl+O | system prompt and reasoning effort of this conversation |
| Ctrl+T | show / hide the analysis channel (harmony models) |

| chat: a picked answer | |
|---|---|
| Up / Down | previous / next answer |
| 1 … 5 | rate it (saved at once; shown on the answer) |
| c | correct it: edit the answer you wanted, Ctrl+S saves |
| r | regenerate: another answer to the same message (both are kept) |
| Esc or i | back to the message box |

| conversation list | |
|---|---|
| Enter | open |
| n / e / d | new / rename / delete (forget) |

| search box (above the list) | |
|---|---|
| typing | lists only the conversations whose messages or title hold those words |
| Enter | open the newest match |
| Down | to the matches |
| Esc | clear: the whole list again |

| status | |
|---|---|
| t | train a candidate now |
| r | refresh |

| reports | |
|---|---|
| Enter | open the report |
| p | promote (asks first) |
| b | roll back to the previous adapter (asks first) |
| o | open the HTML report (with plots) in the browser |

| memory | |
|---|---|
| f | forget the note (asks first) |
| r | refresh |

A rating or correction that could not be stored says **NOT SAVED** on the answer; it is
retried when the daemon is back, or press the key again.
"""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,f1,q", "app.pop_screen", "Close", key_display="esc")]

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="dialog wide", id="help"):
            yield Markdown(HELP)
