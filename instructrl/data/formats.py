"""Formats: (prompt, response) -> token ids and a loss mask.

Two kinds of prompt rendering:
  * ``PlainFormat``: InstructGPT-style, the prompt text in a template (``"{prompt}\\n\\n"``);
  * ``ChatFormat``: role turns (``messages`` [{role, content}], or the prompt as one user turn)
    rendered by per-role templates, then the assistant's generation prefix; the response is
    followed by the format's end-of-turn text. Presets: ``chatml``, ``hh`` (Anthropic's
    "\\n\\nHuman:" / "\\n\\nAssistant:"), ``user_assistant``.

Truncation policy: the prompt is truncated from the left (the instruction's end and the open
assistant turn are what the response depends on); a response (with its EOS) that does not fit
beside at least one prompt token is flagged (``None``), never silently cut. EOS and padding ids
come from the tokenizer (``tokenizer.eos_id`` / ``pad_id``, read from its configuration).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from instructrl.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class PlainFormat:
    """The prompt in ``template`` (with a ``{prompt}`` field); the response follows as is."""

    template: str = "{prompt}\n\n"
    response_suffix: str = ""

    def prompt_text(self, example: Mapping) -> str:
        return self.template.format(prompt=example["prompt"])


@dataclasses.dataclass(frozen=True)
class ChatFormat:
    """Role turns. ``turns`` maps a role (system, user, assistant) to a template with a
    ``{content}`` field; ``generation_prefix`` opens the assistant turn the response fills and
    ``response_suffix`` closes it (before EOS); ``system`` is an optional first system turn."""

    turns: tuple[tuple[str, str], ...]
    generation_prefix: str
    response_suffix: str = ""
    system: str = ""

    def prompt_text(self, example: Mapping) -> str:
        messages = example.get("messages") or [{"role": "user", "content": example["prompt"]}]
        templates = dict(self.turns)
        parts = []
        if self.system and messages[0]["role"] != "system":
            parts.append(templates["system"].format(content=self.system))
        for m in messages:
            if m["role"] not in templates:
                raise ValueError(f"chat format has no template for role {m['role']!r}")
            parts.append(templates[m["role"]].format(content=m["content"]))
        return "".join(parts) + self.generation_prefix


def _chatml(system: str = "") -> ChatFormat:
    turn = "<|im_start|>{role}\n{{content}}<|im_end|>\n"
    return ChatFormat(
        turns=tuple((r, turn.format(role=r)) for r in ("system", "user", "assistant")),
        generation_prefix="<|im_start|>assistant\n",
        response_suffix="<|im_end|>",
        system=system,
    )


def _roles(system: str, user: str, assistant: str, prefix: str):
    """A preset of plain role templates (no end-of-turn text)."""
    turns = (("system", system), ("user", user), ("assistant", assistant))
    return lambda system="": ChatFormat(turns=turns, generation_prefix=prefix, system=system)


CHAT_PRESETS = {
    # ChatML (SmolLM2, Qwen): the end-of-turn token closes every turn, the response included.
    "chatml": _chatml,
    # Anthropic HH-RLHF transcripts (Bai et al. 2022); replies start after "Assistant:".
    "hh": _roles(
        "{content}", "\n\nHuman: {content}", "\n\nAssistant: {content}", "\n\nAssistant:"
    ),  # fmt: skip
    "user_assistant": _roles(
        "{content}\n\n", "User: {content}\n\n", "Assistant: {content}\n\n", "Assistant: "
    ),  # fmt: skip
}


def make_format(data_cfg) -> PlainFormat | ChatFormat:
    """``data.chat_format`` names a chat preset ("" or absent: plain ``data.template``)."""
    chat = data_cfg.get("chat_format", "") or ""
    if chat:
        if chat not in CHAT_PRESETS:
            raise ValueError(f"data.chat_format={chat!r}; known: {sorted(CHAT_PRESETS)}")
        return CHAT_PRESETS[chat](data_cfg.get("system_prompt", "") or "")
    return PlainFormat(data_cfg.get("template", "{prompt}\n\n"))


def encode(
    tokenizer: Tokenizer, fmt, example: Mapping, max_tokens: int
) -> tuple[list[int], list[int]] | None:
    """(ids, mask) of prompt + response + EOS, len(ids) <= max_tokens; mask is 1 on the
    response tokens (suffix and EOS included). None if the response does not fit beside one
    prompt token (the caller raises or counts it)."""
    prompt_ids = tokenizer.encode(fmt.prompt_text(example))
    response_ids = tokenizer.encode(example["response"] + fmt.response_suffix)
    response_ids.append(tokenizer.eos_id)
    room = max_tokens - len(response_ids)
    if room < 1:
        return None
    prompt_ids = prompt_ids[-room:]
    return prompt_ids + response_ids, [0] * len(prompt_ids) + [1] * len(response_ids)


def prompt_ids(tokenizer: Tokenizer, fmt, example: Mapping, max_tokens: int) -> list[int]:
    """Token ids of a prompt alone (for sampling), truncated from the left to max_tokens."""
    return tokenizer.encode(fmt.prompt_text(example))[-max_tokens:]


def shifted(ids: list[int], mask: list[int]) -> dict[str, np.ndarray]:
    """One example as aligned next-token arrays: inputs ids[:-1], targets ids[1:], and the
    loss mask of the targets; each of length len(ids) - 1."""
    ids_arr = np.asarray(ids, np.int32)
    return {
        "inputs": ids_arr[:-1],
        "targets": ids_arr[1:],
        "loss_mask": np.asarray(mask[1:], np.int32),
    }
