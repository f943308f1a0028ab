"""Logging for a command: stderr and <run_dir>/distill.log, through a filter that never lets a key through.

    _setup_logging(run_dir, _secrets(cfg))
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

# HTTP stacks log request headers, failed header values and request options at DEBUG: never below WARNING.
HTTP_LOGGERS = ("httpx", "httpx2", "httpcore", "h11", "h2", "hpack", "openai", "anthropic", "aiohttp", "urllib3",
                "requests", "huggingface_hub", "websockets")
_BEARER = re.compile(r"(?i)\b(authorization|api[-_]?key|x-api-key|bearer|token)\b(['\"]?\s*[:=]?\s*['\"]?)"
                     r"(bearer\s+)?([^\s'\",;)\]}]{8,})")
_DIGEST = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")  # sha1 / sha256 hex (request keys, fingerprints): not secrets


class SecretScrubber(logging.Filter):
    """Replace the given secrets, ``Authorization: Bearer ...`` values and key-shaped words in every record (its
    message, arguments and traceback) by ***, so nothing a handler writes holds a key, whatever the level."""

    def __init__(self, secrets=()):
        super().__init__()
        self.secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def scrub(self, text: str) -> str:
        from distill.config import looks_like_key

        for secret in self.secrets:
            text = text.replace(secret, "***")
        text = _BEARER.sub(lambda m: f"{m.group(1)}{m.group(2)}{m.group(3) or ''}***", text)
        return re.sub(r"[A-Za-z0-9_\-]{20,}", lambda m: "***" if looks_like_key(m.group())
                      and not _DIGEST.fullmatch(m.group()) else m.group(), text)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: keep what can be shown
            message = str(record.msg)
        record.msg, record.args = self.scrub(message), None
        if record.exc_info:
            text = record.exc_text or logging.Formatter().formatException(record.exc_info)
            record.exc_text, record.exc_info = self.scrub(text), None
        elif record.exc_text:
            record.exc_text = self.scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = self.scrub(record.stack_info)
        return True


def _secrets(cfg) -> list[str]:
    """The values of the environment variables the config names for keys (raw and stripped), to scrub from logs."""
    names = [cfg.teacher.api_key_env, cfg.eval.endpoint.api_key_env]
    values = [os.environ.get(n) for n in names if n]
    return [v for raw in values if raw for v in (raw, raw.strip())]


def _setup_logging(run_dir: Path | None, secrets=()) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(run_dir) / "distill.log", encoding="utf-8"))
    scrubber = SecretScrubber(secrets)
    for handler in handlers:
        handler.addFilter(scrubber)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        handlers=handlers, force=True)
    for noisy in (*HTTP_LOGGERS, "filelock", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _on_sigterm(signum, frame):  # turn SIGTERM into an exception so context managers stop child servers
    raise KeyboardInterrupt
