"""The lowest layer beside config.py: atomic file writes, strict JSON, progress lines. Used
by every layer above; imports nothing of the package but the config."""
