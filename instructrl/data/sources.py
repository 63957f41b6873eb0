"""Sources: local files (or a named hub / TFDS dataset) -> validated records of four kinds.

Kinds, and the formats each reads (``format="auto"`` guesses from the first record's keys):

  demonstrations {prompt, response[, messages]}:
      ``prompt_response`` {prompt, response}; ``alpaca`` {instruction, input, output};
      ``self_instruct`` seed tasks {instruction, instances[{input, output}]}, one per instance;
      ``oasst`` message trees: the best-ranked (rank 0) reply of each ranked sibling group.
  rankings {prompt, responses[K], ranks[K][, labeler_id, messages]}, rank 0 best:
      ``rankings`` as is (K varies per prompt); ``comparisons`` {prompt, chosen, rejected};
      ``hh_rlhf`` {chosen, rejected} transcripts, split into the shared prompt and the two final
      assistant turns; ``tldr`` {info{post, title, subreddit}, summaries[{text}], choice}
      (Stiennon et al. 2020); ``oasst`` sibling replies with their human ranks.
  prompts (str): any of the above's prompts, or ``prompts`` {prompt}.
  text (str): plain text files (pretraining and the PPO-ptx mix).

Backends (``data.files``): JSON lists, JSONL, Parquet, Arrow/Feather and CSV files, gzipped or
not, saved Hugging Face datasets, ``hf:<name>`` and ``tfds:<name>`` (when a user names them).

A bad record (malformed JSON line, missing or mistyped field, empty response) raises a
``DataError`` naming the file, the line (JSONL) or record number, and the field; with
``skip_invalid`` it is skipped and counted instead. Nothing is dropped silently.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from instructrl.data.errors import DataError
from instructrl.data.files import json_records, read_records

HH_HUMAN, HH_ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


# --------------------------------------------------------------------------- fields


def _get(record, name: str, where: str, kind: type | tuple = str, label: str | None = None):
    label = label or name
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object, got {type(record).__name__}")
    if name not in record or record[name] is None:
        raise DataError(f"{where}: missing field {label!r}")
    value = record[name]
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        want = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise DataError(f"{where}: field {label!r} must be {want}, got {type(value).__name__}")
    return value


def _nonempty(record, name: str, where: str, label: str | None = None) -> str:
    value = _get(record, name, where, str, label)
    if not value.strip():
        raise DataError(f"{where}: field {label or name!r} is empty")
    return value


def join_input(instruction: str, extra: str) -> str:
    """Alpaca / Self-Instruct prompt: the instruction, then the input after a blank line."""
    return f"{instruction}\n\n{extra}" if extra.strip() else instruction


# --------------------------------------------------------------------------- formats
# Each parser maps one record to a list of items of one kind (a record can hold several).


def _prompt_response(r, where):
    return [{"prompt": _get(r, "prompt", where), "response": _nonempty(r, "response", where)}]


def _alpaca(r, where):
    instruction = _get(r, "instruction", where)
    extra = r.get("input") if isinstance(r, dict) else None
    if extra is not None and not isinstance(extra, str):
        raise DataError(f"{where}: field 'input' must be str, got {type(extra).__name__}")
    return [
        {"prompt": join_input(instruction, extra or ""), "response": _nonempty(r, "output", where)}
    ]


def _self_instruct(r, where):
    instruction = _get(r, "instruction", where)
    instances = _get(r, "instances", where, list)
    out = []
    for i, inst in enumerate(instances):
        label = f"instances[{i}]"
        extra = _get(inst, "input", where, str, f"{label}.input")
        response = _nonempty(inst, "output", where, f"{label}.output")
        out.append({"prompt": join_input(instruction, extra), "response": response})
    if not out:
        raise DataError(f"{where}: field 'instances' is empty")
    return out


def _comparison(r, where):
    prompt = _get(r, "prompt", where)
    chosen, rejected = _get(r, "chosen", where), _get(r, "rejected", where)
    return [{"prompt": prompt, "responses": [chosen, rejected], "ranks": [0, 1]}]


def split_hh(chosen: str, rejected: str, where: str = "hh-rlhf") -> tuple[str, str, str]:
    """(prompt, chosen reply, rejected reply) of two HH-RLHF transcripts.

    The transcripts share every turn but the last assistant turn. The split is at the last
    ``"\\n\\nAssistant:"`` inside their common prefix (a reply may itself contain such text, so
    the last marker of each transcript is not always the boundary). prompt + reply gives back
    each transcript exactly; the replies keep their leading space. A reply may be empty: in 4
    of the 2,312 harmless-base test pairs the labeler preferred an empty final turn, a real
    preference (rankings allow empty responses; demonstrations do not).
    """
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(HH_ASSISTANT)
    if cut < 0:
        raise DataError(
            f"{where}: field 'chosen' shares no '\\n\\nAssistant:' turn with 'rejected'"
        )
    cut += len(HH_ASSISTANT)
    prompt, a, b = chosen[:cut], chosen[cut:], rejected[cut:]
    if a == b:
        raise DataError(f"{where}: fields 'chosen' and 'rejected' are identical")
    return prompt, a, b


def hh_messages(prompt: str) -> list[dict[str, str]]:
    """The turns of an HH prompt ("\\n\\nHuman: ... \\n\\nAssistant:") as role messages."""
    turns, rest = [], prompt
    while rest:
        role = "user"  # also for text before the first marker
        for marker, marker_role in ((HH_HUMAN, "user"), (HH_ASSISTANT, "assistant")):
            if rest.startswith(marker):
                rest, role = rest[len(marker) :], marker_role
                break
        ends = [i for i in (rest.find(HH_HUMAN), rest.find(HH_ASSISTANT)) if i >= 0]
        end = min(ends) if ends else len(rest)
        turns.append({"role": role, "content": rest[:end].strip()})
        rest = rest[end:]
    if turns and turns[-1]["role"] == "assistant" and not turns[-1]["content"]:
        turns.pop()  # the open assistant turn the reply fills
    return turns


def _hh_rlhf(r, where):
    chosen, rejected = _nonempty(r, "chosen", where), _nonempty(r, "rejected", where)
    prompt, a, b = split_hh(chosen, rejected, where)
    return [
        {"prompt": prompt, "responses": [a, b], "ranks": [0, 1], "messages": hh_messages(prompt)}
    ]


def tldr_prompt(info: dict) -> str:
    """The TL;DR prompt of Stiennon et al. (2020): subreddit, title, post, then "TL;DR:"."""
    return (
        f"SUBREDDIT: r/{info.get('subreddit') or ''}\nTITLE: {info.get('title') or ''}\n"
        f"POST: {info['post']}\nTL;DR:"
    )


def _tldr(r, where):
    info = _get(r, "info", where, dict)
    post = info.get("post") if info.get("post") is not None else info.get("article")
    if not isinstance(post, str):
        raise DataError(f"{where}: field 'info.post' must be str, got {type(post).__name__}")
    summaries = _get(r, "summaries", where, list)
    choice = _get(r, "choice", where, int)
    texts = [_nonempty(s, "text", where, f"summaries[{i}].text") for i, s in enumerate(summaries)]
    if len(texts) != 2 or choice not in (0, 1):
        raise DataError(f"{where}: field 'choice' must index one of 2 summaries, got {choice}")
    prompt = tldr_prompt({**info, "post": post})
    return [{"prompt": prompt, "responses": [texts[choice], texts[1 - choice]], "ranks": [0, 1]}]


def _rankings(r, where):
    prompt = _get(r, "prompt", where)
    responses = _get(r, "responses", where, list)
    ranks = _get(r, "ranks", where, list)
    for i, text in enumerate(responses):
        if not isinstance(text, str):
            raise DataError(
                f"{where}: field 'responses[{i}]' must be str, got {type(text).__name__}"
            )
    for i, rank in enumerate(ranks):
        if not isinstance(rank, int) or isinstance(rank, bool):
            raise DataError(f"{where}: field 'ranks[{i}]' must be int, got {type(rank).__name__}")
    if len(responses) != len(ranks) or len(responses) < 2:
        raise DataError(
            f"{where}: field 'ranks' needs one rank per response and K >= 2 "
            f"(got {len(responses)} responses, {len(ranks)} ranks)"
        )
    out = {"prompt": prompt, "responses": list(responses), "ranks": list(ranks)}
    labeler = r.get("labeler_id", r.get("labeler"))
    if labeler is not None:
        out["labeler_id"] = str(labeler)
    return [out]


def _oasst_groups(r, where) -> list[tuple[list[dict], list[dict]]]:
    """(thread messages up to the parent, ranked assistant replies) of every ranked group.

    Ranked replies are those with a ``rank`` that are not deleted; K = their number.
    """
    root = _get(r, "prompt", where, dict)
    groups = []
    stack = [(root, "prompt", [])]
    while stack:
        message, label, thread = stack.pop()
        text = _get(message, "text", where, str, f"{label}.text")
        role = _get(message, "role", where, str, f"{label}.role")
        thread = [*thread, {"role": "user" if role == "prompter" else role, "content": text}]
        replies = message.get("replies") or []
        if not isinstance(replies, list):
            raise DataError(f"{where}: field '{label}.replies' must be list")
        ranked = []
        for i, reply in enumerate(replies):
            child = f"{label}.replies[{i}]"
            if not isinstance(reply, dict):
                raise DataError(f"{where}: field {child!r} must be an object")
            if reply.get("rank") is not None and not reply.get("deleted", False):
                rank = _get(reply, "rank", where, int, f"{child}.rank")
                _nonempty(reply, "text", where, f"{child}.text")
                ranked.append((rank, reply))
            stack.append((reply, child, thread))
        if len(ranked) >= 2 and ranked[0][1].get("role") == "assistant":
            groups.append((thread, [{"rank": k, "text": m["text"]} for k, m in ranked]))
    groups.reverse()  # depth-first from the root, in file order
    return groups


def render_thread(messages: list[dict[str, str]]) -> str:
    """A plain-text prompt: one user turn is itself (InstructGPT style); longer threads are
    "User: ..." / "Assistant: ..." turns separated by blank lines."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def _oasst_rankings(r, where):
    out = []
    for thread, replies in _oasst_groups(r, where):
        out.append(
            {
                "prompt": render_thread(thread),
                "responses": [m["text"] for m in replies],
                "ranks": [m["rank"] for m in replies],
                "messages": thread,
            }
        )
    return out


def _oasst_demonstrations(r, where):
    out = []
    for thread, replies in _oasst_groups(r, where):
        best = min(replies, key=lambda m: m["rank"])
        out.append({"prompt": render_thread(thread), "response": best["text"], "messages": thread})
    return out


def _prompt_only(r, where):
    return [_get(r, "prompt", where)]


DEMONSTRATIONS: dict[str, Callable] = {
    "prompt_response": _prompt_response,
    "alpaca": _alpaca,
    "self_instruct": _self_instruct,
    "oasst": _oasst_demonstrations,
}
RANKINGS: dict[str, Callable] = {
    "rankings": _rankings,
    "comparisons": _comparison,
    "hh_rlhf": _hh_rlhf,
    "tldr": _tldr,
    "oasst": _oasst_rankings,
}


def _prompts_of(fmt: str) -> Callable:
    if fmt == "prompts":
        return _prompt_only
    if fmt == "self_instruct":

        def instances(r, where):
            instruction = _get(r, "instruction", where)
            inputs = [i.get("input") or "" for i in _get(r, "instances", where, list)] or [""]
            return [join_input(instruction, x) for x in inputs]

        return instances
    if fmt == "alpaca":
        # Evaluation prompt sets (AlpacaFarm) carry an output that a prompt reader ignores.
        return lambda r, where: [join_input(_get(r, "instruction", where), r.get("input") or "")]
    parser = DEMONSTRATIONS.get(fmt) or RANKINGS.get(fmt)
    if parser is None:
        raise ValueError(f"unknown data format {fmt!r}")
    return lambda r, where: [item["prompt"] for item in parser(r, where)]


def detect_format(record) -> str:
    """The format of a record, from its keys."""
    if not isinstance(record, dict):
        raise DataError(f"cannot detect the format of a {type(record).__name__} record")
    keys = set(record)
    if "message_tree_id" in keys or isinstance(record.get("prompt"), dict):
        return "oasst"
    if {"info", "summaries"} <= keys:
        return "tldr"
    if {"chosen", "rejected"} <= keys:
        return "comparisons" if "prompt" in keys else "hh_rlhf"
    if "responses" in keys:
        return "rankings"
    if "instances" in keys:
        return "self_instruct"
    if "instruction" in keys:
        return "alpaca"
    if "response" in keys:
        return "prompt_response"
    if "prompt" in keys:
        return "prompts"
    raise DataError(f"cannot detect the data format from fields {sorted(keys)}")


# --------------------------------------------------------------------------- readers


def _read(path, parsers_or_fn, fmt: str, skip_invalid: bool, **backend) -> tuple[list, int]:
    out, skipped, parse = [], 0, None
    for where, record in read_records(path, **backend):
        try:
            if isinstance(record, DataError):
                raise record
            if parse is None:
                name = detect_format(record) if fmt == "auto" else fmt
                try:
                    parse = parsers_or_fn(name)
                except ValueError as e:
                    if fmt != "auto":
                        raise  # a config error: the format named holds no such records
                    missing = "missing field 'response': " if name == "prompts" else ""
                    raise DataError(f"{where}: {missing}{e} (set data.format)") from None
            out.extend(parse(record, where))
        except DataError as e:
            if not skip_invalid:
                if str(e).startswith("cannot detect"):
                    raise DataError(f"{where}: {e} (set data.format)") from None
                raise
            skipped += 1
    return out, skipped


def _lookup(table: dict[str, Callable], kind: str) -> Callable[[str], Callable]:
    def get(name: str) -> Callable:
        if name not in table:
            raise ValueError(
                f"format {name!r} holds no {kind}; formats for {kind}: {sorted(table)}"
            )
        return table[name]

    return get


def read_demonstrations(
    path: str, format: str = "auto", skip_invalid: bool = False, **backend
) -> tuple[list[dict], int]:
    """([{prompt, response[, messages]}], number of invalid records skipped)."""
    return _read(path, _lookup(DEMONSTRATIONS, "demonstrations"), format, skip_invalid, **backend)


def read_rankings(
    path: str, format: str = "auto", skip_invalid: bool = False, **backend
) -> tuple[list[dict], int]:
    """([{prompt, responses[K], ranks[K][, labeler_id, messages]}], invalid records skipped).

    Pairwise formats become K = 2 with ranks [0, 1] (chosen first)."""
    return _read(path, _lookup(RANKINGS, "rankings"), format, skip_invalid, **backend)


def read_comparisons(
    path: str, format: str = "auto", skip_invalid: bool = False, **backend
) -> tuple[list[dict], int]:
    """([{prompt, chosen, rejected}], skipped): pairwise formats as pairs (K = 2 only)."""
    rankings, skipped = read_rankings(path, format, skip_invalid, **backend)
    pairs = []
    for r in rankings:
        if len(r["responses"]) != 2:
            raise DataError(f"{path}: a ranking with K={len(r['responses'])} is not a pair")
        best = 0 if r["ranks"][0] <= r["ranks"][1] else 1
        pairs.append(
            {
                "prompt": r["prompt"],
                "chosen": r["responses"][best],
                "rejected": r["responses"][1 - best],
            }
        )
    return pairs, skipped


def read_prompts(
    path: str, format: str = "auto", skip_invalid: bool = False, **backend
) -> tuple[list[str], int]:
    """(prompts, skipped) of any format above (a plain prompt file has {prompt} records)."""
    return _read(path, _prompts_of, format, skip_invalid, **backend)


def read_prompt_records(path: str) -> list[dict]:
    """Prompt records {prompt, ...}: a JSONL file whose records all carry "prompt" keeps them
    whole (world prompt records keep their spec for the gold rubric); any other prompt source
    (``read_prompts``) gives {prompt} records."""
    if path.endswith(".jsonl"):
        records = [r for _, r in json_records(path)]
        if all(isinstance(r, dict) and "prompt" in r for r in records):
            return records
    prompts, _ = read_prompts(path)
    return [{"prompt": p} for p in prompts]
