"""Checkpoints through orbax: async, keep-N, atomic; and the resume order.

Resume order (every stage):
  1. a checkpoint in ``workdir/checkpoints``: full resume (params, optimizer state, step; the
     data position is a function of the step, so the run continues on the exact next batch);
  2. else ``init_from``: params only, from another stage's workdir (SFT -> RM, SFT + RM -> PPO)
     or a pretrained file (``hf:DIR``, ``gguf:FILE``: ``convert.load_params`` reads all three);
  3. else the freshly initialized state.
Orbax writes each step into a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoint intact. Once a step is on local disk it is sealed: the
size and CRC-32 of each of its files go to ``<step>/instructrl_sums.json``, and a step whose
files no longer match (a flipped byte, a truncated file) is never handed to orbax: restoring
falls back to the newest step that matches (``restore_latest``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import zlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from instructrl import fs
from instructrl.model import stack_layers, unstack_layers

log = logging.getLogger(__name__)


def manager(directory: str, keep: int = 2, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=async_save,
        create=True,
    )
    return ocp.CheckpointManager(fs.absolute(directory), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: dict, force: bool = False) -> bool:
    """Save a dict of arrays (e.g. {"step", "params", "opt_state"}); async when configured.
    Steps already complete on disk (this one too, when synchronous) are sealed."""
    saved = mngr.save(step, args=ocp.args.PyTreeSave(state), force=force)
    seal(mngr)
    return saved


SUMS = "instructrl_sums.json"


def _files(directory: str, prefix: str = ""):
    """(path relative to ``directory``, path) of every file under it."""
    for name in fs.listdir(directory):
        path = os.path.join(directory, name)
        if fs.isdir(path):
            yield from _files(path, prefix + name + "/")
        else:
            yield prefix + name, path


def _file_sums(step_dir: str) -> dict[str, list[int]]:
    sums = {}
    for rel, path in _files(step_dir):
        if rel == SUMS:
            continue
        crc, size = 0, 0
        with fs.open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                crc, size = zlib.crc32(chunk, crc), size + len(chunk)
        sums[rel] = [size, crc]
    return sums


def seal(mngr: ocp.CheckpointManager) -> None:
    """Write the file sums of every complete local step that has none (process 0)."""
    if jax.process_index() != 0:
        return
    for step in mngr.all_steps():
        step_dir = os.path.join(str(mngr.directory), str(step))
        target = os.path.join(step_dir, SUMS)
        if fs.isdir(step_dir) and not fs.exists(target):
            fs.write_atomic(target, json.dumps(_file_sums(step_dir)))


def verify(step_dir: str) -> str | None:
    """Why a sealed step's files do not match their sums (None: they match, or no seal)."""
    target = os.path.join(step_dir, SUMS)
    if not fs.exists(target):
        return None
    want = json.loads(fs.read_text(target))
    got = _file_sums(step_dir)
    for rel, (size, crc) in want.items():
        if rel not in got:
            return f"{rel} is missing"
        if got[rel][0] != size:
            return f"{rel} has {got[rel][0]} bytes, {size} were written"
        if got[rel][1] != crc:
            return f"{rel} does not match its CRC-32"
    return None


class CheckpointError(RuntimeError):
    """No checkpoint of a workdir restores; the message names each one tried."""


def restore_latest(mngr: ocp.CheckpointManager, abstract_state: dict) -> tuple[dict | None, int]:
    """(state, step) of the newest checkpoint that restores, or (None, 0) when there is none.

    A checkpoint that fails to restore (a flipped byte, a truncated file) is moved aside to
    ``<directory>.corrupt/<step>`` with a warning naming it, and the next older one is tried;
    when every one fails, CheckpointError names them all (and they stay in place): a run never
    starts over on top of checkpoints it could not read.
    """
    failures = []
    for step in sorted(mngr.all_steps(), reverse=True):
        path = os.path.join(str(mngr.directory), str(step))
        reason = verify(path) if fs.isdir(path) else None
        if reason is None:
            try:
                state = restore(mngr, step, abstract_state)
            except Exception as e:  # orbax / tensorstore raise many kinds: a bad checkpoint
                reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        if reason is not None:
            log.warning("checkpoint %s does not restore (%s); trying an older one", path, reason)
            failures.append((path, reason))
            continue
        for path, _ in failures:  # newer than the one restored: out of the run's way, kept
            aside = os.path.join(str(mngr.directory) + ".corrupt", os.path.basename(path))
            if jax.process_index() == 0:
                fs.makedirs(os.path.dirname(aside))
                epath.Path(path).rename(aside)
            log.warning("moved the unreadable checkpoint %s to %s", path, aside)
        mngr.reload()
        return state, step
    if failures:
        shown = "; ".join(f"{path} ({reason})" for path, reason in failures)
        raise CheckpointError(f"no checkpoint restores: {shown}")
    return None, 0


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: dict) -> dict:
    """Restore into the shapes, dtypes and shardings of ``abstract_state``."""
    return mngr.restore(
        step,
        args=ocp.args.PyTreeRestore(
            item=abstract_state,
            restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state),
        ),
    )


EXPORT_ORDER = ("export", "best", "checkpoints")


def export_params(workdir: str, params: Any, info: dict | None = None) -> None:
    """Write the params a later stage should start from to ``workdir/export`` (+ info.json)."""
    mngr = manager(os.path.join(workdir, "export"), keep=1, async_save=False)
    step = (mngr.latest_step() or 0) + 1
    save(mngr, step, {"params": params}, force=True)
    mngr.wait_until_finished()
    mngr.close()
    if info is not None and jax.process_index() == 0:
        text = json.dumps(info, indent=2, default=str)
        fs.write_atomic(os.path.join(workdir, "export", "info.json"), text)


def params_source(workdir: str) -> tuple[str, int]:
    """(directory, step) a later stage reads: export/, else best/, else checkpoints/."""
    for name in EXPORT_ORDER:
        directory = os.path.join(fs.absolute(workdir), name)
        if fs.isdir(directory):
            mngr = ocp.CheckpointManager(directory)
            step = mngr.latest_step()
            mngr.close()
            if step is not None:
                return directory, step
    raise FileNotFoundError(f"init_from={workdir!r}: no checkpoint under {EXPORT_ORDER}")


def latest_params(workdir: str, abstract_params: Any, key: str = "params") -> Any:
    """Params (only) of another stage's workdir (``params_source``), restored into the
    shardings of ``abstract_params``. ``abstract_params`` may be a sub-tree of that stage's
    params (e.g. the trunk without the LM head); extra saved entries are ignored."""
    directory, step = params_source(workdir)
    reason = verify(os.path.join(directory, str(step)))
    if reason is not None:
        raise CheckpointError(f"init_from={workdir!r}: {directory}/{step} is damaged ({reason})")
    # A single-item manager: reading the metadata needs the item's handler (without one orbax
    # warns that the item "could not be restored", though the restore below works).
    mngr = ocp.CheckpointManager(directory, item_handlers=ocp.PyTreeCheckpointHandler())
    saved = mngr.item_metadata(step)
    saved_tree = saved.tree if hasattr(saved, "tree") else saved
    relayout = None
    if saved_tree is not None and key in saved_tree:
        target, relayout = _layer_layout(saved_tree[key], abstract_params)
        target = _partial_target(saved_tree[key], target)
    else:
        target = abstract_params
    if relayout is None:
        restore_args = ocp.checkpoint_utils.construct_restore_args({key: target})
    else:  # read on the host in the saved layout, convert, then place as the model wants
        restore_args = jax.tree.map(
            lambda _: ocp.RestoreArgs(restore_type=np.ndarray), {key: target}
        )
    restored = mngr.restore(
        step,
        args=ocp.args.PyTreeRestore(
            item={key: target}, restore_args=restore_args, partial_restore=True
        ),
    )[key]
    mngr.close()
    if relayout is not None:
        log.info("init_from %s: layers converted between scanned and unrolled", directory)
        restored = jax.tree.map(
            lambda x, want: jax.device_put(np.asarray(x, want.dtype), want.sharding),
            relayout(restored),
            abstract_params,
        )
    log.info("init_from %s (step %d)", directory, step)
    return restored


def _layer_layout(saved: Any, wanted: Any) -> tuple[Any, Any]:
    """(target, relayout) for a checkpoint whose layers are laid out otherwise than the model's
    (``scan_layers``: one stacked ``layers`` entry against ``layers_0 ... layers_{L-1}``): the
    wanted tree in the saved layout, and the function that turns restored params back into the
    wanted layout. relayout is None where the layouts agree."""
    if not (isinstance(saved, dict) and isinstance(wanted, dict)):
        return wanted, None
    unrolled = sorted(k for k in wanted if re.fullmatch(r"layers_\d+", k))
    if unrolled and "layers" in saved and "layers" not in wanted:
        n = len(unrolled)
        return jax.eval_shape(lambda p: stack_layers(p, n), wanted), lambda p: unstack_layers(p, n)
    if "layers" in wanted and "layers_0" in saved and "layers_0" not in wanted:
        n = jax.tree.leaves(wanted["layers"])[0].shape[0]
        return jax.eval_shape(lambda p: unstack_layers(p, n), wanted), lambda p: stack_layers(p, n)
    target, fixes = dict(wanted), {}
    for k, v in wanted.items():
        if k in saved:
            target[k], fix = _layer_layout(saved[k], v)
            if fix is not None:
                fixes[k] = fix
    if not fixes:
        return wanted, None
    return target, lambda p: {k: fixes[k](v) if k in fixes else v for k, v in p.items()}


def _partial_target(saved: Any, wanted: Any) -> Any:
    """Check that every wanted leaf exists in the saved tree with the same shape."""
    flat_saved = dict(jax.tree_util.tree_flatten_with_path(saved)[0])
    for path, leaf in jax.tree_util.tree_flatten_with_path(wanted)[0]:
        name = jax.tree_util.keystr(path)
        if path not in flat_saved:
            raise KeyError(f"init_from: parameter {name} is missing from the checkpoint")
        got = tuple(flat_saved[path].shape)
        if got != tuple(leaf.shape):
            raise ValueError(
                f"init_from: parameter {name} has shape {got}, model needs {leaf.shape}"
            )
    return wanted
