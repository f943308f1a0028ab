"""The chat-template contract, checked token by token for the SmolLM2 (ChatML), Phi-3 and Llama-3 templates.

The templates are the families' own Jinja strings, attached offline to SmolLM2's byte-level BPE tokenizer (the
tiny_random student's) with each family's special tokens added, so no model hub is needed.
"""

from __future__ import annotations

import json

import pytest

from distill.config import load_config
from distill.student.models import cached_gguf_tokenizer
from distill.student.template import encode_example, end_of_turn, end_of_turn_id, render_example, render_prompt

SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\\n' + message['content'] + "
    "'<|end|>\\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}")
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")

FAMILIES = {
    # family: (template, special tokens to add, bos, eos, expected end-of-turn, expected assistant header)
    "smollm2": (SMOLLM2, [], "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|im_start|>assistant\n"),
    "phi3": (PHI3, ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], None, "<|endoftext|>", "<|end|>",
             "<|assistant|>\n"),
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>", "<|start_header_id|>assistant<|end_header_id|>\n\n"),
}
MESSAGES = [{"role": "system", "content": "Classify the support ticket. Answer with JSON."},
            {"role": "user", "content": "My parcel never arrived and nobody answers the phone!"}]
ANSWER = json.dumps({"category": "shipping", "priority": "high"})


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    cfg = load_config(["student=tiny_random", f"run_dir={tmp_path_factory.mktemp('run')}"])
    return cached_gguf_tokenizer(cfg.student, cfg.cache_dir)


def family_tokenizer(tokenizer_dir, family: str):
    from transformers import AutoTokenizer

    template, special, bos, eos, _, _ = FAMILIES[family]
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if special:
        tok.add_special_tokens({"additional_special_tokens": special})
    tok.chat_template = template
    tok.bos_token, tok.eos_token = bos, eos
    return tok


@pytest.mark.parametrize("family", list(FAMILIES))
def test_trained_sequence_is_prompt_then_answer_then_end_of_turn(tokenizer_dir, family):
    tok = family_tokenizer(tokenizer_dir, family)
    _, _, _, _, eot, header = FAMILIES[family]
    eot_id = tok.convert_tokens_to_ids(eot)
    assert end_of_turn(tok) == eot and end_of_turn_id(tok) == eot_id

    ex = encode_example(tok, MESSAGES, ANSWER, max_len=512)
    ids, labels = ex["input_ids"], ex["labels"]
    prompt = render_prompt(tok, MESSAGES)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    n = len(prompt_ids)

    # Evaluation renders and tokenizes the identical prompt: it is the exact prefix of the trained sequence.
    assert prompt.endswith(header)
    assert ids[:n] == prompt_ids
    # No loss on the prompt; every answer token and the end-of-turn token are trained, and nothing after it.
    assert labels[:n] == [-100] * n
    assert labels[n:] == ids[n:] and len(ids) > n + 1
    assert ids[-1] == eot_id and labels[-1] == eot_id
    assert ids.count(eot_id) == prompt_ids.count(eot_id) + 1
    assert tok.decode(ids[n:-1]) == ANSWER
    # The trained text is what the template itself renders for the finished conversation, up to its end-of-turn.
    full = tok.apply_chat_template(MESSAGES + [{"role": "assistant", "content": ANSWER}], tokenize=False)
    trained_text = render_example(tok, MESSAGES, ANSWER)
    assert full.startswith(trained_text) and trained_text.endswith(ANSWER + eot)
    assert tok.decode(ids) == trained_text


def test_phi3_trains_end_of_turn_not_eos(tokenizer_dir):
    tok = family_tokenizer(tokenizer_dir, "phi3")
    ex = encode_example(tok, MESSAGES, ANSWER, max_len=512)
    assert ex["input_ids"][-1] == tok.convert_tokens_to_ids("<|end|>") != tok.eos_token_id


def test_long_prompt_is_cut_from_the_left_and_the_answer_kept_whole(tokenizer_dir):
    tok = family_tokenizer(tokenizer_dir, "llama3")
    long_messages = [MESSAGES[0], {"role": "user", "content": "late parcel " * 200}]
    ex = encode_example(tok, long_messages, ANSWER, max_len=64)
    answer_ids = tok(ANSWER + "<|eot_id|>", add_special_tokens=False)["input_ids"]
    assert len(ex["input_ids"]) == 64
    assert ex["input_ids"][-len(answer_ids):] == answer_ids
    assert ex["labels"][-len(answer_ids):] == answer_ids
    assert ex["labels"][:-len(answer_ids)] == [-100] * (64 - len(answer_ids))
    # The kept prompt tail still ends with the assistant header, so the answer starts where generation starts.
    header = tok("<|start_header_id|>assistant<|end_header_id|>\n\n", add_special_tokens=False)["input_ids"]
    assert ex["input_ids"][-len(answer_ids) - len(header):-len(answer_ids)] == header


def test_answer_longer_than_max_len_is_a_clear_error(tokenizer_dir):
    tok = family_tokenizer(tokenizer_dir, "smollm2")
    with pytest.raises(ValueError, match="does not fit student.max_seq_len=32"):
        encode_example(tok, MESSAGES, json.dumps({"category": "x " * 40}), max_len=32)


def test_template_without_a_special_end_of_turn_falls_back_to_eos(tokenizer_dir):
    tok = family_tokenizer(tokenizer_dir, "smollm2")
    tok.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    assert end_of_turn(tok) == tok.eos_token
    ex = encode_example(tok, MESSAGES, ANSWER, max_len=512)
    assert ex["input_ids"][-1] == tok.eos_token_id
