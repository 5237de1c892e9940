"""The TUI's screens: chat, status, reports, help and small dialogs."""
