"""publish's serving files agree with the routing rule, and every shell command in SERVING.md and MODEL_CARD.md
is run here (or, for tools distill does not install, checked to parse and to name files that exist).

Run: ``python -m distill serve run_dir=..`` (+ the curl example against it), ``python -m llama_cpp.server ...``,
``python -m distill serve ... serve.student_endpoint=... serve.confidence=sequence`` (+ the curl example).
Checked, not run: ``pip install 'litellm[proxy]'`` (no network in tests), ``litellm --config litellm.yaml`` (the
proxy extra is not installed: litellm.yaml is loaded into ``litellm.Router`` and a request is sent through it),
``ollama ...`` and ``vllm serve ...`` (not installed), the card's ``python -m distill evaluate ...`` (its overrides
are validated by ``load_config``; it would rewrite the run's evaluate/).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import litellm
import pytest
import yaml
from conftest import tiny_overrides

from distill import paths, routing, runio
from distill.config import load_config
from distill.routing import RouteSpec, load_rule
from distill.serve.command import background, load_serve_config
from distill.task import Task
from distill.teacher.server import free_port
from distill.testing.fake_student import FakeStudent

pytestmark = pytest.mark.integration

TASK = "support_tickets"
GATEWAY = "http://127.0.0.1:8088/v1"  # serve.host / serve.port defaults, as published
ABSOLUTE = re.compile(r"(?<![\w.:/])/(?:home|tmp|work|Users|root|var|opt|mnt|private)/")


PUBLISH_EXTRA = ("publish.force=true",)  # conftest's `published` run (route disabled: 4 val items)


def _pub(run_dir: Path) -> Path:
    return paths.stage_dir(run_dir, "publish")


def _bash_lines(markdown: str) -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", markdown, flags=re.S)
    return [line for block in blocks for line in block.splitlines() if line.strip()]


def _with_port(line: str, port: int, old: int) -> str:
    return line.replace(f":{old}", f":{port}").replace(f"--port {old}", f"--port {port}").replace(
        f"serve.port={old}", f"serve.port={port}")


def _wait(url: str, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"{url} did not answer"
        time.sleep(0.2)


def _stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()


def _curl(line: str) -> dict:
    out = subprocess.run(shlex.split(line) + ["-D", "-"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    head, _, body = out.stdout.replace("\r\n", "\n").partition("\n\n")
    assert body.strip(), out.stdout[-2000:]
    headers = dict(h.split(": ", 1) for h in head.splitlines()[1:] if ": " in h)
    return {"headers": {k.lower(): v for k, v in headers.items()}, "body": json.loads(body)}


# ---------------------------------------------------------------------------------------------------------------
# the files agree with the rule


def test_a_disabled_route_sends_task_traffic_to_the_teacher_through_litellm(published, teacher, tmp_path):
    rule = load_rule(_pub(published) / paths.ROUTING)
    assert not rule.route.enabled
    text = (_pub(published) / paths.LITELLM).read_text()
    config = yaml.safe_load(text)
    assert "DISABLED" in text.splitlines()[2]
    task_models = [m for m in config["model_list"] if m["model_info"]["distill_task"] == TASK]
    assert [m["model_name"] for m in task_models] == rule.task.match.model_aliases
    bases = {m["litellm_params"]["api_base"] for m in config["model_list"]}
    assert bases == {GATEWAY} and rule.student.endpoint not in bases  # no deployment reaches the student directly
    assert "router_settings" not in config  # no LiteLLM fallback sending the teacher the bare input
    assert task_models[0]["litellm_params"]["response_format"] == rule.prompt.response_format

    run_dir = tmp_path / "run"
    shutil.copytree(published, run_dir)
    new_ticket = "The app logs me out every time I open settings."
    with FakeStudent(lambda t: ({"category": "technical", "priority": "low"}, 0.99)) as student:
        cfg = load_serve_config([f"run_dir={run_dir}", "serve.port=0", f"serve.student_endpoint={student.base_url}"])
        with background(cfg) as url:
            models = [{**m, "litellm_params": {**m["litellm_params"], "api_base": url, "api_key": "unused"}}
                      for m in config["model_list"]]
            router = litellm.Router(model_list=models)
            before = len(teacher.calls)
            reply = router.completion(model=TASK, messages=[{"role": "user", "content": new_ticket}])
            passthrough = router.completion(model=rule.fallback.model, messages=[{"role": "user", "content": "hi"}])
    assert student.calls == []
    sent = teacher.calls[before]
    assert len(sent["messages"]) == 2 + 2 * rule.prompt.teacher_few_shot  # the few-shot prompt, not the student's
    assert sent["messages"][0]["content"] == Task(cfg).teacher_system
    assert sent["messages"][-1] == {"role": "user", "content": new_ticket}
    assert Task(cfg).schema.errors(json.loads(reply.choices[0].message.content)) == []
    assert teacher.calls[before + 1]["messages"] == [{"role": "user", "content": "hi"}]
    assert passthrough.choices[0].message.content


def test_routing_yaml_and_serving_md_state_the_prompt_contract(published):
    cfg = load_serve_config([f"run_dir={published}"])
    task = Task(cfg)
    pub = _pub(published)
    raw = yaml.safe_load((pub / paths.ROUTING).read_text())
    assert raw["schema_version"] == routing.SCHEMA_VERSION == 2
    rule = load_rule(pub / paths.ROUTING)
    assert rule.prompt.system == task.student_system
    assert rule.prompt.teacher_few_shot == len(task.few_shot) > 0
    assert rule.prompt.response_format["json_schema"]["schema"] == rule.task.output_schema
    assert rule.prompt.example_request == {"model": TASK, "messages": [{"role": "user",
                                                                        "content": task.few_shot[0][0]}]}
    serving = (pub / paths.SERVING).read_text()
    assert task.student_system in serving and json.dumps(rule.prompt.example_request) in serving
    assert "python -m distill serve run_dir=.." in serving.split("##")[1]  # the primary path comes first
    assert "Route disabled" in serving and "litellm[proxy]" in serving
    assert "llama-server" not in serving
    for name in (paths.SERVING, paths.LITELLM, paths.ROUTING, paths.MODELFILE, paths.MODEL_CARD, paths.GRAFANA):
        text = (pub / name).read_text()
        assert not ABSOLUTE.search(text) and str(published) not in text, name
    # a version 1 rule (no prompt) still loads; a prompt in version 1 is refused
    old = {k: v for k, v in raw.items() if k != "prompt"} | {"schema_version": 1}
    assert routing.validate_rule(old).prompt is None
    with pytest.raises(routing.RoutingRuleError, match="schema_version 2 key"):
        routing.validate_rule({**raw, "schema_version": 1})


def test_an_enabled_route_is_written_as_enabled_everywhere(published, tmp_path):
    from transformers import AutoTokenizer

    from distill.stages.publish.serving import write_serving

    cfg = load_config(tiny_overrides(published, "http://127.0.0.1:9/v1"))
    rule = load_rule(_pub(published) / paths.ROUTING)
    rule.route = RouteSpec(enabled=True, confidence_threshold=0.8, target_agreement=0.98, expected_coverage=0.6,
                           expected_agreement=0.99, reason="forced by the test")
    published_files = runio.read_done(published, "publish")["summary"]["artifacts"]
    tokenizer = AutoTokenizer.from_pretrained(_pub(published) / paths.MODEL_DIR / paths.HF_DIR)
    write_serving(cfg, Task(cfg), tmp_path, rule, published_files, tokenizer, rule.student.stop[0])
    assert load_rule(tmp_path / paths.ROUTING).route.confidence_threshold == 0.8
    text = (tmp_path / paths.LITELLM).read_text()
    assert "confidence >= 0.8" in text
    config = yaml.safe_load(text)
    assert {m["litellm_params"]["api_base"] for m in config["model_list"]} == {GATEWAY}
    serving = (tmp_path / paths.SERVING).read_text()
    assert "**Route enabled**" in serving and "at least 0.8" in serving and "60.0%" in serving


# ---------------------------------------------------------------------------------------------------------------
# every command, run


def test_every_command_in_serving_md_and_the_card(published, teacher, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(published, run_dir)
    pub = _pub(run_dir)
    serving = (pub / paths.SERVING).read_text()
    lines = _bash_lines(serving)
    kinds = {}
    for line in lines:
        words = shlex.split(line)
        kind = " ".join(words[:3]) if words[0] == "python" else words[0]
        kinds.setdefault(kind, []).append(line)
    assert set(kinds) == {"python -m distill", "curl", "pip", "litellm", "python -m llama_cpp.server", "ollama",
                          "vllm"}

    # not run: tools distill does not install, and a network install
    assert [shlex.split(x) for x in kinds["pip"]] == [["pip", "install", "litellm[proxy]"]]
    assert [shlex.split(x)[:3] for x in kinds["litellm"]] == [["litellm", "--config", paths.LITELLM]]
    assert yaml.safe_load((pub / paths.LITELLM).read_text())["model_list"]  # sent through litellm.Router above
    for line in kinds["ollama"]:
        words = shlex.split(line)
        assert words[1] in ("create", "run") and (words[-1] != paths.MODELFILE or (pub / paths.MODELFILE).is_file())
    for line in kinds["vllm"]:
        words = shlex.split(line)
        assert words[1] == "serve" and (pub / words[2] / "config.json").is_file(), line
    modelfile = (pub / paths.MODELFILE).read_text()
    assert (pub / modelfile.splitlines()[1].removeprefix("FROM ./")).is_file()

    serve_plain, serve_sequence = kinds["python -m distill"]
    (curl,) = kinds["curl"]
    (llama,) = kinds["python -m llama_cpp.server"]
    env_python = [sys.executable if w == "python" else w for w in shlex.split(serve_plain)]

    # python -m distill serve run_dir=.. serve.port=8088, then the curl example against it
    port = free_port()
    proc = subprocess.Popen([*env_python[:-1], f"serve.port={port}"], cwd=pub, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait(f"http://127.0.0.1:{port}/healthz", proc)
        got = _curl(_with_port(curl, port, 8088))
    finally:
        assert _stop(proc) == 0
    assert got["headers"]["x-distill-route"] == "teacher" and got["headers"]["x-distill-reason"] == "route_disabled"
    assert Task(load_serve_config([f"run_dir={run_dir}"])).schema.errors(
        json.loads(got["body"]["choices"][0]["message"]["content"])) == []

    # python -m llama_cpp.server ..., then the gateway in front of it (serve.confidence=sequence) and the curl
    student_port = free_port()
    gateway_port = next(p for p in iter(free_port, None) if p != student_port)  # two binds of port 0 may agree
    words = [sys.executable if w == "python" else w for w in shlex.split(_with_port(llama, student_port, 8080))]
    server = subprocess.Popen(words, cwd=pub, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait(f"http://127.0.0.1:{student_port}/v1/models", server)
        model_ids = [m["id"] for m in httpx.get(f"http://127.0.0.1:{student_port}/v1/models").json()["data"]]
        assert model_ids == [load_rule(pub / paths.ROUTING).student.model]
        words = [sys.executable if w == "python" else w
                 for w in shlex.split(_with_port(serve_sequence, student_port, 8080))]
        gateway = subprocess.Popen([*words, f"serve.port={gateway_port}"], cwd=pub, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        try:
            _wait(f"http://127.0.0.1:{gateway_port}/healthz", gateway)
            health = httpx.get(f"http://127.0.0.1:{gateway_port}/healthz").json()
            got = _curl(_with_port(curl, gateway_port, 8088))
        finally:
            assert _stop(gateway) == 0
    finally:
        _stop(server)
    assert health["student"]["reachable"] is True
    assert got["body"]["object"] == "chat.completion" and got["headers"]["x-distill-route"] == "teacher"

    # the card: its commands are distill's; the evaluate line's overrides validate (running it rewrites evaluate/)
    card = (pub / paths.MODEL_CARD).read_text()
    commands = re.findall(r"`(python -m distill [^`]+)`", card) + _bash_lines(card)
    assert commands, "the card names the serving command"
    for command in commands:
        words = shlex.split(command)
        assert words[:3] == ["python", "-m", "distill"] and words[3] in ("serve", "evaluate"), command
        args = [f"run_dir={run_dir}" if w == "run_dir=.." else w for w in words[4:]]
        if words[3] == "serve":
            assert Path(load_serve_config(args).run_dir) == run_dir
        else:
            cfg = load_config(args)
            assert cfg.eval.endpoint.base_url and cfg.eval.endpoint.model


def test_classifier_serving_md_names_the_gateway(tmp_path):
    """SERVING.md of an in-process student: the gateway section, then the in-process use (no litellm.yaml)."""
    from distill.stages.publish import serving

    cfg = load_config(tiny_overrides(tmp_path / "run", "http://127.0.0.1:9/v1"))
    task = Task(cfg)
    rule = routing.RoutingRule(
        task=routing.TaskSpec(id=TASK, match=routing.Match(model_aliases=[TASK]), output_schema=task.schema.schema),
        student=routing.StudentSpec(model="clf", kind="embed_classifier", endpoint="http://127.0.0.1:8080/v1",
                                    artifacts={"safetensors-embed_classifier": "model"}),
        fallback=routing.FallbackSpec(model="fake-teacher"),
        route=RouteSpec(enabled=False, target_agreement=0.98, reason="too few val items"),
        cost=routing.CostSpec(), prompt=serving.prompt_spec(cfg, task),
        evidence=routing.Evidence(results_sha256="0" * 64, curve="val_coverage_curve"))
    serving.write_serving(cfg, task, tmp_path, rule, {}, None, "")
    text = (tmp_path / paths.SERVING).read_text()
    assert _bash_lines(text)[0] == f"python -m distill serve run_dir=.. serve.port={cfg.serve.port}"
    assert "in process" in text and "EmbedClassifier.load_published" in text
    assert not (tmp_path / paths.LITELLM).exists() and (tmp_path / paths.GRAFANA).is_file()
