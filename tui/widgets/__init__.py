"""The TUI's widgets: the transcript and its messages, the message box, the sidebar."""
