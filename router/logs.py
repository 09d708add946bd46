"""Structured logs: key=value text or one JSON object per line. Never log key material.

A log call passes its fields with ``extra=fields(port=6443, tenant="a")``: the text format
appends them as ``key=value`` (values with spaces quoted), the JSON format gives each its own
key, so ``jq '.port'`` works. Messages formatted with ``%s`` keep working in both formats.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any

_RESERVED = frozenset({"ts", "level", "logger", "msg", "error"})


def fields(**values: Any) -> dict[str, Any]:
    """``extra=`` for a log call: the fields of one structured line, in order."""
    return {"fields": values}


def _fields_of(record: logging.LogRecord) -> Mapping[str, Any]:
    value = getattr(record, "fields", None)
    return value if isinstance(value, Mapping) else {}


def _text_value(value: Any) -> str:
    if isinstance(value, (list, tuple, set, frozenset)):
        value = ",".join(map(str, value))
    text = "" if value is None else str(value)
    if text == "" or any(c in text for c in ' "=\n\t'):
        return json.dumps(text)
    return text


def _json_value(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_json_value(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _json_value(v) for k, v in value.items()}
    return str(value)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        extra = _fields_of(record)
        if extra:
            line += " " + " ".join(f"{k}={_text_value(v)}" for k, v in extra.items())
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _fields_of(record).items():
            doc[f"field.{key}" if key in _RESERVED else key] = _json_value(value)
        if record.exc_info:
            doc["error"] = self.formatException(record.exc_info)
        return json.dumps(doc, separators=(",", ":"))


class ChangeLogger:
    """Logs a repeated condition once, and again only when its message changes.

    ``report(msg)`` logs at the given level when ``msg`` differs from the last one reported;
    ``clear()`` (the condition went away) lets the next report through and says so once.
    """

    def __init__(self, logger: logging.Logger, level: int = logging.ERROR) -> None:
        self._logger = logger
        self._level = level
        self._last: str | None = None

    def report(self, msg: str, **values: Any) -> bool:
        if msg == self._last:
            return False
        self._last = msg
        self._logger.log(self._level, msg, extra=fields(**values) if values else None)
        return True

    def clear(self, msg: str | None = None, **values: Any) -> None:
        if self._last is not None and msg is not None:
            self._logger.info(msg, extra=fields(**values) if values else None)
        self._last = None
