"""Structured (JSON lines) logging for the server.

Modules log through ``logging.getLogger(__name__)`` and never put patient names, IDs or
birth dates in a message; pynetdicom's own debug output, which dumps whole datasets, stays
off.
"""

from __future__ import annotations

import json
import logging
import sys
import time


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # one line per copied module
    # pydicom warns about each invalid value it parses; the listener logs one clear line per
    # rejected instance instead.
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.ERROR)
