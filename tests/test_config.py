"""Every option of every config group composes and validates; bad input gets one clear message."""

from __future__ import annotations

import pytest

from distill import DistillError
from distill.config import CONF_DIR, group_options, load_config, load_yaml


def _options():
    for group, options in group_options().items():
        for option in options:
            yield group, option


@pytest.mark.parametrize("group,option", list(_options()))
def test_every_option_of_every_group_composes(group, option, tmp_path):
    extra = ["teacher.model=served-model"] if (group, option) == ("teacher", "vllm") else []
    cfg = load_config([f"{group}={option}", f"run_dir={tmp_path}", *extra])
    if group == "profile":
        assert cfg.train.max_steps >= 1
    elif group == "recipe":
        assert cfg.recipe.name == option and cfg.recipe.dir.is_dir()
    else:  # every value the option's file sets is what the config holds (unless the default profile resizes it)
        picked = getattr(cfg, group).model_dump(mode="json")
        resized = load_yaml(CONF_DIR / "profile" / "demo.yaml").get(group) or {}
        for key, value in load_yaml(CONF_DIR / group / f"{option}.yaml").items():
            if key in resized or key == "defaults":
                continue
            if extra and key == "model":
                value = "served-model"
            assert _subset(value, picked[key]), (group, option, key, value, picked[key])


def _subset(want, got) -> bool:
    """``want`` (a YAML value) is ``got``: dicts may hold more keys than the YAML names (model defaults)."""
    if isinstance(want, dict):
        return isinstance(got, dict) and all(k in got and _subset(v, got[k]) for k, v in want.items())
    return want == got


def test_profiles_resize_the_run(tmp_path):
    smoke = load_config(["profile=smoke", f"run_dir={tmp_path}"])
    demo = load_config(["profile=demo", f"run_dir={tmp_path}"])
    assert smoke.generate.limit is not None and demo.generate.limit is None
    assert smoke.train.max_steps < demo.train.max_steps


def test_command_line_overrides_win_over_profile(tmp_path):
    cfg = load_config(["profile=smoke", "train.max_steps=17", f"run_dir={tmp_path}"])
    assert cfg.train.max_steps == 17


def test_unknown_key_is_named():
    with pytest.raises(DistillError, match="unknown config key 'train.nonsense'"):
        load_config(["train.nonsense=1"])


def test_unknown_recipe_lists_known_ones():
    with pytest.raises(DistillError, match="unknown recipe 'nope'.*support_tickets"):
        load_config(["recipe=nope"])


def test_unknown_group_option_lists_choices():
    with pytest.raises(DistillError, match="teacher/gpt9.*local"):
        load_config(["teacher=gpt9"])


def test_all_bad_values_reported_at_once():
    with pytest.raises(DistillError) as err:
        load_config(["train.max_steps=0", "train.lr=abc", "eval.gate.min_agreement=2"])
    message = str(err.value)
    for key in ("train.max_steps", "train.lr", "eval.gate.min_agreement"):
        assert key in message


def test_api_key_in_place_of_env_name_is_refused():
    with pytest.raises(DistillError, match="NAME of an environment variable"):
        load_config(["teacher=openai", "teacher.api_key_env=sk-dummykeyabcdefghijklmnopqrstu"])


def test_missing_input_file_is_named(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DistillError, match="nope.jsonl does not exist"):
        load_config([f"recipe.inputs={missing}"])


def test_a_recipe_outside_the_package_is_found_by_name(tmp_path, monkeypatch):
    import shutil

    from conftest import RECIPE_DIR

    folder = tmp_path / "my_recipes"
    folder.mkdir()
    shutil.copytree(RECIPE_DIR, folder / "my_tickets")
    text = (RECIPE_DIR.parent / "support_tickets.yaml").read_text().replace("name: support_tickets", "name: my_tickets")
    (folder / "my_tickets.yaml").write_text(text)
    cfg = load_config(["recipe=my_tickets", f"recipe_dir={folder}", f"run_dir={tmp_path / 'run'}"])
    assert cfg.recipe.name == "my_tickets" and cfg.recipe.dir == folder / "my_tickets"
    assert cfg.recipe_file("inputs") == folder / "my_tickets" / "inputs.jsonl"
    # ./recipes in the working directory is searched by default
    monkeypatch.chdir(tmp_path)
    folder.rename(tmp_path / "recipes")
    cfg = load_config(["recipe=my_tickets", f"run_dir={tmp_path / 'run'}"])
    assert cfg.recipe.dir == tmp_path / "recipes" / "my_tickets"


KEYS = ["gsk_" + "Q7x9LmB2vT4nR8kP1wZ6yH3cJ5dF0aE7sWq2Lp9Xc4Vb8Nm1Kz6",    # Groq (56): letters, digits, _ only
        "AIzaSyD4kP9wQ2mX7vL1nR5tB8cH3jF6gK0sE2a",          # Gemini
        "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz12345678",        # Hugging Face
        "Zq8Wm3Nc7Rb1Xv5Kt9Lp2Hd6Fy4Gs0Aa",                  # Mistral: 32 letters and digits
        "sk-proj-" + "Zq8Wm3Nc7Rb1Xv5Kt9Lp2Hd6Fy4Gs0Aa",  # split: no key-shaped literal in the repo
        "OPENAI_API_KEY\n", "my key", "$OPENAI_API_KEY", "1ABC", "A" * 65]


@pytest.mark.parametrize("setting", ["teacher.api_key_env", "eval.endpoint.api_key_env"])
@pytest.mark.parametrize("value", KEYS)
def test_env_name_settings_refuse_anything_but_a_name_and_never_echo_it(setting, value, tmp_path):
    with pytest.raises(DistillError) as err:
        load_config(["teacher=openai", f"{setting}={value}", f"run_dir={tmp_path}"])
    message = str(err.value)
    assert setting in message and "\n" not in message
    # a newline is refused by Hydra's override grammar already; everything else by the setting's check
    assert "NAME of an environment variable" in message or "cannot parse the override" in message
    assert "the value is not shown" in message
    assert value.strip() not in message and value.strip()[:12] not in message


@pytest.mark.parametrize("value", ["OPENAI_API_KEY", "GROQ_API_KEY", "HF_TOKEN", "MY_KEY_2", "hf_abc", "_KEY",
                                   "MISTRAL_API_KEY_FOR_THE_STAGING_PROJECT_2"])
def test_env_name_settings_accept_names_but_not_a_key_of_the_same_shape(value, tmp_path):
    cfg = load_config(["teacher=openai", f"teacher.api_key_env={value}", f"eval.endpoint.api_key_env={value}",
                       f"run_dir={tmp_path}"])
    assert cfg.teacher.api_key_env == value == cfg.eval.endpoint.api_key_env
    key = value[:3] + "Zq8Wm3Nc7Rb1Xv5Kt9Lp2Hd6Fy4Gs0Aa"  # the name's start, then a key's random tail
    with pytest.raises(DistillError, match="teacher.api_key_env: looks like an API key"):
        load_config(["teacher=openai", f"teacher.api_key_env={key}", f"run_dir={tmp_path}"])


@pytest.mark.parametrize("override", ["+teacher.api_key", "teacher.api_key", "+eval.endpoint.api_key",
                                      "+teacher.token", "+publish.hub_token", "+teacher.password"])
def test_a_secret_given_as_a_setting_is_refused_by_name_only(override):
    key = KEYS[0]
    with pytest.raises(DistillError) as err:
        load_config(["teacher=openai", f"{override}={key}"])
    message = str(err.value)
    assert override.lstrip("+") in message and "environment variable" in message
    assert key not in message and key[:12] not in message


def test_a_key_shaped_value_is_not_echoed_by_any_config_error():
    key = KEYS[0]
    with pytest.raises(DistillError) as err:  # a Hydra parse error quotes the override it could not parse
        load_config([f"teacher.model='{key}"])
    assert key not in str(err.value) and key[:12] not in str(err.value)
    with pytest.raises(DistillError) as err:  # a pydantic type error quotes the value it got
        load_config([f"train.max_steps={key}"])
    assert "train.max_steps" in str(err.value) and key not in str(err.value) and key[:12] not in str(err.value)
    with pytest.raises(DistillError, match=r"train.max_steps.*\(got 'abc'\)"):  # ordinary values still are
        load_config(["train.max_steps=abc"])


# --- cross-field checks at start-up -------------------------------------------------------------------------------


def test_cross_field_rules_fail_at_load_with_every_problem_named(tmp_path):
    with pytest.raises(DistillError) as err:
        load_config(["recipe=email_extraction", "teacher.method=score", "eval.endpoint.base_url=http://127.0.0.1:9/v1",
                     "+eval.gate.min_field_agreement.prio=0.9", f"run_dir={tmp_path}"])
    message = str(err.value)
    assert "teacher.method=score needs a fixed set of values" in message
    assert "eval.endpoint.model is required" in message
    assert "eval.gate.min_field_agreement names prio" in message and "its fields: order_id" in message


def test_a_base_url_for_the_embedded_teacher_is_refused_not_ignored(tmp_path):
    """teacher=local starts its own server: a teacher.base_url given with it used to be dropped without a word
    (generate and serve started the embedded model instead of asking the server the user named)."""
    with pytest.raises(DistillError) as err:
        load_config(["recipe=support_tickets", "teacher=local", "teacher.base_url=http://127.0.0.1:8080/v1",
                     f"run_dir={tmp_path}"])
    message = str(err.value)
    assert "teacher.base_url=http://127.0.0.1:8080/v1 would be ignored" in message
    assert "teacher.kind=openai teacher.base_url=URL teacher.model=NAME" in message
    cfg = load_config(["recipe=support_tickets", "teacher=openai", "teacher.base_url=http://127.0.0.1:8080/v1",
                       "teacher.model=m", f"run_dir={tmp_path}"])
    assert cfg.teacher.base_url == "http://127.0.0.1:8080/v1"


def test_a_bad_synthesis_section_fails_at_load(tmp_path):
    with pytest.raises(DistillError, match="recipe 'support_tickets' synthesis.per_cell: Input should be greater"):
        load_config(["generate.source=synthesize", "recipe.synthesis.per_cell=0", f"run_dir={tmp_path}"])
    with pytest.raises(DistillError, match="generate.source=synthesize needs a synthesis section"):
        load_config(["recipe=email_extraction", "generate.source=synthesize", f"run_dir={tmp_path}"])


def test_resolve_method_is_the_one_rule_generate_uses(tmp_path):
    from distill.config import resolve_method
    from distill.stages import generate

    assert generate.resolve_method is resolve_method
    assert resolve_method(load_config([f"run_dir={tmp_path}"])) == "score"  # local: auto, every field an enum
    assert resolve_method(load_config(["recipe=email_extraction", f"run_dir={tmp_path}"])) == "generate"


def test_values_that_begin_alike_are_never_labelled_by_first_token_scoring(tmp_path, capsys):
    from distill.__main__ import main
    from distill.config import resolve_method, startup_problems
    from distill.teacher.scoring import first_token_ties, value_scores

    # Why: both values begin with the one token the teacher answers, so they score alike whatever the input.
    top = [("check", -0.1), ("get", -2.0)]
    assert value_scores(top, ["check_invoice", "check_refund_policy", "get_invoice"]) == [-0.1, -0.1, -2.0]
    assert first_token_ties(["check_invoice", "check_refund_policy", "get_invoice"]) == [
        ("check_invoice", "check_refund_policy")]
    assert first_token_ties(["high", "highest", "low"]) == [("high", "highest")]
    assert first_token_ties([1, 10, 2]) == [("1", "10")]
    assert first_token_ties(["cardArrival", "cardLinking", "cash"]) == [("cardArrival", "cardLinking")]
    assert first_token_ties(["billing", "refund_return", "shipping_delivery", "low", "medium"]) == []

    alike = ["recipe.output_schema.properties.category.enum=[check_invoice,check_refund_policy,get_invoice]"]
    auto = load_config([*alike, f"run_dir={tmp_path / 'a'}"])  # the local teacher: teacher.method=auto
    assert resolve_method(auto) == "generate"
    assert resolve_method(load_config([f"run_dir={tmp_path / 'b'}"])) == "score"  # the shipped values differ
    scored = load_config([*alike, "teacher.method=score", f"run_dir={tmp_path / 'c'}"])  # loads: a run made so serves
    assert any("check_invoice / check_refund_policy" in p for p in startup_problems(scored, ("generate",)))
    assert startup_problems(scored, ("evaluate",)) == []
    assert main(["generate", *alike, "teacher.method=score", f"run_dir={tmp_path / 'd'}"]) == 2
    assert "cannot tell them apart (category: check_invoice / check_refund_policy)" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()  # refused before the teacher started


def test_qlora_is_checked_before_train_starts(tmp_path):
    import torch

    from distill.config import check_startup, startup_problems

    cfg = load_config(["train=qlora", f"run_dir={tmp_path}"])  # smollm2_135m: not a 4-bit base
    assert any("train=qlora needs a 4-bit base" in p for p in startup_problems(cfg, ("train",)))
    assert startup_problems(cfg, ("generate",)) == []  # generate alone never loads the student
    cfg = load_config(["train=qlora", "student=phi3_mini", f"run_dir={tmp_path}"])
    if torch.cuda.is_available():
        assert startup_problems(cfg, ("train",)) == []
    else:
        with pytest.raises(DistillError, match="train=qlora loads the student in 4 bits.*needs a CUDA GPU"):
            check_startup(cfg, ("train", "evaluate"))


def test_speed_only_knobs_are_marked_on_their_fields_and_leave_fingerprints_alone(tmp_path):
    from distill import pipeline
    from distill.config import EndpointConfig, EvalConfig, GenerateConfig, TeacherConfig, TrainConfig, speed_only_fields

    assert {"concurrency", "timeout_s", "rpm"} <= speed_only_fields(TeacherConfig)
    assert speed_only_fields(TrainConfig) == {"threads", "report_to"}
    assert {"dry_run", "budget_usd", "batch"} <= speed_only_fields(GenerateConfig)
    assert {"batch_size", "junit_xml"} <= speed_only_fields(EvalConfig)
    assert speed_only_fields(EndpointConfig) == {"concurrency", "timeout_s", "max_retries"}
    base = pipeline.fingerprint(load_config([f"run_dir={tmp_path}"]), "generate")
    fast = load_config([f"run_dir={tmp_path}", "teacher.concurrency=16", "generate.budget_usd=3"])
    assert pipeline.fingerprint(fast, "generate") == base
    other = load_config([f"run_dir={tmp_path}", "teacher.temperature=0.7"])
    assert pipeline.fingerprint(other, "generate") != base


def test_generate_has_its_own_group_with_the_same_defaults(tmp_path):
    assert "generate" in group_options() and group_options()["generate"] == ["default"]
    cfg = load_config(["profile=smoke", f"run_dir={tmp_path}"])
    assert cfg.generate.split.model_dump() == {"train": 0.7, "val": 0.1, "test": 0.2}
    assert (cfg.generate.max_attempts, cfg.generate.mode, cfg.generate.batch.timeout_h) == (3, "online", 26.0)
    assert cfg.generate.limit == 40  # the profile still resizes it
    assert "generate" not in load_yaml(CONF_DIR / "config.yaml")
