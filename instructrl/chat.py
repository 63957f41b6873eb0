"""Talk to a policy: answers to prompts (``instructrl sample``) and a terminal chat (``chat``).

A policy is any workdir that holds language-model params: a pipeline stage (SFT; PPO and
PPO-ptx export their EMA weights) or a model imported with ``python -m instructrl.convert``.
Everything needed to talk to it travels with the workdir: the model and tokenizer (the
stage's run_info.json, or an import's model.json and tokenizer/) and the prompt format:

  a stage         its data section's format (the world's "{prompt}\\n\\n", a recipe's ChatML)
  an import       ChatML when its tokenizer's chat template is ChatML (SmolLM2, Qwen), else
                  the prompt as it is

A conversation is a list of {role, content} messages; it is rendered in the format, the
oldest turns dropped until it fits the context with room for the answer.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable

from instructrl.config_lib import ConfigError
from instructrl.data import files
from instructrl.data.errors import DataError
from instructrl.data.formats import CHAT_PRESETS, ChatFormat, PlainFormat, make_format
from instructrl.policy_io import Batch, Toolkit, stage_config

CHATML_MARK = "<|im_start|>"


def prompt_format(workdir: str, config) -> PlainFormat | ChatFormat:
    """The format ``workdir``'s model was trained (or, for an import, published) with."""
    if not os.path.isfile(os.path.join(workdir, "run_info.json")):
        path = os.path.join(workdir, "tokenizer", "tokenizer_config.json")
        template = ""
        if os.path.isfile(path):
            with open(path) as f:
                template = json.load(f).get("chat_template") or ""
        return CHAT_PRESETS["chatml"]() if CHATML_MARK in template else PlainFormat("{prompt}")
    fmt = make_format(config.get("data") or {})
    if isinstance(fmt, PlainFormat) and CHATML_MARK in fmt.template:
        return CHAT_PRESETS["chatml"]()  # a recipe's ChatML user turn: render turns as ChatML
    return fmt


def render(fmt: PlainFormat | ChatFormat, messages: list[dict]) -> str:
    """The prompt text of a conversation that ends with a user turn. A plain format has no
    roles: each earlier exchange is its prompt in the template followed by its answer."""
    if isinstance(fmt, ChatFormat):
        return fmt.prompt_text({"messages": messages})
    parts = []
    for m in messages:
        if m["role"] == "user":
            parts.append(fmt.template.format(prompt=m["content"]))
        else:  # an answer, or a system message: plain text before the next turn
            parts.append(m["content"] + "\n\n")
    return "".join(parts)


class Policy:
    """A policy workdir, ready to answer conversations.

    batch_size: rows per sampler call (rounded up to a multiple of the device count).
    """

    def __init__(self, workdir: str, batch_size: int = 8, system: str = "", cache=None):
        config = stage_config(workdir)
        if config.get("stage") == "rm":
            raise ConfigError(f"{workdir} is a reward model (a scalar head): it cannot answer")
        self.workdir = workdir
        # ``cache``: a dict shared by policies of one model shape (one compile for them all).
        self.toolkit = Toolkit.from_workdir(workdir, batch_size=batch_size, cache=cache)
        self.tokenizer = self.toolkit.tokenizer
        self.params = self.toolkit.params(workdir)
        self.format = prompt_format(workdir, config)
        self.system = system
        self.max_len = self.toolkit.cfg.max_len

    def fit(self, messages: list[dict], max_new_tokens: int) -> tuple[list[dict], int]:
        """(messages without the oldest exchanges that do not fit beside ``max_new_tokens``,
        how many messages were dropped). The last user turn always stays (if it alone is too
        long, the sampler keeps its end)."""
        if max_new_tokens >= self.max_len:
            raise ConfigError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt "
                              f"in the model's context of {self.max_len}")  # fmt: skip
        head = [m for m in messages[:1] if m["role"] == "system"]
        turns = messages[len(head) :]
        dropped = 0
        while len(turns) > 1:
            text = render(self.format, self._with_system(head + turns))
            if len(self.tokenizer.encode(text)) + max_new_tokens <= self.max_len:
                break
            cut = next((i for i in range(1, len(turns)) if turns[i]["role"] == "user"), 1)
            turns, dropped = turns[cut:], dropped + cut
        return head + turns, dropped

    def _with_system(self, messages: list[dict]) -> list[dict]:
        if self.system and not (messages and messages[0]["role"] == "system"):
            return [{"role": "system", "content": self.system}, *messages]
        return messages

    def prompt_text(self, messages: list[dict]) -> str:
        return render(self.format, self._with_system(messages))

    def answer(self, conversations: list[list[dict]], *, max_new_tokens: int = 64,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               seed: int = 0) -> list[str]:  # fmt: skip
        """One answer per conversation (each ending with a user turn); temperature 0 is
        greedy."""
        sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        batch = self.sample(conversations, max_new_tokens=max_new_tokens, **sampling)
        return [t.strip() for t in batch.texts]

    def sample(self, conversations: list[list[dict]], **sampling) -> Batch:
        """The sampled batch (tokens, masks, texts) of ``answer``; ``sampling`` as there."""
        n = sampling["max_new_tokens"]
        texts = [self.prompt_text(self.fit(c, n)[0]) for c in conversations]
        return self.toolkit.sample(self.params, texts, template="{prompt}", **sampling)


def read_prompts(path: str) -> list[dict]:
    """Records of a prompts file (JSONL, JSON, ...: ``data.files``), each with a ``prompt``
    string or ``messages`` [{role, content}] ending with a user turn."""
    records = []
    for where, r in files.read_records(path):
        if isinstance(r, DataError):  # a malformed line, with its location
            raise r
        if not isinstance(r, dict):
            raise DataError(f"{where}: a prompt record must be an object")
        if not isinstance(r.get("prompt"), str) and not isinstance(r.get("messages"), list):
            raise DataError(f"{where}: field 'prompt' (text) or 'messages' (a list) is missing")
        if "messages" in r and (not r["messages"] or r["messages"][-1].get("role") != "user"):
            raise DataError(f"{where}: field 'messages' must end with a user turn")
        records.append(r)
    if not records:
        raise DataError(f"{path}: no prompts")
    return records


def conversation(record: dict) -> list[dict]:
    return record.get("messages") or [{"role": "user", "content": record["prompt"]}]


def sample(policy: Policy, records: list[dict], output: str | None = None, out=None,
           **sampling) -> list[str]:  # fmt: skip
    """Answers to every record; written as JSONL ({id?, prompt | messages, response}) to
    ``output`` when given, else printed (one prompt: the answer alone)."""
    out = out or sys.stdout  # at call time: a caller may have redirected it
    answers = policy.answer([conversation(r) for r in records], **sampling)
    if output:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        with open(output, "w", encoding="utf-8") as f:
            for r, a in zip(records, answers, strict=True):
                row = {k: r[k] for k in ("id", "prompt", "messages") if k in r}
                f.write(json.dumps({**row, "response": a}, ensure_ascii=False) + "\n")
        print(f"{len(answers)} answers written to {output}", file=out)
    elif len(answers) == 1:
        print(answers[0], file=out)
    else:
        for i, (r, a) in enumerate(zip(records, answers, strict=True)):
            print(f"[{i}] {conversation(r)[-1]['content']}\n{a}\n", file=out)
    return answers


HELP = """commands: /reset (forget the conversation), /temperature T, /top_k K, /top_p P,
/max_new_tokens N, /system TEXT (set the system prompt, /system alone clears it), /help;
Ctrl-D leaves"""

SETTINGS = {"temperature": float, "top_k": int, "top_p": float, "max_new_tokens": int}


def chat(policy: Policy, lines: Iterable[str] | None = None, out=None, **sampling) -> list:
    """The interactive loop: each input line is a user turn, answered with the conversation
    so far. ``lines``: None reads the terminal (``input``), else an iterable of lines.
    Returns the conversation at exit."""
    out = out or sys.stdout
    settings = {"max_new_tokens": 64, "temperature": 0.7, "top_k": 0, "top_p": 1.0, "seed": 0}
    settings.update(sampling)
    interactive = lines is None
    if interactive and os.environ.get("TERM") != "dumb":
        try:
            import readline  # noqa: F401  (line editing and history for input(), where present)
        except ImportError:
            pass
    source = iter(lines) if lines is not None else None
    history: list[dict] = []
    print(f"chat with {policy.workdir} ({type(policy.format).__name__}, context "
          f"{policy.max_len} tokens); /help for commands, Ctrl-D to leave", file=out)  # fmt: skip
    turn = 0
    while True:
        try:
            line = input("> ") if interactive else next(source)
        except (EOFError, StopIteration):
            print(file=out)
            return history
        line = line.rstrip("\n").strip()
        if not line:
            continue
        if line.startswith("/"):
            name, _, value = line[1:].partition(" ")
            if name == "reset":  # a fresh conversation: its draws are a new session's
                history, turn = [], 0
                print("(conversation cleared)", file=out)
            elif name == "help":
                print(HELP, file=out)
            elif name == "system":
                policy.system = value.strip()
                print(f"(system prompt: {policy.system!r})", file=out)
            elif name in SETTINGS:
                try:
                    settings[name] = SETTINGS[name](value)
                except ValueError:
                    print(f"(/{name} needs a number, got {value!r})", file=out)
                    continue
                print(f"({name} = {settings[name]})", file=out)
            else:
                print(f"(unknown command /{name}; /help lists them)", file=out)
            continue
        history.append({"role": "user", "content": line})
        history, dropped = policy.fit(history, settings["max_new_tokens"])
        if dropped:
            print(f"(the {dropped} oldest messages no longer fit the context: dropped)", file=out)
        answer = policy.answer([history], **{**settings, "seed": settings["seed"] + turn})[0]
        turn += 1
        history.append({"role": "assistant", "content": answer})
        print(answer, file=out, flush=True)
