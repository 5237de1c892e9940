"""The bottom layer every room imports and which imports none of them: configuration, the
home layout, GPU facts, the device plan, atomic file writes, the daemon's run state and the
template renderer (reports and pages from common/templates)."""
