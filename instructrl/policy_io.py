"""Load a finished stage's params and use them outside training: sample, score, measure.

The rankings, evaluation and sampling steps need the same few operations on trained models:
restore params from a stage workdir (``checkpoint.params_source`` order, or ``hf:`` / ``gguf:``
files), sample responses to text prompts with the KV-cache sampler, teacher-force log-probs,
read reward-model scores (``scoring``), and compute a held-out language-modelling loss.
``Toolkit`` bundles the model definitions of one stage config (a workdir's run_info.json
carries it: ``Toolkit.from_workdir``) and jits each operation once per shape.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from instructrl import config_lib, convert, fs, losses, sampler, scoring, sharding
from instructrl.data import lm as lm_data
from instructrl.data.lm import bucket_length, left_pad
from instructrl.model import ModelConfig, Transformer
from instructrl.presets import model_config
from instructrl.tokenizer import Tokenizer, make_tokenizer

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Batch:
    """Prompts and sampled responses of one generation call (numpy, unpadded rows only)."""

    prompts: list[str]
    texts: list[str]  # decoded responses, cut at EOS
    prompt_tokens: np.ndarray  # (B, P) left-padded
    prompt_mask: np.ndarray  # (B, P)
    tokens: np.ndarray  # (B, N) response tokens, pad after EOS
    mask: np.ndarray  # (B, N) 1 through EOS


class Toolkit:
    """Model definitions, tokenizer and mesh of one pipeline, plus jitted helpers.

    stage_config: any stage's config (``tokenizer``, ``model``, ``mesh``, ``logical_rules``).
    """

    def __init__(self, stage_config, batch_size: int = 32):
        self.tokenizer: Tokenizer = make_tokenizer(stage_config.tokenizer)
        self.tokenizer_key = json.dumps(stage_config.tokenizer.to_dict(), sort_keys=True)
        cfg: ModelConfig = model_config(stage_config, self.tokenizer)
        self.cfg = dataclasses.replace(cfg, dropout=0.0)
        self.rules = sharding.rules_from_config(stage_config.get("logical_rules"))
        self.mesh = sharding.make_mesh(stage_config.mesh)
        self.template = stage_config.get("data", {}).get("template", "{prompt}\n\n")
        self.models = scoring.Models(
            Transformer(self.cfg, head="lm"), Transformer(self.cfg, head="scalar"), self.rules
        )
        # Rows per call: a multiple of the device count so the batch axis shards evenly.
        n = jax.device_count()
        self.batch_size = max(n, -(-batch_size // n) * n)
        self._abstract = {}

    @classmethod
    def from_workdir(cls, workdir: str, batch_size: int = 32, cache: dict | None = None) -> Toolkit:
        """The Toolkit of a stage workdir's own config (its run_info.json). ``cache``: a dict
        that shares one Toolkit (and its compiled functions) between workdirs whose models
        and tokenizers are the same."""
        tk = cls(stage_config(workdir), batch_size=batch_size)
        if cache is None:
            return tk
        key = (tk.cfg, tk.tokenizer_key, tk.template, tk.batch_size)
        return cache.setdefault(key, tk)

    # ---- params -----------------------------------------------------------------------------
    def params(self, workdir: str, head: str = "lm"):
        """The params a stage in ``workdir`` exported (LM head or scalar head: a reward
        model, which must read rewards as ``self.cfg`` does)."""
        if head == "scalar":
            check_reward_readout(self.cfg, workdir)
        if head not in self._abstract:
            model = self.models.policy if head == "lm" else self.models.scalar

            def init(rng):
                with nn.logical_axis_rules(self.rules):
                    return model.init(rng, jnp.zeros((1, 8), jnp.int32))["params"]

            boxed = jax.eval_shape(init, jax.random.key(0))
            shardings = sharding.logical_shardings(boxed, self.mesh, self.rules)
            self._abstract[head] = sharding.abstract_with_shardings(nn.unbox(boxed), shardings)
        return convert.load_params(workdir, self._abstract[head])

    # ---- prompts ----------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str], max_new_tokens: int, template: str = "{prompt}"):
        """Left-padded (B, P) prompt tokens; prompts longer than the room left for
        ``max_new_tokens`` are truncated from the left. P is rounded up to a multiple of 16
        so that few shapes compile."""
        room = self.cfg.max_len - max_new_tokens
        ids = [self.tokenizer.encode(template.format(prompt=p))[-room:] for p in prompts]
        length = min(room, -(-max(map(len, ids)) // 16) * 16)
        return left_pad(ids, self.tokenizer.pad_id, length)

    def _chunks(self, *arrays, order=None):
        """Yields (row indices, padded arrays) in chunks of ``batch_size`` rows taken in
        ``order`` (default: as given); a short last chunk repeats its last row."""
        order = np.arange(len(arrays[0])) if order is None else np.asarray(order)
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            full = np.concatenate([rows, np.repeat(rows[-1:], self.batch_size - len(rows))])
            yield rows, [a[full] for a in arrays]

    def _by_length(self, prompt_mask) -> np.ndarray:
        """Rows ordered by real prompt length, so that each chunk of prompts is padded to its own
        longest (``_trim``), not the batch's."""
        return np.argsort(np.asarray(prompt_mask).sum(1), kind="stable")

    def _trim(self, prompt_tokens, prompt_mask, room: int):
        """A chunk's prompts left-padded or cut to the ``bucket_length`` of its longest (at
        most ``room``), so that every batch of prompts compiles one of a few shapes, not
        one per batch's own longest."""
        p = min(room, bucket_length(int(np.asarray(prompt_mask).sum(1).max())))
        widths = ((0, 0), (max(0, p - prompt_tokens.shape[1]), 0))
        prompt_tokens = np.pad(prompt_tokens, widths, constant_values=self.tokenizer.pad_id)
        prompt_mask = np.pad(prompt_mask, widths)
        return jnp.asarray(prompt_tokens[:, -p:]), jnp.asarray(prompt_mask[:, -p:])

    # ---- sampling ---------------------------------------------------------------------------
    def _generate(self, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                  stop: tuple[int, ...] = ()):  # fmt: skip
        tok = self.tokenizer  # one compilation across temperatures and stop ids (sampler.bind)
        return sampler.bind(self.models.policy, max_new_tokens=max_new_tokens,
                            eos_id=tok.eos_id, pad_id=tok.pad_id, temperature=temperature,
                            top_k=top_k, top_p=top_p, rules=self.rules, stop=stop)  # fmt: skip

    def stop_ids(self, text: str) -> tuple[int, ...]:
        """The token id that ``text`` (a stop sequence) encodes to when it is one token, so
        that sampling can end a row on it; () otherwise (the caller cuts the text)."""
        ids = self.tokenizer.encode(text)
        return tuple(ids) if len(ids) == 1 else ()

    def sample(
        self,
        params,
        prompts: list[str],
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        template: str = "{prompt}",
        stop: tuple[int, ...] = (),
    ) -> Batch:
        """One response per prompt (temperature 0: greedy). ``stop``: token ids that end a
        row besides EOS (``stop_ids``); the text is decoded through them."""
        p_tokens, p_mask = self.encode_prompts(prompts, max_new_tokens, template)
        fn = self._generate(max_new_tokens, float(temperature), int(top_k), float(top_p), stop)
        tokens = np.full((len(prompts), max_new_tokens), self.tokenizer.pad_id, np.int32)
        masks = np.zeros((len(prompts), max_new_tokens), np.int32)
        chunks = self._chunks(p_tokens, p_mask, order=self._by_length(p_mask))
        for i, (rows, (pt, pm)) in enumerate(chunks):
            pt, pm = self._trim(pt, pm, self.cfg.max_len - max_new_tokens)
            out = fn(params, pt, pm, jax.random.fold_in(jax.random.key(seed), i))
            out_tokens, out_mask = sharding.to_host((out.tokens, out.mask))
            tokens[rows], masks[rows] = out_tokens[: len(rows)], out_mask[: len(rows)]
        texts = [self.tokenizer.decode_until_eos(row) for row in tokens]
        return Batch(list(prompts), texts, p_tokens, p_mask, tokens, masks)

    # ---- scoring ----------------------------------------------------------------------------
    @functools.lru_cache(maxsize=8)  # noqa: B019  (one compiled function per distribution)
    def _logprobs(self, sampling: scoring.Sampling):
        def fn(params, packed, t, m):
            lp, _ = scoring.response_logprobs(
                self.models, params, None, None, t, m, sampling, packed=packed
            )
            return lp * m

        return jax.jit(fn)

    @functools.cached_property
    def _scores(self):
        def fn(params, packed, t, m):
            return scoring.reward_scores(self.models, params, None, None, t, m, packed=packed)

        return jax.jit(fn)

    def _map(self, fn, params, batch: Batch) -> np.ndarray:
        """fn(params, packed, tokens, mask) over chunks of ``batch_size`` (prompt, response)
        pairs, each chunk packed into rows of the batch's P + N tokens (``scoring.pack``: a
        quarter, half or all of ``batch_size`` rows, so three shapes at most compile), outputs
        back in the batch's row order: (B,) or (B, N)."""
        arrays = (batch.prompt_tokens, batch.prompt_mask, batch.tokens, batch.mask)
        row_len = batch.prompt_tokens.shape[1] + batch.tokens.shape[1]
        n = jax.device_count()
        rows = tuple(sorted({max(n, -(-self.batch_size // d // n) * n) for d in (4, 2, 1)}))
        total = np.asarray(batch.prompt_mask).sum(1) + np.asarray(batch.mask).sum(1)
        out = None
        for idx, (pt, pm, t, m) in self._chunks(*arrays, order=np.argsort(-total, kind="stable")):
            packed = scoring.pack(pt, pm, t, m, row_len, rows)
            values = sharding.to_host(fn(params, packed, jnp.asarray(t), jnp.asarray(m)))
            values = values[: len(idx)]
            if out is None:
                out = np.zeros((len(batch.tokens), *values.shape[1:]), values.dtype)
            out[idx] = values
        return out

    def logprobs(self, params, batch: Batch, sampling=scoring.Sampling()) -> np.ndarray:
        """(B, N) teacher-forced log-probs of the batch's response tokens (0 off the mask)
        under ``sampling`` (``scoring.response_logprobs``; default: the model's softmax)."""
        return self._map(self._logprobs(sampling), params, batch)

    def rm_scores(self, rm_params, batch: Batch) -> np.ndarray:
        """(B,) reward-model scores (normalization folded into the RM's params)."""
        return self._map(self._scores, rm_params, batch)

    def batch_from_texts(
        self, prompts: list[str], texts: list[str], max_new_tokens: int, template: str = "{prompt}"
    ) -> Batch:
        """Responses given as text (e.g. few-shot answers cut at a stop sequence) as a batch
        under ``prompts``: each response is re-tokenized, ends with EOS, and is cut to fit."""
        eos, pad = self.tokenizer.eos_id, self.tokenizer.pad_id
        tokens = np.full((len(texts), max_new_tokens), pad, np.int32)
        mask = np.zeros((len(texts), max_new_tokens), np.int32)
        for i, text in enumerate(texts):
            ids = (self.tokenizer.encode(text) + [eos])[:max_new_tokens]
            tokens[i, : len(ids)], mask[i, : len(ids)] = ids, 1
        pt, pm = self.encode_prompts(prompts, max_new_tokens, template)
        return Batch(list(prompts), list(texts), pt, pm, tokens, mask)

    # ---- language modelling -----------------------------------------------------------------
    @functools.cached_property
    def _nll_sums(self):
        def fn(params, inputs, targets, loss_mask):
            with nn.logical_axis_rules(self.rules):
                logits = self.models.policy.apply({"params": params}, inputs)
            logp = losses.token_logprobs(logits, targets)
            return -(logp * loss_mask).sum(), loss_mask.sum()

        return jax.jit(fn)

    def lm_loss(self, params, documents: list[str], seq_len: int) -> float:
        """Mean next-token NLL (nats) over the tokens of ``documents``."""
        arrays = lm_data.text_arrays(self.tokenizer, documents, seq_len)
        total, count = 0.0, 0.0
        keys = ("inputs", "targets", "loss_mask")
        for rows, chunk in self._chunks(*(arrays[k] for k in keys)):
            chunk[2] = chunk[2] * (np.arange(self.batch_size) < len(rows))[:, None]
            s, c = self._nll_sums(params, *chunk)
            total, count = total + float(s), count + float(c)
        return total / max(count, 1.0)

    def choice_loglik(self, params, contexts: list[str], choices: list[list[str]]) -> np.ndarray:
        """(num_items, num_choices) summed log-likelihood of each choice after its context."""
        flat_prompts = [c for c, opts in zip(contexts, choices, strict=True) for _ in opts]
        flat_choices = [o for opts in choices for o in opts]
        ids = [self.tokenizer.encode(o) for o in flat_choices]
        n_max = max(map(len, ids))
        tokens = np.full((len(ids), n_max), self.tokenizer.pad_id, np.int32)
        mask = np.zeros((len(ids), n_max), np.int32)
        for i, row in enumerate(ids):
            tokens[i, : len(row)], mask[i, : len(row)] = row, 1
        pt, pm = self.encode_prompts(flat_prompts, n_max)
        batch = Batch(flat_prompts, flat_choices, pt, pm, tokens, mask)
        flat = self.logprobs(params, batch).sum(1)
        out, i = [], 0
        for opts in choices:
            out.append(flat[i : i + len(opts)])
            i += len(opts)
        return np.stack(out)


def check_reward_readout(cfg: ModelConfig, reward_model: str) -> None:
    """Raise unless the reward model in ``reward_model`` (a stage workdir) was trained with the
    ``reward_readout`` that ``cfg`` scores with: a reward read one way from a head trained the
    other is meaningless. Imported models (hf:, gguf:) read the last token."""
    info = os.path.join(reward_model, "run_info.json")
    if reward_model.startswith(("hf:", "gguf:")) or not fs.isfile(info):
        trained = "last"
    else:
        model = json.loads(fs.read_text(info))["config"].get("model", {})
        trained = model.get("reward_readout", "last")
    if trained != cfg.reward_readout:
        raise ValueError(
            f"{info}: model.reward_readout={trained!r}, but this stage reads rewards with "
            f"{cfg.reward_readout!r}; set --config.model.reward_readout={trained}"
        )


def stage_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a stage ran with (its run_info.json), or an imported model's (model.json +
    tokenizer/ of ``python -m instructrl.convert``)."""
    info = os.path.join(workdir, "run_info.json")
    if fs.isfile(info):
        return ml_collections.ConfigDict(json.loads(fs.read_text(info))["config"])
    model_json = os.path.join(workdir, "model.json")
    if not fs.isfile(model_json):
        raise FileNotFoundError(f"{workdir}: not a stage workdir (no run_info.json or model.json)")
    c = config_lib.base_config()
    fields = json.loads(fs.read_text(model_json))
    c.model.update({k: v for k, v in fields.items() if k in c.model})
    c.model.preset = "tiny"  # every architecture field comes from the file
    for k, v in fields.items():
        if k not in c.model:
            c.model[k] = v
    c.tokenizer = dict(
        kind="hf", path=os.path.join(workdir, "tokenizer"), eos_token="", pad_token=""
    )
    return c
