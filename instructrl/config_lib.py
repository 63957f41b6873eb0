"""Configs: Python files exposing ``get_config(arg)``, their arguments and strict overrides.

A config file returns a locked ``ml_collections.ConfigDict``. Its argument string
(``configs/sft.py:model=small,runlocal``) is parsed against the arguments the file declares
(``parse_arg(arg, model="tiny", runlocal=False)``), and every field of the result can be
overridden with ``--config.<path>=<value>`` (``apply_overrides``). Both are strict: an unknown
name is an error that names it and the nearest valid one, and a value is parsed as the type of
the field it replaces (sequences included) or rejected with both types named. Errors a user can
cause raise ``ConfigError``, which the command line prints as one line.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
import types
from collections.abc import Iterable, Sequence
from typing import Any

import ml_collections

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
ASSETS = os.path.join(PACKAGE_DIR, "assets")
CONFIGS_DIR = os.path.join(os.path.dirname(PACKAGE_DIR), "configs")


class ConfigError(ValueError):
    """A bad config name, argument or override: the message names it (and what was meant)."""


def asset(*parts: str) -> str:
    return os.path.join(ASSETS, *parts)


def nearest(name: str, options: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest option, or '' when nothing is close."""
    options = list(options)
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    if not close:  # a typo in the last part of a dotted path: compare the last parts
        last = {o.rsplit(".", 1)[-1]: o for o in options}
        close = [last[m] for m in difflib.get_close_matches(name.rsplit(".", 1)[-1], last, 1, 0.6)]
    return f" (did you mean {close[0]!r}?)" if close else ""


# --------------------------------------------------------------------------- arguments


def parse_arg(arg: str | None, **declared) -> types.SimpleNamespace:
    """'model=small,runlocal' -> namespace(model='small', runlocal=True, <other defaults>).

    ``declared`` maps each argument the config file accepts to its default; a value is parsed
    as the default's type (bool flags may be given bare). An undeclared name raises.
    """
    out = dict(declared)
    for part in (arg or "").split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        key = key.strip()
        if key not in declared:
            raise ConfigError(
                f"config argument {key!r} is unknown{nearest(key, declared)}; "
                f"this config takes: {', '.join(sorted(declared)) or 'no arguments'}"
            )
        default = declared[key]
        if not sep:
            if not isinstance(default, bool):
                raise ConfigError(f"config argument {key!r} needs a value ({key}=...)")
            out[key] = True
        else:
            out[key] = parse_value(value.strip(), default, f"config argument {key!r}")
    return types.SimpleNamespace(**out)


# --------------------------------------------------------------------------- values


def _type_name(t) -> str:
    return getattr(t, "__name__", str(t))


def parse_value(raw: str, current: Any, where: str, field_type: type | None = None) -> Any:
    """``raw`` (command-line text) as the type of ``current`` (or ``field_type`` when the
    field is a typed placeholder holding None)."""
    want = field_type if current is None and field_type not in (None, type(None)) else None
    if want is None:
        want = type(current) if current is not None else None
    if raw.lower() in ("none", "null") and (current is None or field_type is not None):
        return None
    if want is None:  # an untyped None field: take a Python literal, else the text
        try:
            return ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            return raw
    if want is bool:
        low = raw.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{where} is bool; {raw!r} is not a bool (true/false)")
    if want is int:
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{where} is int; {raw!r} is not an int") from None
    if want is float:
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"{where} is float; {raw!r} is not a float") from None
    if want is str:
        return raw
    if want in (list, tuple):
        return want(_parse_sequence(raw, current or [], where))
    if issubclass(want, ml_collections.ConfigDict | dict):
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = None
        if not isinstance(value, dict):
            raise ConfigError(f"{where} is a section; {raw!r} is not a dict literal")
        return value
    raise ConfigError(f"{where} has type {_type_name(want)}, which cannot be set from text")


def _parse_sequence(raw: str, current: Sequence, where: str) -> list:
    """'[1, 2]' / '(a, b)' as a literal, else 'a,b' split on commas ('' is empty); elements
    take the type of the field's current elements."""
    text = raw.strip()
    items: list
    if text.startswith(("[", "(")):
        try:
            items = list(ast.literal_eval(text))
        except (ValueError, SyntaxError):
            items = [x.strip() for x in text.strip("[]()").split(",") if x.strip()]
    else:
        items = [x.strip() for x in text.split(",") if x.strip()]
    element = type(current[0]) if len(current) else None
    if element in (bool, int, float, str):
        return [
            x if isinstance(x, element) else parse_value(str(x), element(), f"{where}[{i}]")
            for i, x in enumerate(items)
        ]
    return items


# --------------------------------------------------------------------------- overrides


Mapping = (dict, ml_collections.ConfigDict)  # what a config section can be


def dotted_keys(config, prefix: str = "") -> list[str]:
    """Every field of ``config`` as a dotted path (sections and leaves)."""
    out = []
    for key, value in config.items():
        path = f"{prefix}{key}"
        out.append(path)
        if isinstance(value, Mapping):
            out.extend(dotted_keys(value, path + "."))
    return out


def override(config: ml_collections.ConfigDict, dotted: str, raw: str, flag: str = "--config"):
    """Set ``config.<dotted>`` from command-line text, strictly (see the module docstring)."""
    where = f"{flag}.{dotted}"
    *path, last = dotted.split(".")
    node = config
    for i, part in enumerate(path):
        if not isinstance(node, Mapping) or part not in node:
            _unknown(config, ".".join(path[: i + 1]), where)
        node = node[part]
    if not isinstance(node, Mapping) or last not in node:
        _unknown(config, dotted, where)
    current = node[last]
    field_type = node.get_type(last) if isinstance(node, ml_collections.ConfigDict) else None
    value = parse_value(raw, current, f"{where} ({dotted})", field_type)
    if isinstance(current, Mapping) and isinstance(value, dict):
        for key in value:
            if key not in current:
                _unknown(config, f"{dotted}.{key}", where)
        try:
            current.update(value)
        except TypeError as e:
            raise ConfigError(f"{where}: {e}") from None
        return
    try:
        node[last] = value
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


def _unknown(config, dotted: str, where: str):
    raise ConfigError(
        f"{where}: no field {dotted!r} in this config{nearest(dotted, dotted_keys(config))}"
    )


def apply_overrides(config, overrides: Sequence[tuple[str, str]], flag: str = "--config"):
    """Apply (dotted path, text) pairs in order; returns ``config`` (changed in place)."""
    for dotted, raw in overrides:
        override(config, dotted, raw, flag)
    return config


# --------------------------------------------------------------------------- files


def config_path(name_or_path: str) -> str:
    """A config file: a path, or a name under the repository's configs/ ('sft', 'pipeline')."""
    if os.path.isfile(name_or_path):
        return name_or_path
    candidate = os.path.join(
        CONFIGS_DIR, name_or_path + ("" if name_or_path.endswith(".py") else ".py")
    )
    if os.path.isfile(candidate):
        return candidate
    raise ConfigError(f"config file {name_or_path!r} not found (looked in {CONFIGS_DIR})")


def load_config(spec: str) -> ml_collections.ConfigDict:
    """``FILE[:ARG]`` -> the locked ConfigDict of ``get_config(ARG)``; a ``.json`` file is a
    config as JSON, or a stage's run_info.json (its ``config``: rerun a stage as it ran)."""
    path, _, arg = spec.partition(":")
    if path.endswith(".json"):
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path!r} not found")
        with open(path) as f:
            data = json.load(f)
        config = data["config"] if isinstance(data.get("config"), dict) else data  # run_info
        return ml_collections.ConfigDict(config).lock()
    path = config_path(path)
    name = "instructrl_config_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config(arg)")
    return module.get_config(arg or None)


# --------------------------------------------------------------------------- the stage base


def rankings_data(path: str = "") -> dict:
    """The ``data`` section of a stage that learns from rankings (RM, DPO), as
    ``data.comparisons.load_arrays`` reads it."""
    return dict(
        path=path,
        format="auto",
        eval_paths=[],
        heldout_labelers=[],  # empty: eval labelers absent from the training rankings
        template="{prompt}\n\n",
        seq_len=128,
        eval_examples=64,
        skip_too_long=True,
        skip_invalid=True,
    )


def base_config(seed: int = 0) -> ml_collections.ConfigDict:
    """Sections every training stage shares: seed, mesh, logical rules, tokenizer, model,
    optimizer, training loop and checkpointing."""
    c = ml_collections.ConfigDict()
    c.seed = seed
    c.stage = "sft"
    c.init_from = ""  # another stage's workdir, hf:DIR or gguf:FILE (params only)
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    c.logical_rules = ml_collections.config_dict.placeholder(list)
    c.tokenizer = dict(kind="bytes", path="", eos_token="", pad_token="")
    c.model = ml_collections.ConfigDict(
        dict(
            preset="tiny",
            vocab_size=ml_collections.config_dict.placeholder(int),
            max_len=ml_collections.config_dict.placeholder(int),
            dropout=0.0,
            dtype="float32",
            param_dtype="float32",
            matmul_dtype="",  # "bfloat16": bf16 products, float32 sums; "auto": where faster
            scan_layers=ml_collections.config_dict.placeholder(bool),  # None: the preset's
            remat="none",
            attention=ml_collections.config_dict.placeholder(str),
            reward_readout="last",  # a reward model's score: "last" token (paper) or "mean"
        )
    )
    c.optimizer = dict(
        lr=1e-3,
        warmup_steps=0,
        final_frac=0.1,
        weight_decay=0.0,
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        grad_clip=1.0,
        schedule="cosine",
        warmup_init_frac=0.0,
    )
    # eval_at_start: run every evaluator once before the first step (logged at step 0), the
    # baseline of the curves (e.g. the SFT policy at the start of PPO). progress: one live line
    # (metrics.Progress), headed by progress_label (the pipeline's "k/n stage").
    c.train = dict(
        batch_size=16,
        epochs=1.0,
        steps=0,
        log_every=10,
        progress=True,
        progress_label="",
        eval_at_start=False,
    )
    c.checkpoint = dict(every_steps=50, keep=2, async_save=True, select_by="", select_mode="min")
    c.evals = ml_collections.ConfigDict()
    # LoRA (instructrl.lora): rank > 0 trains rank-r adapters on ``targets`` (empty: every
    # projection of a block, model.LORA_TARGETS) and the top-level modules in ``train`` over
    # init_from's frozen weights; the update is scaled by alpha / rank. export: "merged"
    # (export/ holds plain weights) or "separate" (also the adapters alone, workdir/adapter).
    # compute: "merged" (W + alpha/r A B formed each step) or "adapters" (lora.COMPUTES).
    c.lora = dict(rank=0, alpha=16.0, targets=[], train=[], export="merged", compute="merged")
    return c
