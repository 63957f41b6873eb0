"""Conversations as prompt text: the formats' turns, and the oldest turns dropped to fit."""

import pytest

from instructrl import chat
from instructrl.config_lib import ConfigError
from instructrl.data.errors import DataError
from instructrl.data.formats import CHAT_PRESETS, PlainFormat
from instructrl.tokenizer import ByteTokenizer

TURNS = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
]


def test_render_chatml_and_plain_turns():
    assert chat.render(CHAT_PRESETS["chatml"](), TURNS) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    # The world's single-turn template: each exchange is a prompt in it and its answer.
    assert chat.render(PlainFormat("{prompt}\n\n"), TURNS) == "Hi\n\nHello!\n\n2+2?\n\n"


def _policy(max_len: int, fmt=PlainFormat("{prompt}\n\n"), system=""):
    policy = chat.Policy.__new__(chat.Policy)  # the prompt side only: no model
    policy.tokenizer, policy.format, policy.system, policy.max_len = (
        ByteTokenizer(), fmt, system, max_len)  # fmt: skip
    return policy


def test_fit_drops_whole_exchanges_oldest_first():
    history = [{"role": "system", "content": "Be brief."}]
    for i in range(6):
        history += [{"role": "user", "content": f"question {i} " * 4},
                    {"role": "assistant", "content": f"answer {i} " * 4}]  # fmt: skip
    history.append({"role": "user", "content": "last question"})
    policy = _policy(max_len=200, fmt=CHAT_PRESETS["chatml"]())
    kept, dropped = policy.fit(history, max_new_tokens=32)
    assert dropped > 0 and dropped % 2 == 0  # whole (question, answer) exchanges
    assert kept[0] == history[0] and kept[1:] == history[1 + dropped :]
    assert len(ByteTokenizer().encode(policy.prompt_text(kept))) + 32 <= 200
    # One more exchange would not have fit.
    longer = [history[0], *history[1 + dropped - 2 :]]
    assert len(ByteTokenizer().encode(policy.prompt_text(longer))) + 32 > 200
    # A lone turn always stays; too long a budget is an error naming the field.
    assert policy.fit(history[-1:], 32) == (history[-1:], 0)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        policy.fit(history, 200)


def test_system_prompt_comes_first_once():
    policy = _policy(1000, CHAT_PRESETS["chatml"](), system="You are terse.")
    text = policy.prompt_text(TURNS[:1])
    assert text.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n")
    own = [{"role": "system", "content": "Mine."}, *TURNS[:1]]
    assert policy.prompt_text(own).count("system") == 1


def test_read_prompts_names_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n{"messages": [{"role": "assistant", "content": "x"}]}\n')
    with pytest.raises(DataError, match=r"p.jsonl:2: field 'messages' must end with a user turn"):
        chat.read_prompts(str(path))
    path.write_text(
        '{"prompt": "a", "id": 7}\n\n{"messages": [{"role": "user", "content": "b"}]}\n'
    )
    records = chat.read_prompts(str(path))
    assert [chat.conversation(r)[-1]["content"] for r in records] == ["a", "b"]
