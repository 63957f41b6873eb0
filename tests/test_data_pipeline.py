"""Formats (templates, truncation, special tokens) and the Grain pipeline: resume, host
shards, packing (checked through the model's logits) and length buckets."""

import json
import os

import chex
import jax
import numpy as np
import pytest

from instructrl.data import formats, sources
from instructrl.data import pipeline as dp
from instructrl.data.lm import DataError
from instructrl.tokenizer import ByteTokenizer, HFTokenizer


def _examples(lengths, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        ids = rng.integers(0, 250, n + 1)
        mask = np.r_[np.zeros(n // 2 + 1), np.ones(n - n // 2)].astype(int)
        out.append(formats.shifted(ids.tolist(), mask.tolist()))
    return dp.Examples(out)


# --------------------------------------------------------------------------- formats


def test_plain_format_masks_the_response_and_truncates_the_prompt_from_the_left():
    tok = ByteTokenizer()
    fmt = formats.PlainFormat("{prompt}|")
    ids, mask = formats.encode(tok, fmt, {"prompt": "0123456789", "response": "ab"}, 7)
    # Room for 7 tokens: the last 4 prompt characters (with "|"), "ab" and EOS.
    assert ids == [*b"789|", *b"ab", tok.eos_id] and mask == [0, 0, 0, 0, 1, 1, 1]
    assert formats.encode(tok, fmt, {"prompt": "p", "response": "abcdefg"}, 8) is None
    ex = formats.shifted(ids, mask)
    np.testing.assert_array_equal(ex["targets"], ids[1:])
    np.testing.assert_array_equal(ex["loss_mask"], mask[1:])


def test_chat_formats_render_roles():
    chatml = formats.CHAT_PRESETS["chatml"]("Be brief.")
    ex = {
        "prompt": "unused",
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "2+2?"},
        ],
    }
    assert chatml.prompt_text(ex) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    tok = ByteTokenizer()
    ids, mask = formats.encode(tok, chatml, {"prompt": "x", "response": "4"}, 200)
    response = [*b"4<|im_end|>", tok.eos_id]
    assert ids[-len(response) :] == response and sum(mask) == len(response)
    # The HH format gives back an HH transcript prompt.
    hh = formats.CHAT_PRESETS["hh"]()
    prompt = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:"
    assert hh.prompt_text({"messages": sources.hh_messages(prompt)}) == prompt
    plain = formats.make_format({"template": "Q: {prompt}\nA:"})
    assert plain.prompt_text({"prompt": "why"}) == "Q: why\nA:"
    with pytest.raises(ValueError, match="chat_format"):
        formats.make_format({"chat_format": "nope"})


def test_eos_and_pad_come_from_the_tokenizer_configuration(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers

    vocab = {"<pad>": 0, "</s>": 1, "a": 2, "b": 3, "[UNK]": 4}
    t = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "</s>", "pad_token": "<pad>"})
    )
    tok = HFTokenizer(str(tmp_path))
    demos = [{"prompt": "a", "response": "b b"}, {"prompt": "a a a", "response": "b"}]
    examples, _ = dp.encode_demonstrations(tok, formats.PlainFormat("{prompt}"), demos, 6)
    pipe = dp.LMPipeline(examples, 2, 6, 0, pad_id=tok.pad_id, process_index=0, process_count=1)
    batch = pipe.batch(0)
    ends = {tuple(row[m > 0]) for row, m in zip(batch["targets"], batch["loss_mask"], strict=True)}
    assert ends == {(3, 3, 1), (3, 1)}  # responses end in </s> = 1
    assert (batch["inputs"][batch["loss_mask"] == 0][-1:] == 0).all()  # padded with <pad> = 0


def test_too_long_responses_raise_or_are_counted():
    tok = ByteTokenizer()
    demos = [{"prompt": "p", "response": "ok"}, {"prompt": "p", "response": "x" * 40}]
    with pytest.raises(DataError, match=r"src: record 2: field 'response' does not fit"):
        dp.encode_demonstrations(tok, formats.PlainFormat(), demos, 16, source="src")
    examples, too_long = dp.encode_demonstrations(
        tok, formats.PlainFormat(), demos, 16, skip_too_long=True
    )
    assert len(examples) == 1 and too_long == 1


def test_text_examples_predict_every_token_once_within_documents():
    tok = ByteTokenizer()
    docs = ["abcdefghij", "xyz"]
    examples = dp.text_examples(tok, docs, seq_len=4)
    targets = np.concatenate([examples[i]["targets"] for i in range(len(examples))])
    want = [*b"bcdefghij", tok.eos_id, *b"yz", tok.eos_id]
    np.testing.assert_array_equal(targets, want)
    assert examples.lengths.tolist() == [4, 4, 2, 3]  # "xyz" + EOS never joins "abc..."


# --------------------------------------------------------------------------- pipeline


def _pipe(examples, batch_size=4, seq_len=16, process=(0, 1), **kw):
    return dp.LMPipeline(
        examples, batch_size, seq_len, seed=3, process_index=process[0],
        process_count=process[1], **kw,
    )  # fmt: skip


def _ids(pipe, batch):
    """The example ids of a batch (examples are told apart by their first two tokens)."""
    firsts = {tuple(pipe.examples[i]["inputs"][:2]): i for i in range(len(pipe.examples))}
    return [firsts[tuple(row[:2])] for row in batch["inputs"]]


def test_epochs_cover_every_example_once_in_a_new_order():
    pipe = _pipe(_examples([8] * 12))
    assert pipe.steps_per_epoch == 3
    epochs = [
        np.concatenate([_ids(pipe, pipe.batch(s)) for s in range(e * 3, e * 3 + 3)])
        for e in range(2)
    ]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(12))
    assert list(epochs[0]) != list(epochs[1])
    # A batch size that does not divide the data: no epoch drops a remainder.
    pipe = _pipe(_examples([8] * 10))
    seen = np.concatenate([_ids(pipe, pipe.batch(s)) for s in range(5)])
    assert sorted(seen) == sorted(list(range(10)) * 2)


def test_a_resumed_iterator_yields_the_same_batches():
    pipe = _pipe(_examples(np.arange(3, 17)), packing=True)
    iterator = pipe.iterate(0)
    straight = [next(iterator) for _ in range(9)]
    resumed = pipe.iterate(0)
    for _ in range(4):
        next(resumed)
    state = resumed.get_state()
    assert state == {"next_index": 4}  # the training step: what each checkpoint holds
    fresh = _pipe(_examples(np.arange(3, 17)), packing=True).iterate(0)
    fresh.set_state(json.loads(json.dumps(state)))
    for want in straight[4:]:
        got = next(fresh)
        chex.assert_trees_all_equal(got, want)
    chex.assert_trees_all_equal(pipe.batch(6), straight[6])
    # Out-of-order calls (a restart at step 2) re-seek the prefetching iterator.
    chex.assert_trees_all_equal(pipe(5), straight[5])
    chex.assert_trees_all_equal(pipe(2), straight[2])
    chex.assert_trees_all_equal(pipe(3), straight[3])


@pytest.mark.parametrize("packing", [False, True])
def test_two_processes_get_disjoint_slices_that_make_the_global_batch(packing):
    examples = _examples(np.random.default_rng(1).integers(2, 9, 40))
    single = _pipe(examples, batch_size=4, packing=packing)
    hosts = [_pipe(examples, batch_size=4, packing=packing, process=(p, 2)) for p in range(2)]
    steps = int(single.steps_per_epoch)
    covered = []
    for step in range(steps):
        parts = [h.batch(step) for h in hosts]
        chex.assert_shape(parts[0]["inputs"], (2, 16))
        chex.assert_trees_all_equal(
            jax.tree.map(lambda *x: np.concatenate(x), *parts), single.batch(step)
        )
        rows = [h.row_indices(step) for h in hosts]
        assert not set(sum(rows[0], [])) & set(sum(rows[1], []))
        covered += sum(rows[0] + rows[1], [])
    if single.num_rows % 4 == 0:
        assert sorted(covered) == list(range(len(examples)))


def test_packing_is_tight_and_places_every_example_once(shared_data):
    tok = HFTokenizer(os.path.join(shared_data, "tokenizers", "gpt2"))
    path = os.path.join(shared_data, "demonstrations", "alpaca-5000.json")
    demos, _ = sources.read_demonstrations(path, skip_invalid=True)
    examples, _ = dp.encode_demonstrations(
        tok, formats.PlainFormat(), demos[:1500], 512, skip_too_long=True
    )
    rows = dp.pack_rows(examples.lengths, 512, seed=0)
    assert sorted(sum(rows, [])) == list(range(len(examples)))
    assert max(examples.lengths[r].sum() for r in rows) <= 512
    fill = examples.lengths.sum() / (len(rows) * 512)
    assert fill > 0.95, fill


@pytest.mark.parametrize("family", ["tiny", "llama-tiny"])
def test_packed_rows_never_attend_across_segments(family):
    from instructrl.model import Transformer
    from instructrl.presets import preset

    cfg = preset(family, vocab_size=256, dropout=0.0)
    model = Transformer(cfg, head="lm")
    examples = _examples([5, 9, 3, 7, 6, 4], seed=2)
    pipe = _pipe(examples, batch_size=2, seq_len=24, packing=True)
    batch = pipe.batch(0)
    assert batch["segment_ids"].max() > 1  # rows really hold several examples
    params = jax.jit(model.init)(jax.random.key(0), batch["inputs"][:, :4])["params"]
    # One call (one compilation): the packed rows; each example alone in its own row (right
    # padding cannot reach back); the packed rows again without segments (all ones).
    n_rows, width = len(batch["inputs"]), 24
    alone = np.zeros((len(examples), width), np.int32)
    for i in range(len(examples)):
        alone[i, : examples.lengths[i]] = examples[i]["inputs"]
    tokens = np.concatenate([batch["inputs"], alone, batch["inputs"]])
    ones = np.ones((len(examples) + n_rows, width), np.int32)
    segments = np.concatenate([batch["segment_ids"], ones])
    positions = np.concatenate([batch["positions"], np.cumsum(ones, 1) - 1])
    apply = jax.jit(
        lambda p, t, pos, seg: model.apply({"params": p}, t, positions=pos, segment_ids=seg)
    )
    logits = apply(params, tokens, positions, segments)  # (B, T, V)
    chex.assert_shape(logits, (2 * n_rows + len(examples), width, 256))
    packed, alone, leaky = np.split(np.asarray(logits), [n_rows, n_rows + len(examples)])
    for r, row in enumerate(pipe.row_indices(0)):
        at = 0
        for i in row:
            n = examples.lengths[i]
            np.testing.assert_allclose(packed[r, at : at + n], alone[i, :n], atol=1e-5, rtol=1e-5)
            at += n
    # Without segment ids the second example of a row would see the first one.
    first = examples.lengths[pipe.row_indices(0)[0][0]]
    assert not np.allclose(leaky[0, first:], packed[0, first:], atol=1e-3)


@pytest.mark.parametrize("hosts", [1, 2])
def test_packed_batches_hold_the_unpacked_batches_and_give_their_loss(hosts):
    """``pack_batches``: batch s holds exactly the examples of unpacked batch s, in fewer rows
    (every host the same count), and the LM step's loss and gradients are the same; its
    shards are packed alike whether one host or two build them."""
    import functools

    import optax

    from instructrl import sharding
    from instructrl.model import Transformer
    from instructrl.presets import preset
    from instructrl.sft import lm_step
    from instructrl.train import TrainState

    examples = _examples(np.random.default_rng(4).integers(3, 12, 48), seed=4)
    kw = dict(batch_size=8, seq_len=32)
    plain = _pipe(examples, **kw)
    packed = [_pipe(examples, pack_batches=True, process=(p, hosts), shards=2, **kw)
              for p in range(hosts)]  # fmt: skip
    one_host = _pipe(examples, pack_batches=True, shards=2, **kw)
    cfg = preset("tiny", vocab_size=256, dropout=0.0)
    model = Transformer(cfg, head="lm")
    tx = optax.sgd(0.1)
    params = jax.jit(model.init)(jax.random.key(0), np.zeros((1, 4), np.int32))["params"]
    step = jax.jit(functools.partial(lm_step, model, tx, sharding.LOGICAL_RULES))
    fewer = 0
    for s in range(int(plain.steps_per_epoch)):
        parts = [p.batch(s) for p in packed]
        assert len({len(b["inputs"]) for b in parts}) == 1  # one row count on every host
        batch = jax.tree.map(lambda *x: np.concatenate(x), *parts)
        jax.tree.map(np.testing.assert_array_equal, batch, one_host.batch(s))
        want = plain.batch(s)
        fewer += len(batch["inputs"]) < len(want["inputs"])
        got_targets = np.sort(batch["targets"][batch["loss_mask"] > 0])
        np.testing.assert_array_equal(got_targets, np.sort(want["targets"][want["loss_mask"] > 0]))
        results = []
        for b in (want, batch):
            state = TrainState(step=np.int32(0), params=params, opt_state=tx.init(params))
            new, metrics = step(state, b, jax.random.key(1))
            results.append((metrics["loss"], new.params))
        np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-5)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), *[r[1] for r in results]
        )
    assert fewer == int(plain.steps_per_epoch)  # every batch took fewer rows


def test_length_buckets_pad_to_the_smallest_that_fits():
    examples = _examples([3, 3, 3, 3, 11, 3, 3, 3])
    pipe = _pipe(examples, batch_size=4, seq_len=32, length_buckets=(8, 16))
    widths = {pipe.batch(s)["inputs"].shape[1] for s in range(4)}
    assert widths == {8, 16}
    batch = next(pipe.batch(s) for s in range(4) if pipe.batch(s)["inputs"].shape[1] == 16)
    assert batch["loss_mask"][:, 11:].sum() == 0 and "segment_ids" not in batch


def test_sft_load_data_reads_real_chat_demonstrations_packed(shared_data):
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "configs"))
    import sft as sft_config  # configs/sft.py

    from instructrl import sft

    c = sft_config.get_config("runlocal").unlock()
    c.data.path = os.path.join(shared_data, "preferences", "oasst-en-100-trees.jsonl")
    c.data.chat_format, c.data.packing, c.data.seq_len, c.data.eval_examples = (
        "chatml",
        True,
        256,
        8,
    )
    tok = ByteTokenizer()
    train, eval_arrays, prompts, skipped = sft.load_data(c, tok)
    assert len(train) + len(eval_arrays["inputs"]) + skipped["too_long"] == 212
    assert skipped["invalid"] == 0 and 0 < skipped["too_long"] < 212
    pipe = dp.LMPipeline(train, 4, 256, 0, packing=True, pad_id=tok.pad_id)
    batch = pipe.batch(0)
    chex.assert_shape(batch["segment_ids"], (4, 256))
    text = bytes(t for t in batch["inputs"][0].tolist() if t < 256).decode("utf-8", "replace")
    assert "<|im_start|>user\n" in text and "<|im_start|>assistant\n" in text


def test_bench_feeds_over_50k_tokens_per_core(shared_data):
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("bench_data", f"{root}/scripts/bench_data.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    first, steady = bench.main(["--epochs", "1"])
    assert first["tokens"] > 300_000
    assert first["tokens_per_cpu_s"] > 50_000 and steady["tokens_per_cpu_s"] > 50_000
