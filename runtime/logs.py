"""What every command line shares, importing nothing but the standard library (bench/gpu_check.py runs where
the runtime's own requirements may be missing): its parser (``--help`` with defaults, named after the command
that runs it) and its log output, text lines for a terminal or one JSON object per line (``--log-format json``)
for a log collector, which would otherwise have to parse free text and split multi-line tracebacks."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import datetime, timezone

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(levelname)s: %(message)s"

# The attributes every LogRecord has; anything else on a record came from ``extra=`` and goes into the JSON.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "message"}`` (+ ``exception``, + the record's ``extra`` fields), one line."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in out:
                out[key] = value
        return json.dumps(out, ensure_ascii=False, default=str)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each flag's default, unless there is none to show (None, an off switch) or its help
    already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def command_parser(description: str, **kwargs) -> argparse.ArgumentParser:
    """A command line's parser, with ``--log-format``. No fixed ``prog``: usage names the command that ran,
    ``scan-search`` installed, ``search.py`` in a clone."""
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter, **kwargs)
    add_log_format_argument(p)
    return p


def add_log_format_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="text",
        help="log lines on stderr: text, or json (one object per line: time, level, logger, message)",
    )


def setup_logging(level: int | str = logging.WARNING, log_format: str = "text", text_format: str = TEXT_FORMAT) -> None:
    """Log to stderr at ``level`` in ``log_format``; like ``logging.basicConfig``, a no-op when the root logger
    already has handlers (a host program's, or pytest's)."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(text_format))
    if isinstance(level, str):
        level = level.upper()
    logging.basicConfig(level=level, handlers=[handler])
