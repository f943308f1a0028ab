"""publish's serving files: the routing rule, its JSON schema, a LiteLLM config, an Ollama Modelfile and SERVING.md.

    python -m distill publish run_dir=DIR [publish.target_agreement=0.98] [publish.endpoint=http://127.0.0.1:8080/v1]

The routing rule (distill.routing) takes its confidence threshold (publish.target_agreement) from the validation
coverage curve of the confidence the gateway will compute: the served GGUF's (``served_gguf``), scored by the
gateway's own code (parity.served_confidence), or, for the embedding classifier (the same code in process) and
without a served GGUF or with publish.verify_load=false, evaluate's in-process curve in results.json. It takes its
costs from results.json, names the published artifacts and states the prompt contract (the student's system
prompt, the response format, an example request). Every other file is generated
from that rule: ``python -m distill serve`` (the gateway) applies it and is the primary serving path; litellm.yaml
puts LiteLLM in front of the gateway (task traffic never reaches the student except through the rule, and a
fallback gets the teacher's few-shot prompt, which only the gateway builds); SERVING.md and the Modelfile serve the
artifacts with the model's own chat template, stop token and system prompt. student=embed_classifier is loaded in
process (by the gateway too), so it gets no LiteLLM, Ollama or llama.cpp files.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from urllib.parse import urlparse

import yaml

from distill import DistillError, paths, routing, runio
from distill.config import Config
from distill.serve.command import pick_artifact
from distill.serve.metrics import dashboard
from distill.stages.publish.gguf import model_name
from distill.student import embed_classifier
from distill.task import Task

SERVER_CTX = 2048  # context the llama.cpp server gets for parity checks and in the serving snippets
RUN_DIR_FROM_PUBLISH = ".."  # SERVING.md's commands run in publish/; the run directory is its parent


def _fallback(cfg: Config) -> routing.FallbackSpec:
    if cfg.teacher.kind == "openai":
        return routing.FallbackSpec(model=cfg.teacher.model, endpoint=cfg.teacher.base_url,
                                    api_key_env=cfg.teacher.api_key_env)
    # distill starts the embedded teacher on a random loopback port; SERVING.md serves it on a fixed one.
    return routing.FallbackSpec(model=cfg.teacher.model or "teacher", endpoint=_teacher_local_endpoint(cfg))


def _teacher_local_endpoint(cfg: Config) -> str:
    student = urlparse(cfg.publish.endpoint)
    return f"{student.scheme}://{student.hostname}:{(student.port or 80) + 1}/v1"


def served_gguf(cfg: Config, rule: routing.RoutingRule) -> str | None:
    """The GGUF ``python -m distill serve`` serves for ``rule`` (its path in publish/, chosen as the gateway chooses:
    serve.artifact, else q8_0, else the first), or None when it serves none (the embedding classifier runs in
    process; no GGUF was published). Raises DistillError for a serve.artifact that names no published GGUF."""
    if rule.student.kind == "embed_classifier" or not any(v.endswith(".gguf") for v in rule.student.artifacts.values()):
        return None
    return pick_artifact(cfg, rule, Path()).as_posix()


def build_rule(cfg: Config, task: Task, results: dict, results_sha: str, published: dict,
               eot: str, served: dict | None = None) -> routing.RoutingRule:
    """The routing rule: threshold from the validation curve, coverage and blended cost, evidence.

    ``served``: the served GGUF's own curves (parity.served_confidence); the threshold and the test evidence then
    come from them, not from evaluate's in-process curves in ``results``."""
    target = cfg.publish.target_agreement
    if served:
        val_curve, test_curve = served["val_coverage_curve"], served["coverage_curve"]
        source, curve_name = (f" (the confidence of {served['artifact']} as the gateway scores it)",
                              f"{paths.PARITY}: {served['artifact']} served_confidence.val_coverage_curve")
    else:
        val_curve, test_curve = results.get("val_coverage_curve"), results.get("coverage_curve") or []
        source, curve_name = "", "val_coverage_curve"
    cost = results.get("cost") or {}
    choice = None
    if not val_curve:
        reason = ("no val items to score the served GGUF on (eval.val_curve, eval.split); re-run evaluate" if served
                  else "results.json has no val_coverage_curve (student confidence on the val split); re-run evaluate")
    else:
        choice = routing.choose_threshold(val_curve, target, cfg.publish.min_route_items)
        n_val = max(p.get("n", 0) for p in val_curve)
        best = max((p.get("agreement") or 0.0 for p in val_curve if p.get("n", 0) >= cfg.publish.min_route_items),
                   default=None)
        if choice:
            reason = (f"confidence >= {choice.threshold} keeps {choice.coverage:.1%} of val items at agreement "
                      f"{choice.agreement:.3f} >= target {target}{source}")
        elif best is None:
            reason = (f"the val split has {n_val} items, fewer than publish.min_route_items "
                      f"{cfg.publish.min_route_items}: too few to choose a threshold; every request goes to the "
                      f"teacher")
        else:
            reason = (f"no confidence threshold reaches agreement {target} on >= {cfg.publish.min_route_items} val "
                      f"items (best {best:.3f}){source}; every request goes to the teacher")
    test_point = routing.point_at(test_curve, choice.threshold) if choice and test_curve else None
    blended, saving = routing.blended_cost(choice.coverage if choice else None, cost.get("teacher_usd_per_1k"),
                                           cost.get("student_usd_per_1k"))
    rule = routing.RoutingRule(
        task=routing.TaskSpec(id=cfg.recipe.name, description=cfg.recipe.description,
                              match=routing.Match(metadata={"distill_task": cfg.recipe.name},
                                                  model_aliases=[cfg.recipe.name]),
                              output_schema=task.schema.schema),
        student=routing.StudentSpec(model=model_name(cfg), endpoint=cfg.publish.endpoint,
                                    artifacts={_artifact_key(art): rel for rel, art in published.items()},
                                    kind=cfg.student.kind, stop=[eot] if eot else [],
                                    # a classifier has no token limit: its answer is never generated
                                    max_tokens=None if cfg.student.kind == "embed_classifier"
                                    else cfg.eval.max_new_tokens),
        fallback=_fallback(cfg),
        route=routing.RouteSpec(enabled=choice is not None, confidence_threshold=choice and choice.threshold,
                                target_agreement=target, expected_coverage=choice and choice.coverage,
                                expected_agreement=choice and choice.agreement, reason=reason),
        cost=routing.CostSpec(teacher_usd_per_1k=cost.get("teacher_usd_per_1k"),
                              student_usd_per_1k=cost.get("student_usd_per_1k"), blended_usd_per_1k=blended,
                              saving_vs_teacher=saving),
        prompt=prompt_spec(cfg, task),
        evidence=routing.Evidence(results_sha256=results_sha, curve=curve_name,
                                  artifact=served["artifact"] if served else None,
                                  n_val=max((p.get("n", 0) for p in val_curve), default=0) if val_curve else None,
                                  test_coverage=test_point and test_point["coverage"],
                                  test_agreement=test_point and test_point["agreement"]))
    return routing.validate_rule(rule.model_dump(mode="json"), "the routing rule publish built")


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def threshold_lines(rule: routing.RoutingRule, results: dict, served: dict | None) -> list[str]:
    """report.md's section on the threshold: whose confidences it was chosen on, and what it gives on the test items
    (the served artifact's figures beside evaluate's in-process ones at the same threshold)."""
    r, ev = rule.route, rule.evidence
    lines = ["## The routing threshold", ""]
    if served:
        lines.append(f"Chosen on the confidence of `{served['artifact']}` as the gateway computes it "
                     f"({served['scorer']}) on {served['n_val']} val items, not on evaluate's unquantized student; "
                     f"curve: `{ev.curve}`. On the {served['n_test']} evaluated test items it agrees with the teacher "
                     f"on {_pct(served['agreement'])} (invalid {_pct(served['invalid_rate'])}); its confidences "
                     f"differ from evaluate's by at most {served['max_confidence_diff']}.")
    elif rule.student.kind == "embed_classifier":
        lines.append("Chosen on evaluate's val curve of the classifier (results.json `val_coverage_curve`): the "
                     "gateway runs the same files with the same code in process, so its confidence is that one.")
    else:
        lines.append("Chosen on evaluate's in-process student (results.json `val_coverage_curve`): publish did not "
                     "score a served GGUF (publish.verify_load=false, or none was published), so the gateway's "
                     "confidence on what it serves may differ from the one the threshold was chosen on.")
    lines.append("")
    if not r.enabled:
        return lines + [f"- route disabled: {r.reason}"]
    lines += [f"- route enabled at confidence >= {r.confidence_threshold}: val coverage {_pct(r.expected_coverage)}, "
              f"agreement {_pct(r.expected_agreement)}",
              f"- test split at that threshold: coverage {_pct(ev.test_coverage)}, agreement "
              f"{_pct(ev.test_agreement)}"]
    in_process = routing.point_at(results.get("coverage_curve") or [], r.confidence_threshold) if served else None
    if in_process:
        lines.append(f"- evaluate's in-process student at the same threshold on the test split: coverage "
                     f"{_pct(in_process['coverage'])}, agreement {_pct(in_process['agreement'])}")
    return lines


def prompt_spec(cfg: Config, task: Task) -> routing.PromptSpec:
    """The prompt contract: the student's system prompt, the response format, an example request to the gateway."""
    example = task.few_shot[0][0] if task.few_shot else "<the task input>"
    return routing.PromptSpec(system=task.student_system, teacher_few_shot=len(task.few_shot),
                              response_format=task.schema.response_format("json_schema", cfg.recipe.name),
                              example_request={"model": cfg.recipe.name,
                                               "messages": [{"role": "user", "content": example}]})


def gateway_url(cfg: Config) -> str:
    """Where ``python -m distill serve`` listens with the run's serve settings (0.0.0.0 is reached on loopback)."""
    host = "127.0.0.1" if cfg.serve.host in ("0.0.0.0", "::", "") else cfg.serve.host
    return f"http://{host}:{cfg.serve.port}/v1"


def _artifact_key(art: dict) -> str:
    return f"gguf-{art['type']}" if art["format"] == "gguf" else f"safetensors-{art['type']}"


def litellm_config(rule: routing.RoutingRule, gateway: str, api_key: str = "none") -> dict:
    """A LiteLLM router config in front of the gateway: every task alias and the teacher's model go to it.

    The gateway applies the rule (a disabled route sends task traffic to the teacher) and builds both prompts; no
    deployment calls the student directly, and no LiteLLM fallback sends task traffic to the teacher, since
    LiteLLM would send the client's bare input instead of the teacher's few-shot prompt. ``api_key``: what LiteLLM
    sends the gateway (``os.environ/NAME`` when the gateway checks client keys)."""
    response_format = rule.prompt.response_format if rule.prompt else None
    models = []
    for alias in rule.task.match.model_aliases or [rule.task.id]:
        params = {"model": f"openai/{alias}", "api_base": gateway, "api_key": api_key}
        if response_format:
            params["response_format"] = response_format
        models.append({"model_name": alias, "litellm_params": params,
                       "model_info": {"distill_task": rule.task.id,
                                      "distill_route": "student when confident" if rule.route.enabled
                                      else "teacher (route disabled)"}})
    models.append({"model_name": rule.fallback.model,
                   "litellm_params": {"model": f"openai/{rule.fallback.model}", "api_base": gateway,
                                      "api_key": api_key},
                   "model_info": {"distill_task": None, "distill_route": "pass-through to the teacher"}})
    return {"model_list": models}


GATEWAY_KEY_ENV = "DISTILL_GATEWAY_KEY"  # litellm.yaml reads the gateway key from it when serve.api_keys_env is set


def _litellm_header(rule: routing.RoutingRule, gateway: str) -> str:
    route = (f"enabled: the student answers when its confidence >= {rule.route.confidence_threshold}"
             if rule.route.enabled else f"DISABLED ({rule.route.reason}): every task request goes to the teacher")
    return (f"# LiteLLM in front of the distill gateway (python -m distill serve run_dir={RUN_DIR_FROM_PUBLISH}, "
            f"at {gateway}).\n"
            f"# pip install 'litellm[proxy]'; litellm --config {paths.LITELLM}. A gateway that checks client keys "
            f"(serve.api_keys_env) gets one from {GATEWAY_KEY_ENV}.\n"
            f"# Route {route}. Generated from {paths.ROUTING}: edit the rule and re-run publish, not this file.\n")


def ollama_template(tokenizer, eot: str) -> str:
    """An Ollama TEMPLATE rendered from the model's own chat template (one system + one user turn, as trained)."""
    sys_mark, user_mark = "\u2063SYSTEM\u2063", "\u2063PROMPT\u2063"
    prompt = tokenizer.apply_chat_template([{"role": "system", "content": sys_mark},
                                            {"role": "user", "content": user_mark}],
                                           tokenize=False, add_generation_prompt=True)
    return prompt.replace(sys_mark, "{{ .System }}").replace(user_mark, "{{ .Prompt }}") + "{{ .Response }}" + eot


def _fence(lang: str, lines: list[str]) -> list[str]:
    return [f"```{lang}", *lines, "```", ""]


def gateway_lines(cfg: Config, rule: routing.RoutingRule) -> list[str]:
    """SERVING.md's primary path: the gateway command, a curl request, the prompt contract."""
    gateway, r = gateway_url(cfg), rule.route
    state = (f"**Route enabled**: the student's answer is kept when its confidence is at least "
             f"{r.confidence_threshold} (expected coverage {r.expected_coverage:.1%} of requests on the val split); "
             f"the teacher answers the rest." if r.enabled else
             f"**Route disabled** ({r.reason}): the gateway sends every task request to the teacher.")
    body = json.dumps(rule.prompt.example_request, ensure_ascii=False)
    lines = ["## The gateway (the primary path)", "", state, "",
             "Run from this folder (`publish/`); the run directory is its parent:", "",
             *_fence("bash", [f"python -m distill serve run_dir={RUN_DIR_FROM_PUBLISH} serve.port={cfg.serve.port}"]),
             "It starts the student (" + ("in process" if rule.student.kind == "embed_classifier" else
                                          "the published GGUF in distill's student runtime") +
             "), reaches the teacher as generate did, and answers an OpenAI-compatible API on "
             f"`{gateway}`. A task request carries only the task's input as its user message:", "",
             *_fence("bash", [f"curl -s {gateway}/chat/completions -H 'Content-Type: application/json' "
                              f"-d {shlex.quote(body)}"]),
             "The reply's content is the JSON answer; headers `x-distill-route` (student | teacher), "
             "`x-distill-confidence`, `x-distill-reason`. Metrics: `GET /metrics` (Prometheus); the Grafana "
             f"dashboard over them is `{paths.GRAFANA}`.", "",
             "## The prompt contract", "",
             "- system prompt the student was trained with (the gateway sends it; a server of your own must, or the "
             "chat template may inject its own default):", "", *_fence("text", rule.prompt.system.splitlines()),
             "- user message: the task input, verbatim",
             f"- the teacher (every fallback): the recipe's few-shot prompt, {rule.prompt.teacher_few_shot} shot(s), "
             "built by the gateway as generate built it",
             f"- response format (`prompt.response_format` in `{paths.ROUTING}`): JSON constrained to "
             "`task.output_schema`", ""]
    if rule.student.kind != "embed_classifier":
        lines += ["## LiteLLM in front of the gateway", "",
                  "`litellm --config` needs the proxy extra, which distill does not install:", "",
                  *_fence("bash", ["pip install 'litellm[proxy]'", f"litellm --config {paths.LITELLM} --port 4000"]),
                  f"`{paths.LITELLM}` sends model `{rule.task.id}` and the teacher's model `{rule.fallback.model}` "
                  "to the gateway, which applies the rule; it has no deployment that calls the student directly and "
                  "no LiteLLM fallback for task traffic (LiteLLM would send the teacher the bare input, not its "
                  "few-shot prompt).", ""]
    return lines


def write_serving(cfg: Config, task: Task, staging: Path, rule: routing.RoutingRule, published: dict,
                  tokenizer, eot: str) -> None:
    """routing.yaml + its JSON schema, grafana.json, litellm.yaml, Modelfile and SERVING.md, all from ``rule``."""
    header = (f"# distill routing rule, schema version {routing.SCHEMA_VERSION} (routing.schema.json); "
              f"load with distill.routing.load_rule\n")
    runio.atomic_write_text(staging / paths.ROUTING, header + yaml.safe_dump(rule.model_dump(mode="json"),
                                                                             sort_keys=False, allow_unicode=True))
    runio.write_json(staging / paths.ROUTING_SCHEMA, routing.json_schema())
    runio.write_json(staging / paths.GRAFANA, dashboard(f"distill gateway: {rule.task.id}"))
    name = rule.student.model
    if rule.student.kind == "embed_classifier":  # loaded in process: no server, so no LiteLLM or Ollama config
        body = embed_classifier.serving_markdown(name).split("\n", 1)[1]
        runio.atomic_write_text(staging / paths.SERVING, "\n".join([f"# Serving {name}", "",
                                                                     *gateway_lines(cfg, rule)]) + body)
        return
    gateway = gateway_url(cfg)
    key = f"os.environ/{GATEWAY_KEY_ENV}" if cfg.serve.api_keys_env else "none"
    runio.atomic_write_text(staging / paths.LITELLM, _litellm_header(rule, gateway)
                            + yaml.safe_dump(litellm_config(rule, gateway, key), sort_keys=False, allow_unicode=True))
    ggufs = [rel for rel, art in published.items() if art["format"] == "gguf"]
    gguf = next((g for g in ggufs if g.endswith("-q8_0.gguf")), ggufs[0] if ggufs else None)
    endpoint = urlparse(rule.student.endpoint)
    host, port = endpoint.hostname, endpoint.port or 8080
    lines = [f"# Serving {name}", "", *gateway_lines(cfg, rule),
             "## The student without the gateway", "",
             "A server of the student alone does not apply the rule" + (
                 ": the route is disabled, so do not send it task traffic." if not rule.route.enabled else
                 "; put the gateway in front of it (below)."),
             f"Answers end at `{eot}`; every command below keeps the model's chat template and that stop token. "
             "Each request must carry the system prompt above and the response format.", ""]
    if gguf:
        template = ollama_template(tokenizer, eot)
        for text in (task.student_system, template):
            if '"""' in text:
                raise DistillError('the student prompt or chat template contains """, which an Ollama Modelfile '
                                   'cannot quote; remove it from the recipe\'s student_prompt')
        modelfile = [f"# ollama create {name} -f Modelfile", f"FROM ./{gguf}",
                     f'TEMPLATE """{template}"""',
                     f'SYSTEM """{task.student_system}"""', f'PARAMETER stop "{eot}"', "PARAMETER temperature 0",
                     f"PARAMETER num_predict {rule.student.max_tokens}", f"PARAMETER num_ctx {SERVER_CTX}"]
        runio.atomic_write_text(staging / paths.MODELFILE, "\n".join(modelfile) + "\n")
        lines += ["### llama.cpp (llama-cpp-python, installed with distill)", "",
                  *_fence("bash", [f"python -m llama_cpp.server --model {gguf} --host {host} --port {port} "
                                   f"--model_alias {name} --n_ctx {SERVER_CTX}",
                                   f"python -m distill serve run_dir={RUN_DIR_FROM_PUBLISH} serve.student_endpoint="
                                   f"{rule.student.endpoint} serve.confidence=sequence"]),
                  "The second line puts the gateway in front of that server; it then routes on the probability of "
                  "the answer the server wrote (`serve.confidence=sequence`), not the scored confidence the "
                  "threshold was chosen on, so prefer the plain `python -m distill serve` above.", "",
                  "### Ollama (not installed by distill: https://ollama.com)", "",
                  *_fence("bash", [f"ollama create {name} -f {paths.MODELFILE}", f"ollama run {name}"])]
    hf_rel = next((rel for rel, art in published.items() if art["type"] == "merged"), None)
    nf4_rel = next((rel for rel, art in published.items() if art["type"] == "nf4"), None)
    if hf_rel or nf4_rel:
        vllm = []
        if hf_rel:
            vllm.append(f"vllm serve {hf_rel} --served-model-name {name} --host {host} --port {port} "
                        f"--max-model-len {SERVER_CTX} --generation-config auto")
        if nf4_rel:
            vllm.append(f"vllm serve {nf4_rel} --quantization bitsandbytes --served-model-name {name} "
                        f"--host {host} --port {port} --max-model-len {SERVER_CTX}")
        lines += ["### vLLM (not installed by distill: `pip install vllm`, a CUDA GPU)", "", *_fence("bash", vllm)]
    runio.atomic_write_text(staging / paths.SERVING, "\n".join(lines))
