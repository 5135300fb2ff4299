"""The config layer's error, importable by every layer (the entry points, the Lightning side, the scripts)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A composed config with an out-of-range value, an impossible combination or an unknown option."""
