"""``python -m distill serve run_dir=DIR [run_dir=DIR2 ...] [serve.port=8088] [key=value ...]``: the gateway over
published runs.

    python -m distill serve run_dir=runs/support_tickets/X                       # student started on the GGUF
    python -m distill serve run_dir=runs/tickets run_dir=runs/intents            # both tasks' aliases side by side
    python -m distill serve run_dir=DIR serve.student_endpoint=http://127.0.0.1:8090/v1 serve.port=9000
    python -m distill serve run_dir=DIR serve.api_keys_env=DISTILL_GATEWAY_KEYS teacher.api_key_env=OPENAI_API_KEY

No ``recipe=``: the run directory's ``config.yaml`` holds the recipe, the teacher and everything generate used, so
the gateway builds the same prompts and ledger keys. Overrides set ``serve.*`` keys (the ``serve`` config group)
and any key of the run's config (``teacher.base_url=URL`` for a teacher that moved); group choices
(``teacher=openai``) are refused: they would make the gateway ask another teacher than the one the run was built on.

Several run directories: each is loaded as one (its config.yaml, the same overrides), and their task aliases are
served side by side (two runs answering the same alias are refused). An embedding-classifier run
(``student.kind=embed_classifier``) is served in process: no runtime, its confidence from its heads.

Start-up order: the routing rule (``publish/routing.yaml`` through ``load_rule``), the student runtime (the published
GGUF, ``distill.serve.runtime``, unless ``serve.student_endpoint``), the teacher (the embedded one started on
loopback as generate starts it), then uvicorn. SIGTERM / Ctrl-C: uvicorn stops accepting, lets in-flight requests
finish (``serve.shutdown_timeout_s``), closes the gateway, and the child servers are stopped.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import yaml

from distill import DistillError, paths, runio
from distill.config import Config, clean_secret, compose, is_secret_setting, validate
from distill.routing import load_rule
from distill.serve.gateway import ledger_key_limits
from distill.serve.hub import IN_PROCESS, ServePlan, check_aliases
from distill.serve.runtime import StudentRuntime
from distill.task import Task

log = logging.getLogger("distill")


def load_serve_configs(overrides: list[str]) -> list[Config]:
    """One config per ``run_dir=`` (in order), each from that run's config.yaml with the same overrides.

    Raises DistillError without ``run_dir=``, for a run directory named twice, and as ``load_serve_config``."""
    run_dirs = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == "run_dir"]
    if not run_dirs or not all(run_dirs):
        raise DistillError("serve needs run_dir=DIR: a run whose publish stage finished (python -m distill run ...)")
    resolved = [Path(d).expanduser().resolve() for d in run_dirs]
    if len(set(resolved)) < len(resolved):
        raise DistillError(f"run_dir names the same run twice ({' '.join(run_dirs)}); name each run once")
    rest = [o for o in overrides if o.split("=", 1)[0] != "run_dir"]
    return [load_serve_config([f"run_dir={d}", *rest]) for d in run_dirs]


def load_serve_config(overrides: list[str]) -> Config:
    """The run's own config (``<run_dir>/config.yaml``) with the ``serve`` group and the overrides applied.

    Raises DistillError without ``run_dir=``, for several (``load_serve_configs`` takes them), for a run without a
    config.yaml, for a group choice other than ``serve=NAME``, and for anything validate refuses."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    run_dirs = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == "run_dir"]
    if not run_dirs or not run_dirs[-1]:
        raise DistillError("serve needs run_dir=DIR: a run whose publish stage finished (python -m distill run ...)")
    if len(run_dirs) > 1:
        raise DistillError("load_serve_config reads one run_dir; load_serve_configs reads several")
    run_dir = Path(run_dirs[0]).expanduser()
    saved = run_dir / paths.CONFIG_YAML
    if not saved.is_file():
        raise DistillError(f"{saved} does not exist: run_dir= must name a run directory made by `python -m distill run` "
                           f"(serve, status and calibrate-cache read its config.yaml)")
    data = yaml.safe_load(saved.read_text(encoding="utf-8"))
    serve_over, other = [], []
    for item in overrides:
        key, eq, value = item.partition("=")
        key = key.lstrip("+~")
        if key == "run_dir":
            continue
        if not eq:
            raise DistillError(f"cannot read the override {item!r}: write key=value (serve.port=9000)")
        if is_secret_setting(key):
            raise DistillError(f"{key}: distill never takes a secret as a setting (the value is not shown); put it in "
                               f"an environment variable and name that variable (serve.api_keys_env=NAME)")
        if key == "recipe":
            if value != data.get("recipe", {}).get("name"):
                raise DistillError(f"recipe={value} does not match the run's recipe "
                                   f"{data.get('recipe', {}).get('name')!r}; serve reads the recipe from {saved}")
            continue
        if key == "serve" or key.startswith("serve."):
            serve_over.append(item)
        elif "." not in key:
            raise DistillError(f"{key}={value}: serve keeps the run's config groups (they built its data and model); "
                               f"set single keys instead, e.g. teacher.base_url=URL")
        else:
            other.append(f"{key}={value}")
    data["serve"] = compose(serve_over)["serve"]
    if other:
        try:
            data = OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(data), OmegaConf.from_dotlist(other)))
        except OmegaConfBaseException as exc:
            raise DistillError(f"bad override: {' '.join(str(exc).split())}") from None
    data["run_dir"] = str(run_dir)
    return validate(data)


def client_keys(cfg: Config) -> list[str]:
    """The bearer keys clients must send, from the variable ``serve.api_keys_env`` names (comma-separated).

    Raises DistillError when the variable is named but holds no key: a gateway meant to check keys never starts
    open."""
    name = cfg.serve.api_keys_env
    if not name:
        return []
    # Each key is checked as a teacher key is (no whitespace or control characters inside, ASCII), never shown.
    keys = [k for part in (os.environ.get(name) or "").split(",")
            if (k := clean_secret(part.strip(), name, "serve.api_keys_env"))]
    if not keys:
        raise DistillError(f"serve.api_keys_env={name} names an environment variable that holds no key; export "
                           f"{name}=key1,key2 (or set serve.api_keys_env=null to serve without client keys)")
    return keys


def pick_artifact(cfg: Config, rule, publish_dir: Path) -> Path:
    """The GGUF to serve: ``serve.artifact`` (a routing.yaml student.artifacts key), else q8_0, else the first."""
    ggufs = {k: v for k, v in rule.student.artifacts.items() if v.endswith(".gguf")}
    if cfg.serve.artifact:
        if cfg.serve.artifact not in rule.student.artifacts:
            raise DistillError(f"serve.artifact={cfg.serve.artifact} is not a published artifact; choices: "
                               f"{', '.join(rule.student.artifacts)}")
        if cfg.serve.artifact not in ggufs:
            raise DistillError(f"serve.artifact={cfg.serve.artifact} is not a GGUF; the student runtime serves "
                               f"{', '.join(ggufs) or 'GGUF files, and none was published'} (or run your own server "
                               f"and set serve.student_endpoint with serve.confidence=sequence)")
        return publish_dir / ggufs[cfg.serve.artifact]
    if not ggufs:
        raise DistillError(f"{publish_dir} holds no GGUF (publish.gguf_types); serve another student with "
                           f"serve.student_endpoint=URL serve.confidence=sequence")
    return publish_dir / ggufs.get("gguf-q8_0", next(iter(ggufs.values())))


@contextlib.contextmanager
def prepare(cfgs: "Config | list[Config]") -> Iterator[list[ServePlan]]:
    """Load each run's rule, start the child servers they need, and yield the plans; the children stop on exit.

    Runs whose teacher settings are the same share one teacher endpoint (one embedded teacher, not one per run)."""
    cfgs = cfgs if isinstance(cfgs, list) else [cfgs]
    with contextlib.ExitStack() as stack:
        plans, teachers = [], {}
        for cfg in cfgs:
            same = teachers.get(cfg.teacher.model_dump_json())
            plan = open_plan(cfg, stack, same)
            teachers.setdefault(cfg.teacher.model_dump_json(), plan.teacher_url)
            plans.append(plan)
        check_aliases(plans)
        yield plans


def open_plan(cfg: Config, stack: contextlib.ExitStack, teacher_url: str | None = None) -> ServePlan:
    """The plan for ``cfg.run_dir``: its rule checked, its student started under ``stack`` (in a stack of its own,
    ``plan.student_stack``, that a reload closes once the old routes drain) and the teacher reached or started,
    unless ``teacher_url`` (a reload keeps the gateway's teacher)."""
    from distill.teacher.server import teacher_endpoint  # generate's own way to reach (or start) the teacher

    run_dir = Path(cfg.run_dir)
    runio.require_done(run_dir, "publish", "serve")
    generate_done = runio.require_done(run_dir, "generate", "serve")
    publish_dir = paths.stage_dir(run_dir, "publish")
    rule = load_rule(publish_dir / paths.ROUTING)
    task = Task(cfg)
    if task.schema.schema != rule.task.output_schema:
        raise DistillError(f"the recipe's output_schema differs from {publish_dir / paths.ROUTING}'s: the recipe "
                           f"changed after publish; re-run `python -m distill run run_dir={run_dir}`")
    method = (generate_done.get("summary") or {}).get("method", "generate")
    for limit in ledger_key_limits(cfg, method):
        log.warning("serve: %s", limit)
    logs = paths.stage_dir(run_dir, paths.SERVE_DIR)
    if cfg.serve.semantic_cache.enabled:
        from distill.serve.cache import load_threshold
        load_threshold(cfg, logs)  # an uncalibrated semantic cache is refused before any child server starts
    artifact_sha, classifier = None, None
    student_stack = stack.enter_context(contextlib.ExitStack())
    if rule.student.kind == "embed_classifier":  # no server: the encoder and heads run in the gateway's process
        from distill.student.embed_classifier import EmbedClassifier

        model_dir = publish_dir / paths.MODEL_DIR
        classifier = EmbedClassifier.load_published(model_dir)
        artifact_sha = runio.sha256_file(model_dir / paths.HEAD_DIR / paths.HEAD_WEIGHTS)
        student_url = IN_PROCESS
    elif cfg.serve.student_endpoint:
        student_url = cfg.serve.student_endpoint
    else:
        if cfg.serve.confidence != "scored":
            raise DistillError("serve.confidence=sequence needs serve.student_endpoint (a server of your own); the "
                               "runtime distill starts answers with the scored confidence")
        artifact = pick_artifact(cfg, rule, publish_dir)
        calibrated_on = rule.evidence.artifact if rule.evidence is not None else None
        if calibrated_on and artifact.relative_to(publish_dir).as_posix() != calibrated_on:
            log.warning("serve: serving %s, but routing.yaml's threshold was chosen on %s's confidence (evidence."
                        "artifact); the threshold is not calibrated for this artifact: drop serve.artifact or "
                        "republish with it", artifact.relative_to(publish_dir).as_posix(), calibrated_on)
        artifact_sha = runio.sha256_file(artifact)  # part of every exact-cache key
        runtime = StudentRuntime(artifact, publish_dir / paths.MODEL_DIR /
                                 paths.HF_DIR, alias=rule.student.model, n_ctx=cfg.serve.student_n_ctx,
                                 n_threads=cfg.serve.student_threads, log_path=logs / paths.STUDENT_RUNTIME_LOG)
        student_url = student_stack.enter_context(runtime).base_url
    if cfg.serve.confidence == "sequence":
        log.warning("serve: serve.confidence=sequence: the student's confidence is the probability of the answer "
                    "it wrote, not the scored confidence routing.yaml's threshold was chosen on")
    teacher_url = teacher_url or stack.enter_context(teacher_endpoint(cfg, logs))
    if not teacher_url:
        raise DistillError("the run's teacher has no base_url; set teacher.base_url=URL")
    ledger = paths.ledger_path(run_dir, cfg.generate.shared_ledger)
    return ServePlan(cfg, rule, task, student_url.rstrip("/"), teacher_url.rstrip("/"), ledger, method,
                     artifact_sha256=artifact_sha, student_stack=student_stack, classifier=classifier)


def _uvicorn_config(app, cfg: Config, port: int):
    import uvicorn

    # The gateway writes its own JSON access log; uvicorn's logs go through distill's handlers (keys scrubbed).
    # uvloop and httptools (dependencies of distill) named, not "auto": a missing one is an error, not a slower loop.
    return uvicorn.Config(app, host=cfg.serve.host, port=port, log_config=None, access_log=False,
                          loop="asyncio" if sys.platform == "win32" else "uvloop", http="httptools",
                          timeout_graceful_shutdown=cfg.serve.shutdown_timeout_s, lifespan="on")


def serve(cfgs: "Config | list[Config]") -> int:
    """Run the gateway until SIGTERM / Ctrl-C. Returns the exit code (0 after a graceful stop)."""
    import uvicorn

    from distill.serve.app import create_app
    from distill.serve.reload import with_file_watch

    cfgs = cfgs if isinstance(cfgs, list) else [cfgs]
    cfg = cfgs[0]
    keys = client_keys(cfg)
    check_port_free(cfg.serve.host, cfg.serve.port)  # before any child server starts
    check_store(cfg)
    _access_log_to_stderr()
    try:
        with prepare(cfgs) as plans:
            app = with_file_watch(create_app(plans, keys, own_process=True), cfg)
            server = uvicorn.Server(_uvicorn_config(app, cfg, cfg.serve.port))
            for plan in plans:
                log.info("serve: task %s on http://%s:%d/v1 (route %s), student %s, teacher %s", plan.rule.task.id,
                         cfg.serve.host, cfg.serve.port, "enabled at confidence >= "
                         f"{plan.rule.route.confidence_threshold}" if plan.rule.route.enabled else "disabled",
                         plan.student_url, plan.teacher_url)
            try:
                server.run()  # uvicorn handles SIGINT/SIGTERM here: drain, lifespan shutdown, then return
            except SystemExit:  # uvicorn exits when it cannot bind (a port taken since the check above)
                if server.started:
                    raise
            if not server.started:
                failed = getattr(app.state, "startup_error", None)  # the gateway's start-up, not the socket
                if isinstance(failed, DistillError):
                    raise DistillError(f"the gateway did not start: {failed}")
                if failed is not None:
                    raise DistillError(f"the gateway did not start: {type(failed).__name__}: {failed} (the log "
                                       f"above has the traceback)")
                raise DistillError(f"the gateway could not listen on {cfg.serve.host}:{cfg.serve.port} (in use?); "
                                   f"pick another with serve.port=N")
    except KeyboardInterrupt:
        pass  # uvicorn re-raises the signal it handled once it has drained; the children are stopped by now
    log.info("serve: stopped")
    return 0


def check_store(cfg: Config) -> None:
    """DistillError (StoreError) when the gateway's store cannot be opened (``serve.store=redis`` with no Redis at
    ``serve.redis_url``, a password variable that is not set), before any child server starts."""
    from distill.serve.store import open_store

    open_store(cfg, cfg.run_dir).close()


def check_port_free(host: str, port: int) -> None:
    """DistillError when ``host:port`` cannot be bound (another gateway on it, or a host this machine lacks), so
    serve stops in a second instead of after starting the student and the teacher."""
    import socket

    def foreign(exc: OSError) -> DistillError:
        return DistillError(f"serve.host={host} is not an address of this machine ({exc.strerror}); use 127.0.0.1 "
                            f"(loopback, the default) or an address of one of its interfaces")

    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise foreign(exc) from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                raise foreign(exc) from None
            problem = ("already in use (another gateway or server?)" if exc.errno == errno.EADDRINUSE else
                       f"not available to this user ({exc.strerror})")
            raise DistillError(f"serve.port={port} on {host} is {problem}; stop what listens there or pick another "
                               f"port with serve.port=N") from None


def _access_log_to_stderr() -> None:
    """Access records as bare JSON lines on stderr (not the timestamped text format of the other logs)."""
    access = logging.getLogger("distill.serve.access")
    if not access.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(handler)
        access.propagate = False
    access.setLevel(logging.INFO)


@contextlib.contextmanager
def background(cfgs: "Config | list[Config]", api_keys: list[str] | None = None) -> Iterator[str]:
    """The whole gateway in a thread of this process (tests, benchmarks, notebooks); yields its base URL.

    ``serve.port=0`` picks a free port. Child servers and the gateway stop when the block exits."""
    import uvicorn

    from distill.serve.app import create_app
    from distill.serve.reload import with_file_watch
    from distill.teacher.server import free_port

    cfgs = cfgs if isinstance(cfgs, list) else [cfgs]
    cfg = cfgs[0]
    port = cfg.serve.port or free_port()
    with prepare(cfgs) as plans:
        server = uvicorn.Server(_uvicorn_config(with_file_watch(create_app(plans, api_keys), cfg), cfg, port))
        thread = threading.Thread(target=server.run, name="distill-serve", daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise DistillError(f"the gateway did not start on {cfg.serve.host}:{port}")
            time.sleep(0.02)
        try:
            yield f"http://{cfg.serve.host}:{port}/v1"
        finally:
            server.should_exit = True
            thread.join(timeout=cfg.serve.shutdown_timeout_s + 5)
