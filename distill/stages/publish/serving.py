"""publish's serving files: the routing rule, its JSON schema, a LiteLLM config, an Ollama Modelfile and SERVING.md.

    python -m distill publish run_dir=DIR [publish.target_agreement=0.98] [publish.endpoint=http://127.0.0.1:8080/v1]

The routing rule (distill.routing) takes its confidence threshold from evaluate's validation coverage curve
(publish.target_agreement), its costs from results.json, and names the published artifacts; the other files serve
those artifacts with the model's own chat template and stop token. student=embed_classifier is loaded in process,
so it gets the rule and SERVING.md only.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import yaml

from distill import DistillError, paths, routing, runio
from distill.config import Config
from distill.stages.publish.gguf import model_name
from distill.student import embed_classifier
from distill.task import Task
from distill.teacher.server import embedded_gguf

SERVER_CTX = 2048  # context the llama.cpp server gets for parity checks and in the serving snippets


def _fallback(cfg: Config) -> routing.FallbackSpec:
    if cfg.teacher.kind == "openai":
        return routing.FallbackSpec(model=cfg.teacher.model, endpoint=cfg.teacher.base_url,
                                    api_key_env=cfg.teacher.api_key_env)
    # distill starts the embedded teacher on a random loopback port; SERVING.md serves it on a fixed one.
    return routing.FallbackSpec(model=cfg.teacher.model or "teacher", endpoint=_teacher_local_endpoint(cfg))


def _teacher_local_endpoint(cfg: Config) -> str:
    student = urlparse(cfg.publish.endpoint)
    return f"{student.scheme}://{student.hostname}:{(student.port or 80) + 1}/v1"


def build_rule(cfg: Config, task: Task, results: dict, results_sha: str, published: dict,
               eot: str) -> routing.RoutingRule:
    """The routing rule: threshold from the validation curve, coverage and blended cost, evidence."""
    target = cfg.publish.target_agreement
    val_curve = results.get("val_coverage_curve")
    test_curve = results.get("coverage_curve") or []
    cost = results.get("cost") or {}
    choice = None
    if not val_curve:
        reason = "results.json has no val_coverage_curve (student confidence on the val split); re-run evaluate"
    else:
        choice = routing.choose_threshold(val_curve, target, cfg.publish.min_route_items)
        n_val = max(p.get("n", 0) for p in val_curve)
        best = max((p.get("agreement") or 0.0 for p in val_curve if p.get("n", 0) >= cfg.publish.min_route_items),
                   default=None)
        if choice:
            reason = (f"confidence >= {choice.threshold} keeps {choice.coverage:.1%} of val items at agreement "
                      f"{choice.agreement:.3f} >= target {target}")
        elif best is None:
            reason = (f"the val split has {n_val} items, fewer than publish.min_route_items "
                      f"{cfg.publish.min_route_items}: too few to choose a threshold; every request goes to the "
                      f"teacher")
        else:
            reason = (f"no confidence threshold reaches agreement {target} on >= {cfg.publish.min_route_items} val "
                      f"items (best {best:.3f}); every request goes to the teacher")
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
        evidence=routing.Evidence(results_sha256=results_sha, curve="val_coverage_curve",
                                  n_val=max((p.get("n", 0) for p in val_curve), default=0) if val_curve else None,
                                  test_coverage=test_point and test_point["coverage"],
                                  test_agreement=test_point and test_point["agreement"]))
    return routing.validate_rule(rule.model_dump(mode="json"), "the routing rule publish built")


def _artifact_key(art: dict) -> str:
    return f"gguf-{art['type']}" if art["format"] == "gguf" else f"safetensors-{art['type']}"


def litellm_config(rule: routing.RoutingRule) -> dict:
    """A LiteLLM router config: the task's name served by the student, falling back to the teacher on errors."""
    teacher_name = f"{rule.task.id}-teacher"
    student = {"model": f"openai/{rule.student.model}", "api_base": rule.student.endpoint, "api_key": "none",
               "stop": rule.student.stop, "max_tokens": rule.student.max_tokens,
               "temperature": rule.student.temperature}
    teacher = {"model": f"openai/{rule.fallback.model}", "api_base": rule.fallback.endpoint,
               "api_key": f"os.environ/{rule.fallback.api_key_env}" if rule.fallback.api_key_env else "none"}
    return {"model_list": [{"model_name": rule.task.id, "litellm_params": student},
                           {"model_name": teacher_name, "litellm_params": teacher}],
            "router_settings": {"fallbacks": [{rule.task.id: [teacher_name]}]}}


def ollama_template(tokenizer, eot: str) -> str:
    """An Ollama TEMPLATE rendered from the model's own chat template (one system + one user turn, as trained)."""
    sys_mark, user_mark = "\u2063SYSTEM\u2063", "\u2063PROMPT\u2063"
    prompt = tokenizer.apply_chat_template([{"role": "system", "content": sys_mark},
                                            {"role": "user", "content": user_mark}],
                                           tokenize=False, add_generation_prompt=True)
    return prompt.replace(sys_mark, "{{ .System }}").replace(user_mark, "{{ .Prompt }}") + "{{ .Response }}" + eot


def write_serving(cfg: Config, task: Task, staging: Path, rule: routing.RoutingRule, published: dict,
                  tokenizer, eot: str) -> None:
    """routing.yaml + its JSON schema, litellm.yaml, Modelfile and SERVING.md."""
    header = (f"# distill routing rule, schema version {routing.SCHEMA_VERSION} (routing.schema.json); "
              f"load with distill.routing.load_rule\n")
    runio.atomic_write_text(staging / paths.ROUTING, header + yaml.safe_dump(rule.model_dump(mode="json"),
                                                                             sort_keys=False, allow_unicode=True))
    runio.write_json(staging / paths.ROUTING_SCHEMA, routing.json_schema())
    if rule.student.kind == "embed_classifier":  # loaded in process: no server, so no LiteLLM or Ollama config
        runio.atomic_write_text(staging / paths.SERVING, embed_classifier.serving_markdown(rule.student.model))
        return
    runio.atomic_write_text(staging / paths.LITELLM, "# litellm --config litellm.yaml  (fallback on errors; the "
                            "confidence rule is distill.routing.decide)\n"
                            + yaml.safe_dump(litellm_config(rule), sort_keys=False, allow_unicode=True))
    ggufs = [rel for rel, art in published.items() if art["format"] == "gguf"]
    gguf = next((g for g in ggufs if g.endswith("-q8_0.gguf")), ggufs[0] if ggufs else None)
    name, endpoint = rule.student.model, urlparse(rule.student.endpoint)
    port = endpoint.port or 8080
    lines = [f"# Serving {name}", "",
             f"Answers end at `{eot}`; every command below keeps the model's chat template and that stop token.",
             "Constrain each answer to the task's schema (`task.output_schema` in routing.yaml) per request: "
             "llama.cpp `response_format={\"type\": \"json_object\", \"schema\": ...}`, vLLM / OpenAI "
             "`{\"type\": \"json_schema\", ...}`, Ollama `format: <schema>`.", ""]
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
        lines += ["## llama.cpp", "", "```bash",
                  f"llama-server -m {gguf} --host {endpoint.hostname} --port {port} --alias {name} --jinja "
                  f"-c {SERVER_CTX}",
                  f"python -m llama_cpp.server --model {gguf} --host {endpoint.hostname} --port {port} "
                  f"--model_alias {name} --n_ctx {SERVER_CTX}", "```", "",
                  "## Ollama", "", "```bash", f"ollama create {name} -f {paths.MODELFILE}", f"ollama run {name}",
                  "```", ""]
    hf_rel = next((rel for rel, art in published.items() if art["type"] == "merged"), None)
    nf4_rel = next((rel for rel, art in published.items() if art["type"] == "nf4"), None)
    if hf_rel or nf4_rel:
        lines += ["## vLLM", "", "```bash"]
        if hf_rel:
            lines.append(f"vllm serve {hf_rel} --served-model-name {name} --host {endpoint.hostname} --port {port} "
                         f"--max-model-len {SERVER_CTX} --generation-config auto")
        if nf4_rel:
            lines.append(f"vllm serve {nf4_rel} --quantization bitsandbytes --served-model-name {name} "
                         f"--host {endpoint.hostname} --port {port} --max-model-len {SERVER_CTX}")
        lines += ["```", ""]
    if cfg.teacher.kind != "openai":  # the embedded teacher has no fixed address: serve it where litellm.yaml says
        fb = urlparse(rule.fallback.endpoint)
        lines += ["## The teacher (fallback)", "", "```bash",
                  f"python -m llama_cpp.server --model {cfg.teacher.model_path or embedded_gguf()} --host "
                  f"{fb.hostname} --port {fb.port} --model_alias {rule.fallback.model}", "```", ""]
    lines += ["## Gateway", "", "```bash", f"litellm --config {paths.LITELLM}", "```", "",
              f"Requests for model `{rule.task.id}` (or with metadata `distill_task: {rule.task.id}`) go to the "
              "student; LiteLLM falls back to the teacher when the student errors. The confidence rule in "
              f"`{paths.ROUTING}` is applied with `distill.routing.decide(rule, request, answer, confidence)`.", ""]
    runio.atomic_write_text(staging / paths.SERVING, "\n".join(lines))
