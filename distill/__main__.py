"""Command line: python -m distill COMMAND [key=value ...]

    python -m distill run recipe=support_tickets                     generate -> train -> evaluate -> publish
    python -m distill run recipe=support_tickets profile=smoke run_dir=runs/smoke
    python -m distill {generate,train,evaluate,publish} recipe=NAME run_dir=DIR
    python -m distill recipes                                        known recipes, one line each
    python -m distill config                                         options of every config group
    python -m distill ledger run_dir=DIR                             teacher calls, tokens, dollars, failures

Overrides are Hydra overrides: group choices (teacher=openai, student=phi3_mini, profile=smoke) and keys
(train.max_steps=100, teacher.base_url=http://..., eval.gate.min_agreement=0.8).
Exit codes: 0 ok, 2 bad input or a failed stage (one line on stderr), 3 evaluate gate failed, 130 interrupted.
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

from distill import DistillError, paths

COMMANDS = ("run", *paths.STAGES, "recipes", "config", "ledger")


def _setup_logging(run_dir: Path | None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(run_dir) / "distill.log", encoding="utf-8"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        handlers=handlers, force=True)
    for noisy in ("httpx", "httpx2", "openai", "urllib3", "filelock", "datasets"):
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
            import yaml

            desc = (yaml.safe_load(yaml_file.read_text()) or {}).get("description", "")
            print(f"{name:24s} {desc}  [{yaml_file.parent}]")
        return 0
    if command == "config":
        for group, options in config.group_options().items():
            print(f"{group:8s} {', '.join(options)}")
        return 0

    cfg = config.load_config(overrides)
    if command == "ledger":
        return _ledger(cfg)
    if command not in ("run", "generate") and not Path(cfg.run_dir).is_dir():
        raise DistillError(f"run dir {cfg.run_dir} does not exist; `{command}` works on an existing run "
                           f"(start one with `python -m distill run` or `generate`)")
    _setup_logging(cfg.run_dir)
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
