"""The KV-cache sampler against full recomputation, and its sampling distribution."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from instructrl.data.lm import left_pad
from instructrl.model import Transformer
from instructrl.presets import preset
from instructrl.sampler import bind, filter_logits, generate


def _recompute_greedy(model, params, tokens, mask, max_new_tokens, eos_id, pad_id):
    """The reference: greedy decoding by a full forward pass over the whole (prompt + new
    tokens) buffer for every new token, no cache. Returns tokens, log-probs, mask (B, N)."""
    batch, prompt_len = tokens.shape
    seq = np.concatenate([tokens, np.full((batch, max_new_tokens), pad_id, np.int32)], axis=1)
    seq_mask = np.concatenate([mask, np.zeros((batch, max_new_tokens), np.int32)], axis=1)
    forward = jax.jit(lambda p, t, m: model.apply({"params": p}, t, attention_mask=m))
    out_logp = np.zeros((batch, max_new_tokens), np.float32)
    done = np.zeros(batch, bool)
    for i in range(max_new_tokens):
        pos = prompt_len + i
        logits = np.asarray(forward(params, seq, seq_mask))[:, pos - 1]
        logp = np.asarray(jax.nn.log_softmax(logits))
        new = logits.argmax(-1)
        seq[:, pos] = np.where(done, pad_id, new)
        seq_mask[:, pos] = ~done
        out_logp[:, i] = np.where(done, 0.0, logp[np.arange(batch), new])
        done |= seq[:, pos] == eos_id
    return seq[:, prompt_len:], out_logp, seq_mask[:, prompt_len:]


def _model(name, vocab_size=61, **kw):
    cfg = preset(name, vocab_size=vocab_size, **kw)
    model = Transformer(cfg)
    params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    # Larger weights make a peaky, non-trivial distribution.
    params = jax.tree.map(lambda x: x * 3.0 if x.ndim >= 2 else x, params)
    return model, params


def _prompts():
    seqs = [[5, 9, 11, 3, 7, 2], [8, 1], [4, 4, 4, 9]]
    return left_pad(seqs, pad_id=0)


@pytest.mark.parametrize("name,scan", [("tiny", True), ("llama-tiny", True), ("llama-tiny", False)])
def test_greedy_equals_full_recompute_argmax(name, scan):
    model, params = _model(name, scan_layers=scan)
    tokens, mask = _prompts()
    fast = jax.jit(
        functools.partial(generate, model, max_new_tokens=12, eos_id=60, pad_id=0, temperature=0.0)
    )(params, tokens, mask, jax.random.key(0))
    ref_tokens, ref_logp, ref_mask = _recompute_greedy(model, params, tokens, mask, 12, 60, 0)
    np.testing.assert_array_equal(fast.tokens, ref_tokens)
    np.testing.assert_array_equal(fast.mask, ref_mask)
    np.testing.assert_allclose(fast.logprobs, ref_logp, atol=2e-4)
    # Each row equals decoding that prompt alone, without padding.
    row = [8, 1]
    alone = generate(
        model,
        params,
        jnp.array([row]),
        jnp.ones((1, 2), jnp.int32),
        jax.random.key(0),
        max_new_tokens=12,
        eos_id=60,
        pad_id=0,
        temperature=0.0,
    )
    np.testing.assert_array_equal(alone.tokens[0], fast.tokens[1])


def test_stops_at_eos_and_masks_the_rest():
    model, params = _model("tiny")
    tokens, mask = _prompts()
    greedy = generate(
        model,
        params,
        tokens,
        mask,
        jax.random.key(0),
        max_new_tokens=10,
        eos_id=0,
        pad_id=0,
        temperature=0.0,
    )
    first = np.asarray(greedy.tokens[:, 0])
    # Use the first greedy token of row 0 as "EOS": row 0 stops after one token.
    out = generate(
        model,
        params,
        tokens,
        mask,
        jax.random.key(0),
        max_new_tokens=10,
        eos_id=int(first[0]),
        pad_id=59,
        temperature=0.0,
    )
    assert int(out.mask[0].sum()) == 1 and np.all(np.asarray(out.tokens[0, 1:]) == 59)
    assert np.all(np.asarray(out.logprobs[0, 1:]) == 0.0)


def test_stop_ids_end_rows_like_eos_and_change_nothing_before():
    """A tuple of ids ends a row on any of them (a few-shot separator beside EOS): each row is
    the unstopped row up to and including its first stop id, then padding."""
    model, params = _model("tiny")
    tokens, mask = _prompts()
    kwargs = dict(max_new_tokens=12, pad_id=0, temperature=1.0)
    free = generate(model, params, tokens, mask, jax.random.key(4), eos_id=60, **kwargs)
    free_tokens = np.asarray(free.tokens)
    stop = int(free_tokens[1, 2])  # row 1's third token becomes a stop token
    out = generate(model, params, tokens, mask, jax.random.key(4), eos_id=(60, stop), **kwargs)
    for row, ref in zip(np.asarray(out.tokens), free_tokens, strict=True):
        hits = np.flatnonzero((ref == stop) | (ref == 60))
        end = hits[0] + 1 if len(hits) else len(ref)
        np.testing.assert_array_equal(row[:end], ref[:end])
        assert np.all(row[end:] == 0)
    assert int(np.asarray(out.mask)[1].sum()) <= 3
    # Bound, the stop ids are an argument: the same samples, and samplers with and without
    # stop ids (the few-shot base model's and the SFT policy's) share one compilation.
    bound = bind(model, eos_id=60, stop=(stop,), **kwargs)
    plain = bind(model, eos_id=60, **kwargs)
    assert bound.jitted is plain.jitted
    for fn, ref in ((bound, out), (plain, free)):
        got = fn(params, tokens, mask, jax.random.key(4))  # jitted: log-probs to rounding
        chex.assert_trees_all_equal((got.tokens, got.mask), (ref.tokens, ref.mask))
        chex.assert_trees_all_close(got.logprobs, ref.logprobs, atol=1e-5)
    assert bound.jitted._cache_size() == 1
    with pytest.raises(ValueError, match="stop: at most"):
        bind(model, eos_id=60, stop=(1, 2, 3), **kwargs)


def test_rows_draw_their_own_streams_and_compaction_changes_nothing():
    """Row r's token i comes from fold_in(fold_in(rng, i), r): decoding only the rows still
    running once few are left (``compact``) gives the very samples of decoding every row to
    the end, and a row's sample does not change when the other rows' prompts do."""
    model, params = _model("tiny")
    rng = np.random.default_rng(0)
    seqs = [list(rng.integers(1, 60, size=rng.integers(2, 7))) for _ in range(12)]
    tokens, mask = left_pad(seqs, pad_id=0)
    # EOS is a token the random model draws often, so rows end at many different steps.
    probs = np.asarray(jax.nn.softmax(model.apply({"params": params}, tokens)[:, -1]))
    eos = int(np.argsort(probs.mean(0))[-3])
    kwargs = dict(max_new_tokens=24, eos_id=eos, pad_id=0, temperature=1.0)
    key = jax.random.key(11)
    compact = generate(model, params, tokens, mask, key, **kwargs)
    full = generate(model, params, tokens, mask, key, compact=False, **kwargs)
    lengths = np.asarray(full.mask).sum(1)
    # The last steps ran over the 3 rows (12 // 4) still going: the compact path ran.
    assert np.sort(lengths)[-4] < lengths.max() and lengths.min() < lengths.max() / 2, lengths
    np.testing.assert_array_equal(np.asarray(compact.tokens), np.asarray(full.tokens))
    np.testing.assert_array_equal(np.asarray(compact.mask), np.asarray(full.mask))
    np.testing.assert_allclose(np.asarray(compact.logprobs), np.asarray(full.logprobs), atol=1e-6)
    others = [seqs[0]] + [list(rng.integers(1, 60, size=5)) for _ in range(11)]
    tokens2, mask2 = left_pad(others, pad_id=0, length=tokens.shape[1])
    again = generate(model, params, tokens2, mask2, key, **kwargs)
    np.testing.assert_array_equal(np.asarray(again.tokens)[0], np.asarray(full.tokens)[0])


def test_one_compilation_serves_every_temperature():
    """The temperature is an argument of the bound sampler's executable, not a constant in it:
    binding T = 0.7 after T = 1.0 reuses the compiled function, and the draws still follow the
    tempered softmax (T = 0.7 is peakier than T = 1.0)."""
    from instructrl import sampler

    model, params = _model("tiny")
    n = 2000
    prompt = jnp.tile(jnp.array([[5, 9, 11]]), (n, 1))
    sampler._jitted_generate.cache_clear()
    bound = {
        t: sampler.bind(model, max_new_tokens=1, eos_id=60, pad_id=0, temperature=t)
        for t in (1.0, 0.7)
    }
    draws = {
        t: fn(params, prompt, jnp.ones_like(prompt), jax.random.key(2)) for t, fn in bound.items()
    }
    jitted = sampler._jitted_generate(model, 1, 60, 0, False, 0, 1.0, ())
    assert jitted._cache_size() == 1  # one trace and compile for both temperatures
    logits = np.asarray(model.apply({"params": params}, prompt[:1])[0, -1], np.float64)
    for t, out in draws.items():
        probs = np.exp(logits / t - np.logaddexp.reduce(logits / t))
        counts = np.bincount(np.asarray(out.tokens[:, 0]), minlength=61) / n
        assert np.abs(counts - probs).max() < 0.04, (t, np.abs(counts - probs).max())
        np.testing.assert_allclose(
            np.asarray(out.logprobs[:, 0]), np.log(probs[np.asarray(out.tokens[:, 0])]), atol=1e-4
        )


def test_sampled_frequencies_match_softmax():
    model, params = _model("tiny")
    n = 4000
    prompt = jnp.tile(jnp.array([[5, 9, 11]]), (n, 1))
    out = generate(
        model,
        params,
        prompt,
        jnp.ones_like(prompt),
        jax.random.key(3),
        max_new_tokens=1,
        eos_id=60,
        pad_id=0,
        temperature=1.0,
    )
    probs = np.asarray(jax.nn.softmax(model.apply({"params": params}, prompt[:1])[0, -1]))
    counts = np.bincount(np.asarray(out.tokens[:, 0]), minlength=61)
    expected = probs * n
    big = expected > 20
    # Pearson chi-square over well-populated bins, generous bound (df ~ number of bins).
    chi2 = ((counts[big] - expected[big]) ** 2 / expected[big]).sum()
    assert chi2 < 3 * big.sum() + 30, chi2
    np.testing.assert_allclose(
        np.asarray(out.logprobs[:, 0]),
        np.log(probs[np.asarray(out.tokens[:, 0])]),
        rtol=1e-4,
        atol=1e-5,
    )


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.5), (8, 0.7)])
def test_top_k_top_p_never_emit_excluded_tokens(top_k, top_p):
    model, params = _model("tiny")
    n = 2000
    prompt = jnp.tile(jnp.array([[5, 9, 11]]), (n, 1))
    out = generate(
        model,
        params,
        prompt,
        jnp.ones_like(prompt),
        jax.random.key(4),
        max_new_tokens=1,
        eos_id=60,
        pad_id=0,
        temperature=1.0,
        top_k=top_k,
        top_p=top_p,
    )
    logits = model.apply({"params": params}, prompt[:1])[0, -1]
    allowed = np.isfinite(np.asarray(filter_logits(logits[None], 1.0, top_k, top_p)[0]))
    order = np.argsort(-np.asarray(logits))
    if top_k:
        assert allowed.sum() <= top_k
    if top_p < 1.0:
        # Nucleus on the top-k-renormalized distribution: the kept set reaches top_p mass, and
        # dropping its least likely token would fall short of it (it is the smallest such set).
        probs = np.asarray(jax.nn.softmax(filter_logits(logits[None], 1.0, top_k, 1.0)[0]))
        kept = probs[allowed]
        assert kept.sum() >= top_p - 1e-6
        assert kept.sum() - kept.min() < top_p
        assert allowed[order[0]]
    emitted = np.unique(np.asarray(out.tokens[:, 0]))
    assert allowed[emitted].all()


@pytest.mark.parametrize(
    "name,mesh_shape,temperatures",
    [("llama-tiny", (2, 2, 2), (0.0, 1.0)), ("tiny", (4, 1, 2), (1.0,))],
)
def test_sharded_generate_matches_single_device(name, mesh_shape, temperatures):
    """Batch over (data, fsdp), heads over tensor on 8 simulated devices: same tokens (greedy
    and sampled, keys are partitionable) and log-probs as one device."""
    from instructrl import sharding

    assert jax.device_count() >= 8, "run with --xla_force_host_platform_device_count=8"
    model, params = _model(name, vocab_size=64, scan_layers=True)  # vocab splits over tensor
    seqs = [[5, 9, 11, 3, 7, 2], [8, 1], [4, 4, 4, 9], [7], [3, 1, 4, 1, 5], [2, 7], [6], [9, 9]]
    tokens, mask = left_pad(seqs, pad_id=0)
    rules = sharding.LOGICAL_RULES

    def run(mesh, temperature):
        boxed = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
        shardings = sharding.logical_shardings(boxed, mesh, rules)
        placed = jax.device_put(params, shardings)
        batch = sharding.shard_batch({"tokens": tokens, "mask": mask}, mesh)
        gen = jax.jit(
            functools.partial(
                generate,
                model,
                max_new_tokens=10,
                eos_id=60,
                pad_id=0,
                temperature=temperature,
                top_k=20,
                rules=rules,
            )
        )
        out = gen(placed, batch["tokens"], batch["mask"], jax.random.key(7))
        return placed, out

    one = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    data, fsdp, tensor = mesh_shape
    eight = sharding.make_mesh({"data": data, "fsdp": fsdp, "tensor": tensor}, jax.devices()[:8])
    for temperature in temperatures:
        _, single = run(one, temperature)
        placed, multi = run(eight, temperature)
        np.testing.assert_array_equal(multi.tokens, single.tokens)
        np.testing.assert_array_equal(multi.mask, single.mask)
        np.testing.assert_allclose(multi.logprobs, single.logprobs, atol=1e-4)
    qkernel = placed["layers"]["attn"]["query"]["kernel"]  # (L, D, N, H): heads over tensor
    assert qkernel.sharding.spec[2] == "tensor" and len(qkernel.addressable_shards) == 8
    assert len(multi.tokens.sharding.device_set) == 8


def test_unrolled_and_scanned_decoding_agree():
    model, params = _model("llama-tiny")
    tokens, mask = _prompts()
    run = functools.partial(
        generate,
        model,
        params,
        tokens,
        mask,
        jax.random.key(2),
        max_new_tokens=8,
        eos_id=60,
        pad_id=0,
        temperature=1.0,
    )
    a, b = jax.jit(run)(), jax.jit(functools.partial(run, unroll_layers=False))()
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


def _np_filtered_logprobs(logits, tokens, temperature, top_k, top_p):
    """float64 NumPy: log-probs of ``tokens`` under temperature, top-k, then top-p (nucleus on
    the top-k-renormalized distribution, the smallest prefix reaching top_p mass)."""
    z = np.asarray(logits, np.float64) / temperature
    out = np.zeros(tokens.shape)
    for idx in np.ndindex(tokens.shape):
        row = z[idx].copy()
        order = np.argsort(-row)
        keep = np.zeros(row.shape, bool)
        keep[order[:top_k] if top_k else order] = True
        p = np.exp(row - row[keep].max()) * keep
        p /= p.sum()
        mass = np.cumsum(p[order]) - p[order]  # mass before each token in sorted order
        keep[order[mass >= top_p]] = False
        row = np.where(keep, row, -np.inf)
        out[idx] = row[tokens[idx]] - np.logaddexp.reduce(row[keep])
    return out


def test_teacher_forced_logprobs_are_the_samplers_under_filtering():
    """PPO scores a response with ``scoring.response_logprobs`` under the distribution the
    sampler drew it from: at T 0.7, top-k 8, top-p 0.9 both equal a float64 NumPy filter, and
    the reference (same T, no truncation) gives every token at least that filtered mass back."""
    from instructrl import scoring

    model, params = _model("tiny")
    tokens, mask = _prompts()
    s = scoring.Sampling(temperature=0.7, top_k=8, top_p=0.9)
    out = generate(model, params, tokens, mask, jax.random.key(5), max_new_tokens=8, eos_id=60,
                   pad_id=0, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)  # fmt: skip
    models = scoring.Models(policy=model, scalar=model, rules=())
    args = (tokens, mask, out.tokens, out.mask)
    logp, _ = scoring.response_logprobs(models, params, *args, s)
    _, raw = scoring.response_logprobs(models, params, *args)  # unfiltered logits (B, N, V)
    ref_logp, _ = scoring.response_logprobs(models, params, *args, s.reference())
    m = np.asarray(out.mask) > 0
    expected = _np_filtered_logprobs(np.asarray(raw), np.asarray(out.tokens), 0.7, 8, 0.9)
    chex.assert_shape(logp, out.tokens.shape)
    np.testing.assert_allclose(np.asarray(logp)[m], expected[m], atol=2e-5)
    np.testing.assert_allclose(np.asarray(out.logprobs)[m], expected[m], atol=2e-5)
    # Truncation only renormalizes mass onto the kept tokens, and at least one step here cut.
    gap = (np.asarray(logp) - np.asarray(ref_logp))[m]
    assert (gap >= -1e-6).all() and gap.max() > 1e-3
