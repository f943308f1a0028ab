"""What the user typed or wrote, read safely: settings that name environment variables (a key itself is never
taken, stored or echoed), and the user's text and YAML files (UTF-8, or one line naming the file and byte)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator

from distill import DistillError

# ---------------------------------------------------------------------------------------------------------------
# secrets: settings name environment variables; a key itself is never taken, stored or echoed

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
ENV_NAME_MAX = 64
# Prefixes of API keys as providers issue them (OpenAI, Anthropic, Groq, Hugging Face, Gemini, xAI, Perplexity,
# GitHub, Replicate, NVIDIA, Mailgun-style "key-"): followed by a long tail, the value is a key, not a name.
KEY_PREFIXES = ("sk-", "sk_", "gsk_", "hf_", "AIza", "xai-", "pplx-", "key-", "ghp_", "github_pat_", "r8_", "nvapi-")
SECRET_SUFFIXES = ("api_key", "apikey", "token", "secret", "password", "passwd")


def looks_like_key(value: Any) -> bool:
    """True for a string shaped like an API key: a known key prefix with a long tail, or a run of 20+ letters and
    digits mixed (no environment-variable name or word looks like that)."""
    if not isinstance(value, str):
        return False
    v = value.strip()
    if any(v.startswith(p) and re.search(r"[A-Za-z0-9]{16,}", v[len(p):]) for p in KEY_PREFIXES):
        return True
    return any(len(run) >= 20 and any(c.isdigit() for c in run) and any(c.isalpha() for c in run)
               for run in re.split(r"[^A-Za-z0-9]+", v))


def is_secret_setting(key: str) -> bool:
    """A setting whose value would be a secret (``teacher.api_key``, ``...token``, ``...password``)."""
    last = key.rsplit(".", 1)[-1].lower().replace("-", "_")
    return last.endswith(SECRET_SUFFIXES)


def _hides_value(key: str, value: Any) -> bool:
    """Never echo this value in a message: a secret setting, an env-var-name setting, or a key-shaped value."""
    last = key.rsplit(".", 1)[-1].lower()
    return is_secret_setting(key) or last.endswith("_env") or looks_like_key(value)


def env_name_problem(value: str) -> str | None:
    """Why ``value`` is not the name of an environment variable, without repeating it (it may be the key)."""
    if looks_like_key(value):
        return "looks like an API key, not the NAME of an environment variable"
    if not _ENV_NAME.fullmatch(value) or len(value) > ENV_NAME_MAX:
        return (f"is not the NAME of an environment variable (letters, digits and _, not starting with a digit, at "
                f"most {ENV_NAME_MAX} characters)")
    return None


def _check_env_name(value: str | None) -> str | None:
    if value is not None and (problem := env_name_problem(value)):
        raise ValueError(f"{problem}; the value is not shown. Put the key in an environment variable and name it "
                         f"here, e.g. export OPENAI_API_KEY=... and set this to OPENAI_API_KEY")
    return value


EnvName = Annotated[str | None, AfterValidator(_check_env_name)]  # a setting naming an environment variable


def read_secret_env(name: str, setting: str) -> str | None:
    """The secret in environment variable ``name`` (named by ``setting``), or None when unset or empty."""
    return clean_secret(os.environ.get(name), name, setting)


def clean_secret(raw: str | None, name: str, setting: str) -> str | None:
    """A secret as read from environment variable ``name`` (named by ``setting``); None when unset or empty.

    Surrounding whitespace (a trailing newline from ``$(cat key.txt)`` or a copied line) is stripped with a
    warning; whitespace or control characters inside, or characters an HTTP header cannot carry, are refused.
    The value never appears in a message or a log record.
    """
    import logging

    if raw is None or not raw.strip():
        return None
    key = raw.strip()
    if key != raw:
        logging.getLogger("distill").warning(
            "the key in $%s (%s) had surrounding whitespace (a trailing newline?); it was stripped", name, setting)
    if any(c.isspace() or not c.isprintable() for c in key):
        raise DistillError(f"the key in ${name} ({setting}) has whitespace or control characters inside it; the "
                           f"value is not shown. Set it again as one unbroken line: export {name}='...'")
    if not key.isascii():
        raise DistillError(f"the key in ${name} ({setting}) holds non-ASCII characters (a pasted quote or dash?), "
                           f"which an HTTP header cannot carry; the value is not shown. Copy the key again")
    return key


# ---------------------------------------------------------------------------------------------------------------
# text files the user wrote: UTF-8 (a BOM is fine), or one line naming the file and byte


def utf8_problem(path: Path) -> str:
    """Where the file stops being UTF-8: for a one-line message (call after a UnicodeDecodeError)."""
    data = Path(path).read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        return (f"{path}: not UTF-8 text: byte 0x{data[exc.start]:02x} at byte offset {exc.start} (line {line}, "
                f"byte {column} of the line); save the file as UTF-8 (e.g. iconv -f cp1252 -t utf-8 OLD > NEW)")
    return f"{path}: not UTF-8 text; save the file as UTF-8"


def read_text(path: Path) -> str:
    """A user's text file as UTF-8 (a leading BOM removed); DistillError naming the byte that is not UTF-8."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DistillError(utf8_problem(path)) from None


def _strict_loader():
    import yaml

    class StrictLoader(yaml.SafeLoader):
        """SafeLoader that refuses a mapping key given twice (PyYAML silently keeps the last one)."""

    def construct_mapping(loader, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = loader.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the constructor reports it
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (first on line {first}); YAML would keep only the last "
                                f"one, so delete or rename one of them", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return StrictLoader


def load_yaml(path: Path, what: str = "YAML file") -> Any:
    """Parse a user's YAML file strictly: malformed YAML, a duplicate key or bad UTF-8 -> one-line DistillError
    naming the file and line."""
    import yaml

    text = read_text(path)
    try:
        return yaml.load(text, Loader=_strict_loader())  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = str(getattr(exc, "problem", None) or type(exc).__name__)
        context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        if context:
            problem += f" {context}" + (f" that starts on line {context_mark.line + 1}" if context_mark else "")
        problem = " ".join(problem.split())
        if "appears twice" not in problem:
            problem += " (fix the YAML there: a value holding ': ', '#' or a leading '*', '&', '{' needs quotes)"
        raise DistillError(f"{what} {path}{where}: {problem}") from None
