"""The chat-template contract: one function renders an example exactly as it is trained, evaluated and served.

The prompt is the student's own chat template with the generation prompt; the answer is the canonical JSON
followed by the template's end-of-turn token, which is trained so the student learns to stop. Evaluation renders
the same prompt, and publish copies the same template and stop token into every artifact.
"""

from __future__ import annotations

_MARK = "\u2063DISTILL_END_MARK\u2063"


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The prompt text exactly as the student sees it, up to and including the assistant header."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def end_of_turn(tokenizer) -> str:
    """The token the chat template puts after an assistant message (``<|im_end|>``, ``<|eot_id|>``, ``<|end|>``).

    Found by rendering a conversation, not by a per-family table, so any template works; falls back to EOS.
    """
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _MARK}], tokenize=False)
    after = rendered.split(_MARK, 1)[1].lstrip(" ")
    for token in sorted(tokenizer.all_special_tokens, key=len, reverse=True):
        if token and after.startswith(token):
            return token
    if tokenizer.eos_token:
        return tokenizer.eos_token
    raise ValueError("the chat template puts no special token after an assistant turn and there is no EOS token")


def encode_example(tokenizer, messages: list[dict], answer: str, max_len: int, eot: str | None = None) -> dict[str, list[int]]:
    """Token ids and labels of one training example: loss on the answer and its end-of-turn token only.

    A prompt too long for ``max_len`` is cut from the left of the prompt, so the answer is always kept whole.
    """
    eot = eot or end_of_turn(tokenizer)
    prompt_ids = tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer + eot, add_special_tokens=False)["input_ids"]
    room = max_len - len(answer_ids)
    if room < 8:
        raise ValueError(f"an answer of {len(answer_ids)} tokens does not fit student.max_seq_len={max_len}")
    prompt_ids = prompt_ids[-room:]
    return {"input_ids": prompt_ids + answer_ids, "labels": [-100] * len(prompt_ids) + answer_ids}
