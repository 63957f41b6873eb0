"""Tokenizers and the minimal demonstration / text readers."""

import json
import os

import numpy as np
import pytest

from instructrl.data import lm as lm_data
from instructrl.data import sources
from instructrl.tokenizer import ByteTokenizer, HFTokenizer


def test_byte_tokenizer_round_trips_unicode():
    tok = ByteTokenizer()
    text = "Héllo, wörld — 你好"
    ids = tok.encode(text)
    assert max(ids) < 256 and tok.decode(ids) == text
    assert tok.decode_until_eos(ids + [tok.eos_id, 65, 66]) == text
    assert len({tok.pad_id, tok.eos_id, tok.bos_id}) == 3 and tok.vocab_size == 259


def test_gpt2_tokenizer_from_vocab_and_merges(shared_data):
    tok = HFTokenizer(os.path.join(shared_data, "tokenizers", "gpt2"))
    # Known GPT-2 ids: "Hello" = 15496, " world" = 995, <|endoftext|> = 50256.
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.eos_id == 50256 and tok.pad_id == 50256 and tok.vocab_size == 50257
    text = "The quick brown fox jumps over the lazy dog.\n\nÜnïcödé too."
    assert tok.decode(tok.encode(text)) == text


def test_hf_tokenizer_json_and_config_special_tokens(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers

    vocab = {"<pad>": 0, "</s>": 1, "a": 2, "b": 3, "[UNK]": 4}
    t = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="eos_token"):
        HFTokenizer(str(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "</s>", "pad_token": {"content": "<pad>"}})
    )
    tok = HFTokenizer(str(tmp_path))
    assert (tok.eos_id, tok.pad_id) == (1, 0)
    assert tok.encode("a b a") == [2, 3, 2]
    with pytest.raises(ValueError, match="tokenizer.pad_token='<nope>'"):
        HFTokenizer(str(tmp_path), pad_token="<nope>")


def test_demonstration_errors_name_file_record_and_field(tmp_path):
    path = tmp_path / "demos.jsonl"
    path.write_text('{"prompt": "p", "response": "r"}\n\n{"prompt": "p", "response": 3}\n')
    with pytest.raises(lm_data.DataError, match=r"demos.jsonl:3: field 'response' must be"):
        sources.read_demonstrations(str(path))[0]
    path.write_text('{"prompt": "p", "response": "r"}\n{"prompt": "p",\n')
    with pytest.raises(lm_data.DataError, match=r"demos.jsonl:2: malformed JSON"):
        sources.read_demonstrations(str(path))[0]
    path.write_text('{"prompt": "p"}\n')
    with pytest.raises(lm_data.DataError, match=r"demos.jsonl:1: missing field 'response'"):
        sources.read_demonstrations(str(path))[0]
    path.write_text('{"prompt": "p", "response": "  "}\n')
    with pytest.raises(lm_data.DataError, match="empty"):
        sources.read_demonstrations(str(path))[0]


def test_alpaca_demonstrations(shared_data):
    path = os.path.join(shared_data, "demonstrations", "alpaca-5000.json")
    # The real file has records with an empty output: an error by default, counted when skipped.
    with pytest.raises(lm_data.DataError, match=r"alpaca-5000.json: record \d+: field 'output'"):
        sources.read_demonstrations(path)
    demos, invalid = sources.read_demonstrations(path, skip_invalid=True)
    assert invalid > 0 and len(demos) + invalid == 5000
    with_input = json.load(open(os.path.join(shared_data, "demonstrations", "alpaca-5000.json")))
    first = next(r for r in with_input if r["input"] and r["output"].strip())
    match = [d for d in demos if d["response"] == first["output"]]
    assert match and match[0]["prompt"] == f"{first['instruction']}\n\n{first['input']}"
    tok = ByteTokenizer()
    arrays, skipped = lm_data.demonstration_arrays(tok, demos[:200], 256, skip_too_long=True)
    assert len(arrays["inputs"]) + skipped == 200 and skipped > 0
    np.testing.assert_array_equal(arrays["inputs"][:, 1:], arrays["targets"][:, :-1])


def test_prompt_is_truncated_from_the_left():
    tok = ByteTokenizer()
    arrays, _ = lm_data.demonstration_arrays(
        tok, [{"prompt": "0123456789", "response": "ab"}], seq_len=6, template="{prompt}"
    )
    # 7 tokens fit: the last 4 prompt characters, then "ab" and EOS.
    assert bytes(arrays["inputs"][0][:4].tolist()) == b"6789"


def test_epoch_batcher_is_a_pure_function_of_step_and_covers_each_epoch():
    arrays = {"x": np.arange(10)[:, None]}
    batcher = lm_data.EpochBatcher(arrays, batch_size=3, seed=7)
    assert batcher.steps_per_epoch == 3
    epoch0 = np.concatenate([batcher.batch(s)["x"][:, 0] for s in range(3)])
    assert len(set(epoch0.tolist())) == 9
    np.testing.assert_array_equal(batcher.batch(4)["x"], batcher.batch(4)["x"])
    assert not np.array_equal(batcher.batch(0)["x"], batcher.batch(3)["x"])
    host = lm_data.EpochBatcher(arrays, batch_size=4, seed=7, host_rows=slice(2, 4))
    np.testing.assert_array_equal(
        host.batch(1)["x"], lm_data.EpochBatcher(arrays, 4, 7).batch(1)["x"][2:4]
    )


def test_text_rows_are_contiguous_windows():
    tok = ByteTokenizer()
    arrays = lm_data.text_arrays(tok, ["abcdefgh", "ijklmnop"], seq_len=4)
    stream = list(b"abcdefgh") + [tok.eos_id] + list(b"ijklmnop") + [tok.eos_id]
    assert arrays["inputs"].shape == (4, 4)
    np.testing.assert_array_equal(arrays["inputs"][1], stream[4:8])
    np.testing.assert_array_equal(arrays["targets"][1], stream[5:9])
