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


def end_of_turn_id(tokenizer, eot: str | None = None) -> int:
    """The single token id of the end-of-turn token; a ValueError if the tokenizer does not know it as one token."""
    eot = eot or end_of_turn(tokenizer)
    ids = tokenizer(eot, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"the end-of-turn token {eot!r} is not a single token of this tokenizer ({ids}); add it "
                         f"as a special token")
    return ids[0]


def render_example(tokenizer, messages: list[dict], answer: str, eot: str | None = None) -> str:
    """The text of one training example exactly as it is trained: the prompt, the answer, the end-of-turn token."""
    return render_prompt(tokenizer, messages) + answer + (eot or end_of_turn(tokenizer))


def encode_example(tokenizer, messages: list[dict], answer: str, max_len: int,
                   eot: str | None = None) -> dict[str, list[int]]:
    """Token ids and labels of one training example: loss on the answer and its end-of-turn token only.

    The prompt is tokenized on its own, exactly as evaluation and serving tokenize it, so the trained answer starts
    where generation starts. A prompt too long for ``max_len`` is cut from the left, so the answer is kept whole.
    Raises ValueError when the answer does not fit or the sequence would not end with the end-of-turn token.
    """
    eot = eot or end_of_turn(tokenizer)
    prompt_ids = tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer + eot, add_special_tokens=False)["input_ids"]
    if answer_ids[-1] != end_of_turn_id(tokenizer, eot):
        raise ValueError(f"the answer does not tokenize to end with the end-of-turn token {eot!r}")
    room = max_len - len(answer_ids)
    if room < 8:
        raise ValueError(f"an answer of {len(answer_ids)} tokens does not fit student.max_seq_len={max_len}")
    prompt_ids = prompt_ids[-room:]
    return {"input_ids": prompt_ids + answer_ids, "labels": [-100] * len(prompt_ids) + answer_ids}
