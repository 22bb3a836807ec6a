"""Chat deltas: prompt + model tokens + deltas == the whole conversation tokenised at once."""

import pytest

from agentgym_jax.engine.chat import ChatDeltas
from tests.helpers.chat import make_tokenizer

ANSWERS = [
    "Thought: I should look around first.\nAction: turn left",
    "Thought: the ball is near.\nAction: go to red ball 1",
    "OK. I'll follow your instructions.",
]
OBS = [
    'Your goal: go to the red ball.\nAvailable actions: ["turn left", "move forward"]',
    "You see a red ball 1.",
    "Goal: craft wooden pickaxe.",
]


def full_ids(tok, messages):
    out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    if hasattr(out, "keys"):  # transformers may return a BatchEncoding
        out = out["input_ids"]
    return list(out)


def conversation(family, tool_turns=False):
    first = (
        [] if family == "gemma" else [{"role": "system", "content": "You are a helpful assistant."}]
    )
    first.append({"role": "user", "content": OBS[0]})
    news = []
    for k in range(1, len(OBS)):
        if tool_turns:
            news.append([{"role": "tool", "content": OBS[k]}, {"role": "tool", "content": "ok"}])
        else:
            news.append([{"role": "user", "content": OBS[k]}])
    return first, news


@pytest.mark.parametrize(
    "family,tool_turns", [("qwen", False), ("qwen", True), ("llama3", False), ("gemma", False)]
)
def test_deltas_concatenate_to_full_conversation(family, tool_turns):
    tok = make_tokenizer(family)
    chat = ChatDeltas(tok)
    assert (
        tok.convert_ids_to_tokens(chat.end_of_turn_id)
        == {"qwen": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>"}[family]
    )
    msgs, news = conversation(family, tool_turns)
    seq = chat.prompt_ids(msgs)
    assert seq == full_ids(tok, msgs)
    for k, new in enumerate(news):
        answer = ANSWERS[k]
        seq += chat.encode(answer) + [chat.end_of_turn_id]  # what the model emits
        msgs.append({"role": "assistant", "content": "ignored: the delta uses a sentinel"})
        seq += chat.delta_ids(msgs, new)
        msgs[-1] = {"role": "assistant", "content": answer}
        msgs += new
        assert seq == full_ids(tok, msgs), f"turn {k}"


@pytest.mark.parametrize("family", ["qwen", "llama3"])
def test_delta_after_length_cut_closes_the_turn(family):
    tok = make_tokenizer(family)
    chat = ChatDeltas(tok)
    msgs, news = conversation(family)
    seq = chat.prompt_ids(msgs) + chat.encode("Thought: I should")  # cut before end-of-turn
    msgs.append({"role": "assistant", "content": "Thought: I should"})
    delta = chat.delta_ids(msgs, news[0], model_ended_turn=False)
    assert delta[0] == chat.end_of_turn_id
    assert seq + delta == full_ids(tok, msgs + news[0])


def test_history_rewriting_template_is_rejected():
    tok = make_tokenizer("qwen")
    # A template that shows only the last assistant message: not prefix-stable.
    tok.chat_template = (
        "{% for m in messages %}{% if m.role != 'assistant' or loop.last %}"
        "{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    chat = ChatDeltas(tok)
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(ValueError, match="renders earlier turns differently"):
        chat.delta_ids(msgs, [{"role": "user", "content": "c"}])
    with pytest.raises(ValueError, match="must end with the assistant"):
        chat.delta_ids(msgs[:1], [{"role": "user", "content": "c"}])
