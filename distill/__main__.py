"""Command line: python -m distill COMMAND [key=value ...]

Commands:
    run        generate -> train -> evaluate -> publish; finished stages are skipped on a re-run
    generate   the teacher labels the recipe's inputs -> dataset + ledger of every paid call
    train      LoRA / QLoRA fine-tune of the student on the teacher's labels
    evaluate   student vs teacher (and vs gold): agreement, confusion, coverage, cost, a pass/fail gate
    publish    merged + quantized model, model card, routing rule for a gateway
    recipes    known recipes with a one-line description (add recipe_dir=DIR to include a folder of your own)
    config     the options of every config group, one line each; `config --resolved [overrides]` prints every
               key of the composed config with its value
    ledger     teacher calls, tokens, dollars and failures of a run (run_dir=DIR)
    serve      an OpenAI-compatible gateway over a published run: student when confident, else the teacher
               (run_dir=DIR; no recipe=, the run's config.yaml holds it; serve.port=8088, serve.* keys)

Examples:
    python -m distill run recipe=support_tickets                     the embedded demo (offline, CPU)
    python -m distill run recipe=email_extraction profile=smoke run_dir=runs/emails
    python -m distill run recipe=support_tickets teacher=openai teacher.model=gpt-4o-mini   (OPENAI_API_KEY set)
    python -m distill run recipe=my_task recipe_dir=~/my_recipes     a recipe of your own (or ./recipes/)
    python -m distill evaluate recipe=support_tickets run_dir=DIR eval.gate.min_agreement=0.8
    python -m distill generate recipe=support_tickets run_dir=DIR generate.dry_run=true   the cost, nothing sent
    python -m distill serve run_dir=DIR serve.port=8088              the gateway: clients call model "support_tickets"

Overrides are Hydra overrides: group choices (teacher=openai, student=phi3_mini, profile=smoke) and keys
(train.max_steps=100, teacher.base_url=http://..., eval.gate.min_agreement=0.8).
Exit codes: 0 ok, 2 bad input or a failed stage (one line on stderr), 3 evaluate gate failed, 130 interrupted.
"""

from __future__ import annotations

import logging
import re
import signal
import sys
from pathlib import Path

from distill import DistillError, paths

COMMANDS = ("run", *paths.STAGES, "recipes", "config", "ledger", "serve")


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
    import os

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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__.strip())
        return 0
    command, overrides = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"distill: error: unknown command {command!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _dispatch(command, overrides)
    except DistillError as exc:
        from distill.pipeline import GateFailed
        from distill.stages.generate import DryRunStop

        if isinstance(exc, DryRunStop):
            print(f"distill: {exc}", file=sys.stderr)
            return 0
        print(f"distill: error: {exc}", file=sys.stderr)
        return 3 if isinstance(exc, GateFailed) else 2
    except KeyboardInterrupt:
        print("distill: interrupted; finished stages and paid teacher calls are kept", file=sys.stderr)
        return 130


def _dispatch(command: str, overrides: list[str]) -> int:
    from distill import config

    if command == "recipes":
        recipe_dir = next((o.split("=", 1)[1] for o in overrides if o.startswith("recipe_dir=")), None)
        for name, yaml_file in config.list_recipes(recipe_dir).items():
            data = config.load_yaml(yaml_file, "recipe file")
            desc = data.get("description", "") if isinstance(data, dict) else ""
            print(f"{name:24s} {desc}  [{yaml_file.parent}]")
        return 0
    if command == "config":
        if "--resolved" in overrides:
            import yaml

            cfg = config.load_config([o for o in overrides if o != "--resolved"])
            print(yaml.safe_dump(config.public_dict(cfg), sort_keys=False, allow_unicode=True), end="")
            return 0
        recipes = config.list_recipes()
        for group, options in config.group_options().items():
            print(f"{group}:  (pick one with {group}=NAME)")
            for name in options:
                path = recipes[name] if group == "recipe" else config.CONF_DIR / group / f"{name}.yaml"
                print(f"  {name:18s} {_option_line(path)}")
        print("Every key and its value: python -m distill config --resolved [overrides]")
        return 0

    if command == "serve":  # the run's own config.yaml, not a fresh composition: see distill/serve/command.py
        from distill.serve import command as serving

        cfg = serving.load_serve_config(overrides)
        _setup_logging(cfg.run_dir, _secrets(cfg) + serving.client_keys(cfg))
        return serving.serve(cfg)
    cfg = config.load_config(overrides)
    if command == "ledger":
        return _ledger(cfg)
    if command not in ("run", "generate") and not Path(cfg.run_dir).is_dir():
        raise DistillError(f"run dir {cfg.run_dir} does not exist; `{command}` works on an existing run "
                           f"(start one with `python -m distill run` or `generate`)")
    _setup_logging(cfg.run_dir, _secrets(cfg))
    from distill import pipeline

    log = logging.getLogger("distill")
    log.info("run dir: %s", cfg.run_dir)
    if command == "run":
        summaries = pipeline.run(cfg)
        ev = summaries["evaluate"]["metrics"]
        log.info("agreement with teacher %.3f | student vs gold %s | publish: %s", ev["agreement"]["exact"],
                 (ev.get("student_vs_gold") or {}).get("exact"), cfg.run_dir / "publish")
        return 0
    pipeline.save_config(cfg)
    summary = pipeline.run_stage(cfg, command)
    if command == "evaluate":
        pipeline.check_gate(summary)
    return 0


def _option_line(path: Path) -> str:
    """One line about a config option: a recipe's description, else the first comment that is not a command."""
    from distill import config

    text = config.read_text(path)
    data = config.load_yaml(path)
    if isinstance(data, dict) and data.get("description"):
        return str(data["description"])
    comments = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        comment = line.lstrip("# ").strip()
        if comment and not comment.startswith(("python -m distill", "@package")):
            comments.append(comment)
    sentence = " ".join(comments).split(". ")[0].rstrip(".")
    return sentence if len(sentence) <= 110 else sentence[:107].rsplit(" ", 1)[0] + " ..."


def _ledger(cfg) -> int:
    import json

    from distill.ledger import Ledger

    path = Path(cfg.generate.shared_ledger) if cfg.generate.shared_ledger else paths.ledger_path(cfg.run_dir)
    if not path.exists():
        raise DistillError(f"no ledger at {path}; run the generate stage first")
    with Ledger(path) as ledger:
        print(json.dumps(ledger.summary(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
