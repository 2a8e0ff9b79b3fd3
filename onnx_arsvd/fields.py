"""Option fields: a dataclass field that also says how the CLI offers it (flag, help, kind, parsing)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import field
from typing import Any

__all__ = ["option", "option_flag"]


def option(default: Any = None, help: str = "", *, flag: str | None = None, metavar: str | None = None,  # noqa: A002
           choices: tuple[str, ...] | None = None, kind: str = "value", parse: Callable[[Any], Any] | None = None,
           default_text: str | None = None, cli: bool = True, factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field with what the CLI needs to offer it: its ``flag`` (default ``--field-name``), ``help``,
    ``kind`` ("value", "switch" for a flag that sets True, "off" for one that sets False, "repeat" for a flag
    given any number of times), ``parse`` (text to value) and the default as the help shows it."""
    metadata = {"help": help, "flag": flag, "metavar": metavar, "choices": choices, "kind": kind, "parse": parse,
                "default_text": default_text, "cli": cli}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def option_flag(name: str, metadata: Mapping[str, Any]) -> str:
    """The CLI flag of a field."""
    return metadata.get("flag") or "--" + name.replace("_", "-")
