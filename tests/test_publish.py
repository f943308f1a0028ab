"""publish on a tiny random student: merge, llama.cpp conversion and quantization, parity, stop token, routing files,
LiteLLM config, model card, and the refusals that publish nothing."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from conftest import tiny_overrides

from distill import DistillError, paths, pipeline, runio
from distill.config import load_config
from distill.routing import load_rule
from distill.stages import publish
from distill.student import endpoint, predict
from distill.student.predictions import Predictions
from distill.testing.fake_teacher import FakeTeacher

pytestmark = pytest.mark.integration

EOT = "<|im_end|>"


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, fake_answer):
    """generate -> train -> evaluate on the tiny student, once for the module; tests publish copies of it."""
    run_dir = tmp_path_factory.mktemp("publish") / "base"

    with FakeTeacher(fake_answer) as teacher:
        pipeline.run(load_config(tiny_overrides(run_dir, teacher.base_url)), stages=("generate", "train", "evaluate"))
    return run_dir


def _copy(base_run, tmp_path, name="run"):
    run_dir = tmp_path / name
    shutil.copytree(base_run, run_dir)
    return run_dir


def _cfg(run_dir, *extra):
    return load_config(tiny_overrides(run_dir, "http://127.0.0.1:9/v1", *extra))


def _fail_gate(run_dir):
    done = runio.read_done(run_dir, "evaluate")
    done["summary"]["gate"] = {"passed": False, "reasons": ["agreement 0.000 < eval.gate.min_agreement 0.9"]}
    runio.write_json(paths.stage_dir(run_dir, "evaluate") / paths.DONE, done)


def _assert_untouched(run_dir, before: dict[str, str]):
    """publish/ holds exactly what it held before, and no staging folder is left behind."""
    final = paths.stage_dir(run_dir, "publish")
    after = {p.relative_to(final).as_posix(): p.read_text() for p in final.rglob("*") if p.is_file()}
    assert after == before
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".publish-staging")]


@pytest.fixture(scope="module")
def published(base_run, tmp_path_factory):
    """A forced publish (the gate failed) with q8_0 from the converter and q4_k_m from the quantizer."""
    run_dir = _copy(base_run, tmp_path_factory.mktemp("published"))
    _fail_gate(run_dir)
    cfg = _cfg(run_dir, "publish.force=true", "publish.gguf_types=[q8_0,q4_k_m]")
    summary = publish.run(cfg, run_dir)
    return run_dir, cfg, summary


def _gguf(run_dir, qtype):
    (path,) = (run_dir / "publish" / paths.MODEL_DIR).glob(f"*-{qtype}.gguf")
    return path


def test_merge_and_quantize_carry_template_and_stop_token(published):
    import torch
    from gguf import GGUFReader
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from distill.student.models import load_base

    run_dir, cfg, summary = published
    hf = run_dir / "publish" / paths.MODEL_DIR / paths.HF_DIR
    tokenizer = AutoTokenizer.from_pretrained(hf)
    eot_id = tokenizer.convert_tokens_to_ids(EOT)
    assert tokenizer.chat_template and json.loads((hf / "generation_config.json").read_text())["eos_token_id"] == eot_id

    # The merged weights are the base plus the trained LoRA delta: q_proj moved, k_proj (no adapter) did not.
    base, _ = load_base(cfg)
    merged = load_file(hf / "model.safetensors")
    key = "model.layers.0.self_attn.{}.weight"
    assert not torch.allclose(merged[key.format("q_proj")], base.state_dict()[key.format("q_proj")])
    assert torch.equal(merged[key.format("k_proj")], base.state_dict()[key.format("k_proj")])

    for qtype, expected in (("q8_0", "Q8_0"), ("q4_k_m", "Q5_0")):
        reader = GGUFReader(str(_gguf(run_dir, qtype)))
        assert reader.fields["tokenizer.chat_template"].contents() == tokenizer.chat_template
        assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == eot_id
        assert expected in {t.tensor_type.name for t in reader.tensors}
        # publish.embedding_type (default f16): the tied embedding / output matrix is not quantized
        assert {t.name: t.tensor_type.name for t in reader.tensors}["token_embd.weight"] == "F16"
    # hidden size 64 is not a multiple of the 256-wide k-quant block: llama.cpp falls back per tensor, recorded
    q4 = summary["artifacts"][f"{paths.MODEL_DIR}/{_gguf(run_dir, 'q4_k_m').name}"]
    assert q4["quantizer_fallbacks"].get("q5_0", 0) > 0 and q4["tensor_types"]["Q5_0"] > 0
    assert not list((run_dir / "publish" / paths.MODEL_DIR).glob("*-f16.gguf"))  # the quantizer's input is not kept


def test_embedding_type_null_leaves_q8_0_to_the_converter(published, tmp_path):
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    run_dir, _, _ = published
    hf = run_dir / "publish" / paths.MODEL_DIR / paths.HF_DIR
    cfg = _cfg(run_dir, "publish.embedding_type=null", "publish.gguf_types=[q8_0]")
    (tmp_path / paths.MODEL_DIR).mkdir()
    artifacts = publish.build_artifacts(cfg, tmp_path, hf, AutoTokenizer.from_pretrained(hf), EOT)
    (rel,) = [rel for rel in artifacts if rel.endswith(".gguf")]
    types = {t.name: t.tensor_type.name for t in GGUFReader(str(tmp_path / rel)).tensors}
    assert types["token_embd.weight"] == "Q8_0" and "quantizer_fallbacks" not in artifacts[rel]
    assert not list((tmp_path / paths.MODEL_DIR).glob("*-f16.gguf"))


def test_every_artifact_has_parity_in_its_runtime(published):
    run_dir, cfg, summary = published
    parity = runio.read_json(run_dir / "publish" / paths.PARITY)
    n_eval = len(runio.read_jsonl(run_dir / "evaluate" / paths.PREDICTIONS))
    assert set(parity) == set(summary["artifacts"]) and len(parity) == 3
    for rel, res in parity.items():
        # published, so at publish.min_parity or above; a share of the n items that answered alike
        assert res["n"] == n_eval and res["published"] and res["parity"] >= cfg.publish.min_parity
        assert round(res["parity"] * n_eval) / n_eval == pytest.approx(res["parity"], abs=1e-4)
    # The merged model in transformers, scored as evaluate scored the student, answers exactly as it did.
    assert parity[f"{paths.MODEL_DIR}/{paths.HF_DIR}"]["parity"] == 1.0
    for rel in parity:
        if rel.endswith(".gguf"):  # served twice: freely (parity) and with the task's schema (as a gateway calls it)
            assert parity[rel]["reference"].startswith("merged full-precision student")
            served = parity[rel]["served_with_schema"]
            assert set(served) >= {"agreement_with_student", "agreement_with_teacher", "invalid_rate"}
            assert parity[rel]["stop_check"]["completion_tokens"] >= 1
            assert summary["checks"][rel.split("/")[-1]]["loads"] is True
    # publish's own report says how each shipped file answers the test items, in the same figures
    report = (run_dir / "publish" / paths.REPORT).read_text()
    for rel, res in parity.items():
        assert f"`{rel}`" in report and f"{res['parity'] * 100:.1f}% of {res['n']} test items; published" in report


def test_served_gguf_ends_a_generation_at_the_end_of_turn_token(published):
    import openai
    from transformers import AutoTokenizer

    from distill.teacher.server import LlamaCppServer

    run_dir, _, _ = published
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "publish" / paths.MODEL_DIR / paths.HF_DIR)
    eot_id, word_id = tokenizer.convert_tokens_to_ids(EOT), tokenizer.convert_tokens_to_ids("hello")
    with LlamaCppServer(_gguf(run_dir, "q8_0"), alias="student", n_ctx=512) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="not-needed", max_retries=0)

        def ask(bias: dict):
            return client.chat.completions.create(model="student", messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=6, temperature=0, logit_bias=bias)

        # The random student is pushed to emit <|im_end|> first: the server must treat it as the end of the turn.
        stopped = ask({str(eot_id): 100})
        assert stopped.choices[0].finish_reason == "stop"
        assert stopped.usage.completion_tokens <= 1 and EOT not in (stopped.choices[0].message.content or "")
        # Control: pushed to an ordinary token it runs to max_tokens, so the stop above came from the EOT token.
        runaway = ask({str(word_id): 100})
        assert runaway.choices[0].finish_reason == "length" and runaway.usage.completion_tokens == 6


def test_routing_yaml_validates_and_rests_on_the_evaluated_results(published):
    import jsonschema

    run_dir, cfg, summary = published
    pub = run_dir / "publish"
    rule = load_rule(pub / paths.ROUTING)
    jsonschema.validate(yaml.safe_load((pub / paths.ROUTING).read_text()),
                        json.loads((pub / paths.ROUTING_SCHEMA).read_text()))
    results = runio.read_json(run_dir / "evaluate" / paths.RESULTS)
    assert rule.evidence.results_sha256 == runio.sha256_file(run_dir / "evaluate" / paths.RESULTS)
    assert rule.task.id == "support_tickets" and rule.student.stop == [EOT]
    assert rule.task.output_schema == cfg.recipe.output_schema
    assert rule.fallback.model == "fake-teacher" and rule.fallback.endpoint == cfg.teacher.base_url
    assert set(rule.student.artifacts.values()) == set(summary["artifacts"])
    # Four val items are fewer than publish.min_route_items: no threshold, every request to the teacher.
    assert rule.route.enabled is False and "min_route_items" in rule.route.reason
    assert rule.cost.teacher_usd_per_1k == results["cost"]["teacher_usd_per_1k"]
    assert rule.cost.blended_usd_per_1k == rule.cost.teacher_usd_per_1k


def test_route_enabled_on_a_curve_that_meets_the_target(published, tmp_path):
    """The same publish code on a results.json whose val curve reaches the target: threshold, coverage, cost."""
    from distill.task import Task

    run_dir, cfg, summary = published
    results = runio.read_json(run_dir / "evaluate" / paths.RESULTS)
    results["val_coverage_curve"] = [{"threshold": 0.0, "coverage": 1.0, "agreement": 0.9, "n": 50},
                                     {"threshold": 0.6, "coverage": 0.7, "agreement": 0.98, "n": 35},
                                     {"threshold": 0.9, "coverage": 0.3, "agreement": 1.0, "n": 15}]
    results["coverage_curve"] = [{"threshold": 0.0, "coverage": 1.0, "agreement": 0.88, "n": 40},
                                 {"threshold": 0.5, "coverage": 0.9, "agreement": 0.9, "n": 36},
                                 {"threshold": 0.65, "coverage": 0.75, "agreement": 0.97, "n": 30}]
    results["cost"] = {"teacher_usd_per_1k": 0.5, "student_usd_per_1k": 0.05}
    rule = publish.build_rule(cfg, Task(cfg), results, "b" * 64, summary["artifacts"], EOT)
    assert rule.route.enabled and rule.route.confidence_threshold == 0.6 and rule.route.expected_coverage == 0.7
    assert (rule.evidence.test_coverage, rule.evidence.test_agreement) == (0.75, 0.97)
    assert rule.cost.blended_usd_per_1k == pytest.approx(0.05 + 0.3 * 0.5)
    assert rule.cost.saving_vs_teacher == pytest.approx(1 - 0.2 / 0.5)


def _runtime_curves(gguf, hf_dir, task, val_rows, test_rows, max_new_tokens):
    """The served GGUF's val and test curves, recomputed apart from publish: the student runtime the gateway starts
    (a child process on loopback), asked over HTTP as the gateway asks it, then evaluate's curve code."""
    import httpx

    from distill.metrics.stats import coverage_curve
    from distill.serve.runtime import SCORE_PATH, StudentRuntime

    def curve(runtime, rows):
        conf, agree = [], []
        for r in rows:
            got = httpx.post(runtime.base_url + SCORE_PATH, timeout=60,
                             json={"messages": task.student_messages(r["input"]), "schema": task.schema.schema,
                                   "max_new_tokens": max_new_tokens}).json()
            answer = got["answer"] if got["answer"] is not None and not task.schema.errors(got["answer"]) else None
            conf.append(got["confidence"] if answer is not None else None)
            agree.append(answer is not None and answer == r["teacher"])
        return coverage_curve(conf, agree), conf

    with StudentRuntime(gguf, hf_dir) as runtime:
        (val_curve, _), (test_curve, test_conf) = curve(runtime, val_rows), curve(runtime, test_rows)
    return val_curve, test_curve, test_conf


def test_threshold_and_test_evidence_come_from_the_served_ggufs_confidence(base_run, tmp_path):
    """routing.yaml's threshold is chosen on the confidence the gateway computes on the GGUF it serves, not on
    evaluate's unquantized student: recomputed here through the student runtime, they match exactly."""
    from distill.routing import choose_threshold, point_at
    from distill.task import Task, load_split

    run_dir = _copy(base_run, tmp_path)
    # one val item per curve point is enough here; the target 0 makes the route take the most coverage it can
    cfg = _cfg(run_dir, "publish.gguf_types=[q8_0]", "publish.min_route_items=1", "publish.target_agreement=0.0")
    publish.run(cfg, run_dir)
    pub = run_dir / "publish"
    rule = load_rule(pub / paths.ROUTING)
    gguf = _gguf(run_dir, "q8_0")
    rel = gguf.relative_to(pub).as_posix()
    val_rows = load_split(run_dir, "val")[: cfg.eval.limit]
    test_rows = [r for r in runio.read_jsonl(run_dir / "evaluate" / paths.PREDICTIONS) if not r["contaminated"]]
    assert len(val_rows) >= 2 and test_rows
    val_curve, test_curve, test_conf = _runtime_curves(gguf, pub / paths.MODEL_DIR / paths.HF_DIR, Task(cfg),
                                                       val_rows, test_rows, cfg.eval.max_new_tokens)
    expected = choose_threshold(val_curve, 0.0, 1)
    point = point_at(test_curve, expected.threshold)
    assert rule.route.enabled and rule.route.confidence_threshold == expected.threshold
    assert (rule.route.expected_coverage, rule.route.expected_agreement) == (expected.coverage, expected.agreement)
    assert (rule.evidence.test_coverage, rule.evidence.test_agreement) == (point["coverage"], point["agreement"])
    assert rule.evidence.artifact == rel and rel in rule.evidence.curve and rel in rule.route.reason
    assert rule.evidence.n_val == len(val_rows)
    # parity.json keeps the curves the rule rests on, under the served artifact
    served = runio.read_json(pub / paths.PARITY)[rel]["served_confidence"]
    assert served["val_coverage_curve"] == val_curve and served["coverage_curve"] == test_curve
    # ... and they are not evaluate's: q8_0 moves the confidences a little
    evaluated = [r["confidence"] for r in test_rows]
    assert served["max_confidence_diff"] == pytest.approx(max(abs(a - b) for a, b in zip(test_conf, evaluated)),
                                                          abs=1e-6)
    assert 0 < served["max_confidence_diff"] < 0.01
    # report.md says whose confidence the threshold was chosen on
    report = (pub / paths.REPORT).read_text()
    assert f"Chosen on the confidence of `{rel}` as the gateway computes it" in report
    assert f"route enabled at confidence >= {expected.threshold}" in report


def test_without_a_served_gguf_the_threshold_stays_on_evaluates_curve(base_run, tmp_path):
    run_dir = _copy(base_run, tmp_path)
    publish.run(_cfg(run_dir, "publish.gguf_types=[]", "publish.min_route_items=1", "publish.target_agreement=0.0"),
                run_dir)
    rule = load_rule(run_dir / "publish" / paths.ROUTING)
    results = runio.read_json(run_dir / "evaluate" / paths.RESULTS)
    from distill.routing import choose_threshold

    assert rule.evidence.artifact is None and rule.evidence.curve == "val_coverage_curve"
    assert rule.route.confidence_threshold == choose_threshold(results["val_coverage_curve"], 0.0, 1).threshold
    assert "Chosen on evaluate's in-process student" in (run_dir / "publish" / paths.REPORT).read_text()


def test_litellm_config_loads_and_sends_task_traffic_to_the_gateway(published, monkeypatch):
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download of litellm's price list
    from litellm import Router

    run_dir, _, _ = published
    pub = run_dir / "publish"
    config = yaml.safe_load((pub / paths.LITELLM).read_text())
    Router(model_list=config["model_list"])  # the published file loads as written
    rule = load_rule(pub / paths.ROUTING)
    assert "router_settings" not in config  # no LiteLLM fallback: it would send the teacher the bare input
    assert [m["model_name"] for m in config["model_list"]] == ["support_tickets", rule.fallback.model]
    messages = [{"role": "user", "content": "my card was charged twice"}]
    answer = '{"category": "billing", "priority": "low"}'
    with FakeTeacher(lambda m: answer) as gateway:  # stands in for `python -m distill serve`
        live = yaml.safe_load(yaml.safe_dump(publish.litellm_config(rule, gateway.base_url)))
        router = Router(model_list=live["model_list"], num_retries=0)
        assert router.completion(model="support_tickets", messages=messages).choices[0].message.content == answer
    sent = gateway.calls[-1]
    assert sent["model"] == "support_tickets" and sent["messages"] == messages  # the gateway builds the prompts
    assert sent["response_format"] == rule.prompt.response_format


def test_modelfile_template_reproduces_the_chat_template(published):
    from transformers import AutoTokenizer

    run_dir, cfg, _ = published
    pub = run_dir / "publish"
    text = (pub / paths.MODELFILE).read_text()
    assert f'PARAMETER stop "{EOT}"' in text
    gguf = text.split("FROM ./", 1)[1].splitlines()[0]
    assert (pub / gguf).is_file() and gguf.endswith("-q8_0.gguf")
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    tokenizer = AutoTokenizer.from_pretrained(pub / paths.MODEL_DIR / paths.HF_DIR)
    messages = [{"role": "system", "content": "SYS"}, {"role": "user", "content": "a ticket"}]
    rendered = template.replace("{{ .System }}", "SYS").replace("{{ .Prompt }}", "a ticket").replace(
        "{{ .Response }}", '{"x": 1}')
    expected = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": '{"x": 1}'}],
                                             tokenize=False)
    assert rendered == expected.rstrip("\n")
    serving = (pub / paths.SERVING).read_text()
    assert f"vllm serve {paths.MODEL_DIR}/{paths.HF_DIR}" in serving and "python -m llama_cpp.server --model model/" in serving
    assert "llama-server" not in serving


def test_card_records_force_parity_and_lineage(published):
    run_dir, _, summary = published
    card = (run_dir / "publish" / paths.MODEL_CARD).read_text()
    assert summary["forced"] is True and "publish.force=true although the evaluate gate FAILED" in card
    assert "agreement 0.000 < eval.gate.min_agreement 0.9" in card
    train = runio.read_done(run_dir, "train")["summary"]
    generate = runio.read_done(run_dir, "generate")["summary"]
    assert train["adapter_sha256"] in card and generate["data_sha256"]["train"][:16] in card
    for rel, sha in summary["files_sha256"].items():
        assert runio.sha256_file(run_dir / "publish" / rel) == sha and f"`{rel}`: sha256 {sha}" in card
    assert "| parity |" in card and "[" in card.split("## Evaluation")[1].split("##")[0]  # intervals shown


def test_the_student_is_priced_from_the_served_ggufs_timed_pass(published):
    """routing.yaml's and the card's student cost come from publish's served-confidence pass (the q8_0 GGUF in the
    student runtime), not from evaluate's in-process throughput, and both say so; results.json keeps evaluate's."""
    run_dir, cfg, summary = published
    pub = run_dir / "publish"
    rel = _gguf(run_dir, "q8_0").relative_to(pub).as_posix()
    served = runio.read_json(pub / paths.PARITY)[rel]["served_confidence"]
    t = served["throughput"]
    assert t["measured_by"] == "publish" and t["artifact"] == rel and t["concurrency"] == 1
    assert t["items"] == served["n_val"] + served["n_test"]
    # wall_s is rounded to 1 ms and items_per_s to 1e-4: the rate lies between those the rounding bounds allow
    low, high = t["items"] / (t["wall_s"] + 5e-4), t["items"] / max(t["wall_s"] - 5e-4, 1e-9)
    assert low - 1e-4 <= t["items_per_s"] <= high + 1e-4
    evaluated = runio.read_json(run_dir / "evaluate" / paths.RESULTS)["cost"]
    assert evaluated["student"]["throughput"]["measured_by"] == "evaluate"
    assert evaluated["student"]["items_per_s"] != t["items_per_s"]
    expected = round(1000 * cfg.eval.cost.student_usd_per_hour / 3600 / t["items_per_s"], 6)
    rule = load_rule(pub / paths.ROUTING)
    assert rule.cost.student_usd_per_1k == summary["cost_case"]["student_usd_per_1k"] == expected
    assert rule.cost.student_usd_per_1k != evaluated["student_usd_per_1k"]
    assert summary["cost_case"]["student"]["throughput"] == t
    line = f"- student priced at {t['items_per_s']:.4g} items/s and ${cfg.eval.cost.student_usd_per_hour}/h: {rel} in "
    assert line in (pub / paths.MODEL_CARD).read_text() and line in (pub / paths.REPORT).read_text()
    assert "measured by publish" in (pub / paths.MODEL_CARD).read_text()


def test_failed_gate_publishes_nothing(base_run, tmp_path):
    run_dir = _copy(base_run, tmp_path)
    _fail_gate(run_dir)
    (run_dir / "publish").mkdir()
    (run_dir / "publish" / "previous.txt").write_text("an earlier, complete publish")
    with pytest.raises(DistillError, match="evaluate gate failed .*agreement 0.000.*publish.force=true"):
        publish.run(_cfg(run_dir), run_dir)
    _assert_untouched(run_dir, {"previous.txt": "an earlier, complete publish"})


def _truncate(adapter):
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _tamper(adapter):
    (adapter / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text() + "\n")


@pytest.mark.parametrize("damage, message", [
    (lambda a: (a / "adapter_model.safetensors").unlink(), "no trained adapter in .*re-run `python -m distill train"),
    (lambda a: shutil.rmtree(a), "no trained adapter in"),
    (_truncate, "adapter in .* is corrupt .*re-run `python -m distill train"),
    (lambda a: (a / "adapter_config.json").write_text("{not json"), "is corrupt"),
    (_tamper, "changed after train finished"),
])
def test_missing_or_corrupt_adapter_publishes_nothing(base_run, tmp_path, damage, message):
    run_dir = _copy(base_run, tmp_path)
    damage(paths.adapter_path(run_dir))
    with pytest.raises(DistillError, match=message):
        publish.run(_cfg(run_dir), run_dir)
    assert not (run_dir / "publish").exists()
    _assert_untouched(run_dir, {})


def test_nf4_without_cuda_is_refused_up_front(base_run, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    run_dir = _copy(base_run, tmp_path)
    with pytest.raises(DistillError, match="publish.nf4 needs a CUDA GPU"):
        publish.run(_cfg(run_dir, "publish.nf4=true"), run_dir)
    assert not (run_dir / "publish").exists()


def test_parity_needs_the_in_process_student_as_reference(base_run, tmp_path):
    run_dir = _copy(base_run, tmp_path)
    results_file = run_dir / "evaluate" / paths.RESULTS
    results = runio.read_json(results_file)
    results["predictor"] = {"kind": "endpoint", "base_url": "http://127.0.0.1:8080/v1", "model": "m"}
    runio.write_json(results_file, results)
    with pytest.raises(DistillError, match="evaluate scored an endpoint .*without eval.endpoint.base_url"):
        publish.run(_cfg(run_dir), run_dir)
    assert not (run_dir / "publish").exists()


def _wrong_answers(rows):
    wrong = {"category": "billing", "priority": "urgent"}
    answers = [wrong if r.get("student") != wrong else {"category": "feedback", "priority": "low"} for r in rows]
    n = len(rows)
    return Predictions(answers, [json.dumps(a) for a in answers], [None] * n, [0.5] * n, [0.01] * n, {})


def test_an_artifact_below_min_parity_is_not_published(base_run, tmp_path, monkeypatch):
    run_dir = _copy(base_run, tmp_path)
    monkeypatch.setattr(endpoint, "predict_endpoint", lambda cfg, task, rows, url, name: _wrong_answers(rows))
    evaluate_report = (run_dir / "evaluate" / paths.REPORT).read_bytes()
    summary = publish.run(_cfg(run_dir, "publish.gguf_types=[q8_0]"), run_dir)
    pub = run_dir / "publish"
    (gguf_rel,) = [rel for rel in runio.read_json(pub / paths.PARITY) if rel.endswith(".gguf")]
    assert not (pub / gguf_rel).exists() and gguf_rel not in summary["artifacts"]
    assert summary["dropped"][gguf_rel] == "parity 0.0 < publish.min_parity 0.9"
    assert (pub / paths.MODEL_DIR / paths.HF_DIR / "model.safetensors").exists()
    assert gguf_rel not in load_rule(pub / paths.ROUTING).student.artifacts.values()
    assert not (pub / paths.MODELFILE).exists()  # nothing left for Ollama to load
    assert "no: parity 0.0 < publish.min_parity 0.9" in (pub / paths.MODEL_CARD).read_text()
    report = (pub / paths.REPORT).read_text()
    assert f"`{gguf_rel}`, served by the llama.cpp server: the same answer as the in-process student on 0.0%" \
        in report and "NOT published (parity 0.0 < publish.min_parity 0.9)" in report
    # evaluate's report is evaluate's alone: byte for byte what evaluate wrote, whether or not publish ran
    assert (run_dir / "evaluate" / paths.REPORT).read_bytes() == evaluate_report


def test_nothing_reaching_min_parity_publishes_nothing(base_run, tmp_path, monkeypatch):
    run_dir = _copy(base_run, tmp_path)
    monkeypatch.setattr(predict, "predict_in_process", lambda cfg, task, rows, m, t: _wrong_answers(rows))
    with pytest.raises(DistillError, match=r"no artifact reached publish.min_parity 0.9 \(model/hf 0.0\)"):
        publish.run(_cfg(run_dir, "publish.gguf_types=[]"), run_dir)
    assert not (run_dir / "publish").exists()
    _assert_untouched(run_dir, {})
