"""Tokenizers: Hugging Face ``tokenizers`` (tokenizer.json or GPT-2 vocab/merges) and bytes.

Special tokens come from the tokenizer's own files or from the config, never guessed: a
tokenizer without an end-of-sequence token fails loudly unless the config names one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
import tokenizers

from instructrl import fs


class Tokenizer:
    """Interface: encode/decode text, and the ids of eos and pad."""

    vocab_size: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def decode_until_eos(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.decode([i for i in ids if i != self.pad_id])


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes 0..255, then pad = 256, eos = 257, bos = 258. No files needed."""

    def __init__(self):
        self.pad_id, self.eos_id, self.bos_id = 256, 257, 258
        self.vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers.Tokenizer``.

    ``path`` is a tokenizer.json file, or a directory holding tokenizer.json, or a directory
    holding GPT-2's vocab.json + merges.txt (byte-level BPE). ``eos_token``/``pad_token`` name
    special tokens when the files do not (tokenizer_config.json is read when present); the pad
    token defaults to the eos token, which is safe because padded positions are always masked.
    """

    def __init__(self, path: str, eos_token: str | None = None, pad_token: str | None = None):
        path = path if fs.is_remote(path) else os.path.expanduser(path)
        directory = path if fs.isdir(path) else os.path.dirname(path)
        json_file = path if path.endswith(".json") and fs.isfile(path) else None
        if json_file is None and fs.isfile(os.path.join(path, "tokenizer.json")):
            json_file = os.path.join(path, "tokenizer.json")
        if json_file is not None:
            self._tok = tokenizers.Tokenizer.from_str(fs.read_text(json_file))
        elif fs.isfile(os.path.join(path, "vocab.json")):  # read from local files only
            self._tok = tokenizers.ByteLevelBPETokenizer.from_file(
                os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
            )
        else:
            raise FileNotFoundError(
                f"tokenizer.path={path!r}: expected tokenizer.json or vocab.json + merges.txt"
            )
        config_file = os.path.join(directory, "tokenizer_config.json")
        if fs.isfile(config_file):
            hf_config = json.loads(fs.read_text(config_file))
            eos_token = eos_token or _token_text(hf_config.get("eos_token"))
            pad_token = pad_token or _token_text(hf_config.get("pad_token"))
        if not eos_token and self._tok.token_to_id("<|endoftext|>") is not None:
            # GPT-2's vocab.json defines <|endoftext|> as its one special token.
            eos_token = "<|endoftext|>"
        if not eos_token:
            raise ValueError(
                f"tokenizer.path={path!r} defines no end-of-sequence token; set tokenizer.eos_token"
            )
        self.eos_id = self._id(eos_token, "eos_token")
        self.pad_id = self._id(pad_token, "pad_token") if pad_token else self.eos_id
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def _id(self, token: str, field: str) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise ValueError(f"tokenizer.{field}={token!r} is not in the vocabulary")
        return token_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def make_tokenizer(cfg) -> Tokenizer:
    """cfg.kind: "bytes" | "hf"; for "hf": cfg.path and optional eos_token / pad_token."""
    kind = cfg.get("kind", "bytes")
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "hf":
        return HFTokenizer(cfg.path, cfg.get("eos_token") or None, cfg.get("pad_token") or None)
    raise ValueError(f"tokenizer.kind must be 'bytes' or 'hf', got {kind!r}")
