"""The plugin's user-facing error type.

vLLM catches and re-wraps exceptions in several places (pydantic validation of the engine config,
the engine-core process' start-up); a ``ValueError`` subclass keeps its one-line message intact in
all of them, and subclassing :class:`rcsr_deploy.errors.RcsrError` lets the ``rcsr`` CLI print it as
``error: ...``.
"""
from __future__ import annotations

from rcsr_deploy.errors import RcsrError


class RcsrPluginError(RcsrError, ValueError):
    """A problem with an rcsr checkpoint or the plugin's settings (message = one line)."""

    def __init__(self, message: str):
        super().__init__("rcsr: " + message if not message.startswith("rcsr: ") else message)
