"""Chat-template deltas: the exact token ids to append for new messages in a multi-turn episode.

The rollout never re-tokenises history. It keeps one token sequence per episode:

    prompt_ids(messages)                      (system/user... + generation prompt)
    + the model's own tokens                  (content, ending with its end-of-turn token)
    + delta_ids(messages_so_far, new_msgs)    (e.g. "\\n<|im_start|>user\\n...<|im_end|>\\n
                                               <|im_start|>assistant\\n")
    + the model's own tokens + ...

How a delta is found: the conversation so far is rendered with the template, with the last
assistant message's content replaced by a sentinel, once without and once with the new messages
(and the generation prompt). The second rendering must extend the first up to the sentinel (the
template must not re-render history; otherwise a clear error). The delta text is what follows the
sentinel, minus the end-of-turn token's text when the model already emitted that token. Since
the delta starts right after a special token, tokenising it alone gives the same ids as
tokenising the whole conversation (tests check this for ChatML, Llama 3 and Gemma templates).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

_SENTINEL = "\u2063AGJ_ASSISTANT_CONTENT\u2063"

Message = Mapping[str, Any]


class ChatDeltas:
    """Prompt and per-turn delta token ids for a HF tokenizer with a ``chat_template``.

    ``end_of_turn_id`` is the token the template puts after assistant content (``<|im_end|>``,
    ``<|eot_id|>``, ``<end_of_turn>``); inferred from the template when not given. Use it as the
    engine's stop token.
    """

    def __init__(self, tokenizer, end_of_turn_id: int | None = None, **template_kwargs):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("ChatDeltas: the tokenizer has no chat_template")
        self.tokenizer = tokenizer
        self.template_kwargs = template_kwargs
        self.end_of_turn_id = (
            self._infer_end_of_turn() if end_of_turn_id is None else int(end_of_turn_id)
        )
        self.end_of_turn_text = tokenizer.decode([self.end_of_turn_id])

    def render(self, messages: Sequence[Message], add_generation_prompt: bool) -> str:
        text = self.tokenizer.apply_chat_template(
            list(messages),
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **self.template_kwargs,
        )
        if not isinstance(text, str):
            raise TypeError(
                f"apply_chat_template(tokenize=False) returned {type(text).__name__}, not str"
            )
        return text

    def encode(self, text: str) -> list[int]:
        # The template text already holds bos and role tokens; adding specials again would double them.
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        """Token ids of the opening messages followed by the assistant generation prompt."""
        return self.encode(self.render(messages, add_generation_prompt=True))

    def delta_ids(
        self,
        messages: Sequence[Message],
        new_messages: Sequence[Message],
        *,
        model_ended_turn: bool = True,
    ) -> list[int]:
        """Ids to append after the model's last turn for ``new_messages`` + the generation prompt.

        ``messages`` is the conversation so far ending with the model's (assistant) message; its
        text is not used. ``model_ended_turn``: the model's tokens end with ``end_of_turn_id``
        (False when the turn was cut by a length limit: the delta then closes the turn itself).
        """
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError("delta_ids: `messages` must end with the assistant's message")
        if not new_messages:
            raise ValueError("delta_ids: no new messages")
        hist = [dict(m) for m in messages[:-1]] + [dict(messages[-1], content=_SENTINEL)]
        before = self.render(hist, add_generation_prompt=False)
        after = self.render(hist + [dict(m) for m in new_messages], add_generation_prompt=True)
        cut = before.rfind(_SENTINEL)
        if cut < 0:
            raise ValueError(
                "delta_ids: the template dropped the assistant content; cannot align turns"
            )
        cut += len(_SENTINEL)
        if after[:cut] != before[:cut]:
            raise ValueError(
                "delta_ids: the chat template renders earlier turns differently once new messages "
                "are added, so no token-exact delta exists; use a prefix-stable template"
            )
        delta = after[cut:]
        if model_ended_turn:
            if not delta.startswith(self.end_of_turn_text):
                raise ValueError(
                    f"delta_ids: the template does not close the assistant turn with "
                    f"{self.end_of_turn_text!r} (end_of_turn_id={self.end_of_turn_id}); got {delta[:40]!r}"
                )
            delta = delta[len(self.end_of_turn_text) :]
        return self.encode(delta)

    def _infer_end_of_turn(self) -> int:
        msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}]
        text = self.render(msgs, add_generation_prompt=False)
        tail = text[text.rfind(_SENTINEL) + len(_SENTINEL) :]
        ids = self.encode(tail)
        special = set(getattr(self.tokenizer, "all_special_ids", []))
        special |= set(getattr(self.tokenizer, "added_tokens_decoder", {}).keys())
        if not ids or ids[0] not in special:
            raise ValueError(
                f"ChatDeltas: cannot infer the end-of-turn token from the template (text after the "
                f"assistant content: {tail[:40]!r}); pass end_of_turn_id"
            )
        return ids[0]
