"""Command line: python -m distill COMMAND [key=value ...]

The commands are the entries of ``COMMANDS``: each is one ``@command(...)`` over its handler, with its one-line
summary, what it does, the config groups it reads and examples; ``--help`` (top level and per command) is printed
from that table, so a new command is one decorated function. Everything after the command is a Hydra override
(``key=value`` or ``group=option``); distill has no ``--flags`` besides ``-h/--help`` and ``config --resolved``.
Exit codes: 0 ok, 2 bad input or a failed stage (one line on stderr), 3 evaluate gate failed, 130 interrupted.
"""

from __future__ import annotations

import difflib
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from distill import DistillError, GateFailed, paths
from distill.logs import _on_sigterm, _secrets, _setup_logging

HELP_FLAGS = ("-h", "--help")


@dataclass(frozen=True)
class Command:
    name: str
    summary: str                  # one line in the command list
    about: str                    # what it does, for ``COMMAND --help``
    handler: Callable[[str, list[str]], int]
    groups: tuple[str, ...] = ()  # config groups whose keys it reads (listed in its help)
    examples: tuple[str, ...] = ()
    needs_run_dir: bool = False   # works on an existing run: run_dir=DIR must be given
    flags: tuple[str, ...] = ()   # the --flags it takes besides -h/--help


COMMANDS: dict[str, Command] = {}


def command(name: str, summary: str, about: str, *, groups=(), examples=(), needs_run_dir=False, flags=()):
    """Register ``handler(name, overrides) -> exit code`` as the command ``name``."""

    def register(handler):
        COMMANDS[name] = Command(name, summary, about, handler, tuple(groups), tuple(examples), needs_run_dir,
                                 tuple(flags))
        return handler

    return register


EXAMPLES = (
    ("python -m distill run recipe=support_tickets", "the embedded demo (offline, CPU)"),
    ("python -m distill run recipe=email_extraction profile=smoke run_dir=runs/emails", ""),
    ("python -m distill run recipe=support_tickets teacher=openai teacher.model=gpt-4o-mini", "(OPENAI_API_KEY set)"),
    ("python -m distill run recipe=my_task recipe_dir=~/my_recipes", "a recipe of your own (or ./recipes/)"),
    ("python -m distill evaluate recipe=support_tickets run_dir=DIR eval.gate.min_agreement=0.8", ""),
    ("python -m distill generate recipe=support_tickets run_dir=DIR generate.dry_run=true", "the cost, nothing sent"),
    ("python -m distill serve run_dir=DIR serve.port=8088", "the gateway: clients call model \"support_tickets\""),
)


def main_help() -> str:
    width = max(len(name) for name in COMMANDS) + 2
    lines = ["Command line: python -m distill COMMAND [key=value ...]", "", "Commands:"]
    lines += [f"    {name:{width}s} {c.summary}" for name, c in COMMANDS.items()]
    lines += ["", "Examples:"]
    lines += [f"    {cmd}" + (f"   {note}" if note else "") for cmd, note in EXAMPLES]
    lines += ["", "Overrides are Hydra overrides, key=value (no --flags): group choices (teacher=openai, "
              "student=phi3_mini,", "profile=smoke) and keys (train.max_steps=100, teacher.base_url=http://..., "
              "eval.gate.min_agreement=0.8).", "`python -m distill COMMAND --help` explains one command; "
              "`python -m distill config --resolved` prints every key.",
              "Exit codes: 0 ok, 2 bad input or a failed stage (one line on stderr), 3 evaluate gate failed, "
              "130 interrupted."]
    return "\n".join(lines)


def command_help(c: Command) -> str:
    from distill.config import Config

    run_dir = " run_dir=DIR" if c.needs_run_dir else ""
    lines = [f"usage: python -m distill {c.name}{run_dir} [key=value ...]"
             + "".join(f" [{f}]" for f in c.flags), "", c.summary[0].upper() + c.summary[1:] + ".", "", c.about]
    if c.groups:
        lines += ["", "Keys it reads (set any with group.key=value; `python -m distill config --resolved` shows "
                      "their values):"]
        for group in c.groups:
            field = Config.model_fields[group]
            keys = getattr(field.annotation, "model_fields", None)
            lines.append(f"  {group}: " + (", ".join(keys) if keys else f"{group}=VALUE"))
    if c.examples:
        lines += ["", "Examples:"] + [f"    {e}" for e in c.examples]
    return "\n".join(lines)


def _flag_hint(flag: str, following: str | None, c: Command) -> str:
    """One line for a ``--flag`` given where distill wants ``key=value``."""
    key, eq, value = flag.lstrip("-").partition("=")
    if not eq and following and "=" not in following and not following.startswith("-"):
        value = following
    example = f"{key}={value or 'VALUE'}"
    takes = f" ({c.name} takes {', '.join(c.flags)}; everything else is key=value)" if c.flags else ""
    return f"{flag}: distill takes key=value overrides, not --flags: write {example}{takes}"


def _check_arguments(c: Command, overrides: list[str]) -> None:
    """Refuse --flags and bare words with a hint, and a missing run_dir= where the command needs a run."""
    for i, item in enumerate(overrides):
        if item.startswith("--") and item not in c.flags:
            following = overrides[i + 1] if i + 1 < len(overrides) else None
            raise DistillError(_flag_hint(item, following, c))
        if "=" not in item and not item.startswith(("~", "-")):
            raise DistillError(f"{item!r} is not an override: write key=value (profile=smoke, train.max_steps=100) "
                               f"or group=option (teacher=openai)")
    if c.needs_run_dir and not any(o.split("=", 1)[0] == "run_dir" and o.split("=", 1)[1] for o in overrides):
        raise DistillError(f"{c.name} needs run_dir=DIR: the folder of an existing run (made by `python -m distill "
                           f"run ...`), e.g. python -m distill {c.name} run_dir=runs/support_tickets/<timestamp>")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        code = _main(argv)
        sys.stdout.flush()  # here, so a closed pipe (`config | head -1`) is caught below, not at exit
        return code
    except BrokenPipeError:  # the reader stopped reading: not an error, and no traceback at exit either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _main(argv: list[str]) -> int:
    if not argv or argv[0] in (*HELP_FLAGS, "help"):
        topic = argv[1] if len(argv) > 1 and argv[0] == "help" else None
        print(command_help(COMMANDS[topic]) if topic in COMMANDS else main_help())
        return 0
    name, overrides = argv[0], argv[1:]
    if name not in COMMANDS:
        if name.startswith("-"):
            problem = f"{name}: give a command first, then key=value overrides (not --flags)"
        else:
            close = difflib.get_close_matches(name, list(COMMANDS), n=1)
            problem = f"unknown command {name!r}" + (f" (did you mean {close[0]}?)" if close else "")
        print(f"distill: error: {problem}; commands: {', '.join(COMMANDS)} (python -m distill --help)",
              file=sys.stderr)
        return 2
    c = COMMANDS[name]
    if any(o in HELP_FLAGS for o in overrides):
        print(command_help(c))
        return 0
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        _check_arguments(c, overrides)
        return c.handler(name, overrides)
    except DistillError as exc:
        print(f"distill: error: {exc}", file=sys.stderr)
        return 3 if isinstance(exc, GateFailed) else 2
    except KeyboardInterrupt:
        print("distill: interrupted; finished stages and paid teacher calls are kept", file=sys.stderr)
        return 130


# ---------------------------------------------------------------------------------------------------------------
# the commands, in the order --help lists them

_KEEP = ("Re-running with the same run_dir skips every stage whose fingerprint still matches. On an existing run the "
         "overrides that made it (run_dir/overrides.yaml) apply first and the given ones on top, key by key.")


def _stage(name: str, overrides: list[str]) -> int:
    from distill import config, pipeline
    from distill.teacher.pricing import DryRun

    overrides, inherited = pipeline.run_overrides(overrides)  # an existing run: its own overrides come first
    cfg = config.load_config(overrides)
    if name not in ("run", "generate") and not Path(cfg.run_dir).is_dir():
        raise DistillError(f"run dir {cfg.run_dir} does not exist; `{name}` works on an existing run "
                           f"(start one with `python -m distill run` or `generate`)")
    stages = paths.STAGES if name == "run" else (name,)
    config.check_startup(cfg, stages)  # before the run dir or its log exist
    if name != "run":
        # Nor is anything written when the stage cannot run on what is there.
        pipeline.check_upstream(cfg, name, recorded=(Path(cfg.run_dir) / paths.OVERRIDES_YAML).is_file())
    _setup_logging(cfg.run_dir, _secrets(cfg))
    log = logging.getLogger("distill")
    log.info("run dir: %s", cfg.run_dir)
    if inherited:
        log.info("the run's own overrides apply first (%s): %s", paths.OVERRIDES_YAML, " ".join(inherited))
    if name == "run":
        summaries = pipeline.run(cfg, overrides=overrides)
        if isinstance(summaries.get("generate"), DryRun):  # a success: the estimate is the answer
            print(f"distill: {summaries['generate']}", file=sys.stderr)
            return 0
        ev = summaries["evaluate"]["metrics"]
        log.info("agreement with teacher %.3f | student vs gold %s | publish: %s", ev["agreement"]["exact"],
                 (ev.get("student_vs_gold") or {}).get("exact"), cfg.run_dir / "publish")
        return 0
    pipeline.save_config(cfg, overrides)
    summary = pipeline.run_stage(cfg, name)
    if isinstance(summary, DryRun):
        print(f"distill: {summary}", file=sys.stderr)
        return 0
    if name == "evaluate":
        pipeline.check_gate(summary)
    return 0


command("run", "generate -> train -> evaluate -> publish; finished stages are skipped on a re-run",
        "Runs the four stages in order in run_dir (default runs/<recipe>/<timestamp>). Every config check of every "
        "stage runs first, so a bad setting fails in a second, before the teacher is paid. Stops before publish "
        f"when the evaluate gate fails (exit 3; publish.force=true publishes anyway). {_KEEP}",
        groups=("recipe", "teacher", "student", "train", "generate", "eval", "publish"),
        examples=("python -m distill run recipe=support_tickets",
                  "python -m distill run recipe=support_tickets profile=smoke run_dir=runs/smoke",
                  "python -m distill run recipe=support_tickets teacher=openai teacher.model=gpt-4o-mini"))(_stage)
command("generate", "the teacher labels the recipe's inputs -> dataset + ledger of every paid call",
        "Reads the recipe's inputs (or has the teacher write them: generate.source=synthesize), drops duplicates, "
        "estimates the cost, then labels under generate.budget_usd and splits train/val/test. Every paid answer "
        "is in generate/ledger.sqlite the moment it arrives, so nothing is ever paid twice.",
        groups=("recipe", "teacher", "generate"),
        examples=("python -m distill generate recipe=support_tickets run_dir=DIR generate.dry_run=true",
                  "python -m distill generate recipe=support_tickets run_dir=DIR teacher=openai "
                  "teacher.model=gpt-4o-mini generate.budget_usd=5"))(_stage)
command("train", "LoRA / QLoRA fine-tune of the student on the teacher's labels",
        "Trains the student on generate's train split (validation loss on val), resuming from the newest "
        "checkpoint that was trained with the same settings and data. Needs a finished generate in run_dir.",
        groups=("student", "train"), needs_run_dir=True,
        examples=("python -m distill train recipe=support_tickets run_dir=DIR train.max_steps=100",
                  "python -m distill train run_dir=DIR student=phi3_mini train=qlora   (CUDA)"))(_stage)
command("evaluate", "student vs teacher (and vs gold): agreement, confusion, coverage, cost, a pass/fail gate",
        "Scores the trained student (or a served model: eval.endpoint.base_url=URL eval.endpoint.model=M) on the "
        "held-out split: agreement with the teacher and accuracy vs gold with intervals, calibration, coverage, "
        "cost. Writes evaluate/report.md and results.json; exits 3 when a gate threshold (eval.gate.*, "
        "eval.baseline) is missed.",
        groups=("eval",), needs_run_dir=True,
        examples=("python -m distill evaluate recipe=support_tickets run_dir=DIR eval.gate.min_agreement=0.8",
                  "python -m distill evaluate run_dir=DIR eval.baseline=main/results.json",
                  "python -m distill evaluate run_dir=DIR eval.endpoint.base_url=http://127.0.0.1:8080/v1 "
                  "eval.endpoint.model=student"))(_stage)
command("publish", "merged + quantized model, model card, routing rule for a gateway",
        "Merges the adapter, quantizes GGUFs with llama.cpp, checks each artifact's parity with the student, and "
        "writes publish/routing.yaml (the confidence threshold that keeps publish.target_agreement), serving "
        "snippets and MODEL_CARD.md.",
        groups=("publish",), needs_run_dir=True,
        examples=("python -m distill publish run_dir=DIR publish.target_agreement=0.98",))(_stage)


@command("recipes", "known recipes with a one-line description (add recipe_dir=DIR to include a folder of your own)",
         "Lists every recipe distill finds: recipe_dir=DIR first, then ./recipes, then the packaged ones (the first "
         "of a name wins). A recipe is NAME.yaml + a folder NAME/ with its inputs and prompts.",
         examples=("python -m distill recipes", "python -m distill recipes recipe_dir=~/my_recipes"))
def _recipes(name: str, overrides: list[str]) -> int:
    from distill import config

    recipe_dir = next((o.split("=", 1)[1] for o in overrides if o.startswith("recipe_dir=")), None)
    for recipe, yaml_file in config.list_recipes(recipe_dir).items():
        data = config.load_yaml(yaml_file, "recipe file")
        desc = data.get("description", "") if isinstance(data, dict) else ""
        print(f"{recipe:24s} {desc}  [{yaml_file.parent}]")
    return 0


@command("config", "the options of every config group; `config --resolved [overrides]`: every key and its value",
         "Without --resolved: each config group and its options (pick one with group=option). With --resolved: "
         "the whole config the overrides compose, validated, as YAML (what a run writes to config.yaml).",
         examples=("python -m distill config", "python -m distill config --resolved teacher=openai profile=smoke"),
         flags=("--resolved",))
def _config(name: str, overrides: list[str]) -> int:
    from distill import config

    if "--resolved" in overrides:
        import yaml

        cfg = config.load_config([o for o in overrides if o != "--resolved"])
        print(yaml.safe_dump(config.public_dict(cfg), sort_keys=False, allow_unicode=True), end="")
        return 0
    if overrides:
        # the listing takes no overrides; a mistyped one is still named, as `run` would name it
        config.load_config(overrides)
    recipes = config.list_recipes()
    for group, options in config.group_options().items():
        print(f"{group}:  (pick one with {group}=NAME)")
        for option in options:
            path = recipes[option] if group == "recipe" else config.CONF_DIR / group / f"{option}.yaml"
            print(f"  {option:18s} {_option_line(path)}")
    print("Every key and its value: python -m distill config --resolved [overrides]")
    return 0


@command("ledger", "teacher calls, tokens, dollars and failures of a run (run_dir=DIR)",
         "Prints the summary of the run's teacher ledger (generate/ledger.sqlite, or generate.shared_ledger): "
         "calls, tokens, dollars, failures, as JSON.",
         groups=("generate",), needs_run_dir=True, examples=("python -m distill ledger run_dir=DIR",))
def _ledger_command(name: str, overrides: list[str]) -> int:
    from distill import config

    return _ledger(config.load_config(overrides))


@command("serve", "an OpenAI-compatible gateway over a published run: student when confident, else the teacher",
         "Serves POST /v1/chat/completions, /v1/models, /healthz and /metrics, applying publish/routing.yaml to "
         "each request. No recipe=: the run's config.yaml holds it; set serve.* keys (and single keys of the "
         "run's config such as teacher.base_url=URL).",
         groups=("serve",), needs_run_dir=True,
         examples=("python -m distill serve run_dir=DIR serve.port=8088",
                   "python -m distill serve run_dir=DIR run_dir=DIR2   (both runs' tasks side by side)",
                   "python -m distill serve run_dir=DIR serve.student_endpoint=http://127.0.0.1:8090/v1"))
def _serve(name: str, overrides: list[str]) -> int:
    from distill.serve import command as serving  # the runs' own config.yaml, not a fresh composition

    cfgs = serving.load_serve_configs(overrides)
    _setup_logging(cfgs[0].run_dir, [s for cfg in cfgs for s in _secrets(cfg)] + serving.client_keys(cfgs[0]))
    return serving.serve(cfgs)


@command("calibrate-cache", "the semantic cache's similarity threshold, measured on the run's held-out items",
         "Matches each val/test item to its nearest train item (MiniLM), measures the hit rate and the false-hit "
         "rate (the neighbour's teacher answer differs) at each threshold, and writes serve/cache_calibration.json "
         "with the lowest threshold whose false-hit upper 95% bound is <= serve.semantic_cache.max_false_hit "
         "(none: the cache stays off); serve reads it.",
         groups=("serve",), needs_run_dir=True,
         examples=("python -m distill calibrate-cache run_dir=DIR",
                   "python -m distill calibrate-cache run_dir=DIR serve.semantic_cache.max_false_hit=0.02"))
def _calibrate_cache(name: str, overrides: list[str]) -> int:
    from distill.serve import calibrate

    return calibrate.main(overrides)


@command("status", "what the gateway over a run has seen: live agreement, shadow calls, drift alarms, traffic",
         "Reads the gateway's store (serve/store.sqlite, or serve.store=redis), its traffic log and "
         "serve/events.jsonl (no gateway need be running) and prints the live agreement of the student's kept "
         "answers with the teacher per field with its 95% interval, the day's shadow spend, active drift alarms "
         "of the rule published now, and the traffic log's routes.",
         groups=("serve",), needs_run_dir=True, examples=("python -m distill status run_dir=DIR",))
def _status(name: str, overrides: list[str]) -> int:
    from distill.serve.command import load_serve_config
    from distill.serve.shadow import status_text

    print(status_text(load_serve_config(overrides)))
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

    path = paths.ledger_path(cfg.run_dir, cfg.generate.shared_ledger)
    if not path.exists():
        raise DistillError(f"no ledger at {path}; run the generate stage first")
    with Ledger(path) as ledger:
        print(json.dumps(ledger.summary(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
