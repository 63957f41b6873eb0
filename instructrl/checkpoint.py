"""Checkpoints through orbax: async, keep-N, atomic; and the resume order.

Resume order (every stage):
  1. a checkpoint in ``workdir/checkpoints``: full resume (params, optimizer state, step; the
     data position is a function of the step, so the run continues on the exact next batch);
  2. else ``init_from``: params only, from another stage's workdir (SFT -> RM, SFT + RM -> PPO)
     or a pretrained file (``hf:DIR``, ``gguf:FILE``: ``convert.load_params`` reads all three);
  3. else the freshly initialized state.
Orbax writes each step into a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


def manager(directory: str, keep: int = 2, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=async_save,
        create=True,
    )
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: dict, force: bool = False) -> bool:
    """Save a dict of arrays (e.g. {"step", "params", "opt_state"}); async when configured."""
    return mngr.save(step, args=ocp.args.PyTreeSave(state), force=force)


class CheckpointError(RuntimeError):
    """No checkpoint of a workdir restores; the message names each one tried."""


def restore_latest(mngr: ocp.CheckpointManager, abstract_state: dict) -> tuple[dict | None, int]:
    """(state, step) of the newest checkpoint that restores, or (None, 0) when there is none.

    A checkpoint that fails to restore (a flipped byte, a truncated file) is skipped with a
    warning naming it, and the next older one is tried; when every one fails, CheckpointError
    names them all rather than starting over and overwriting them.
    """
    failures = []
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            return restore(mngr, step, abstract_state), step
        except Exception as e:  # orbax / tensorstore raise many kinds; each is a bad checkpoint
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            path = os.path.join(str(mngr.directory), str(step))
            log.warning("checkpoint %s does not restore (%s); trying an older one", path, reason)
            failures.append(f"{path} ({reason})")
    if failures:
        raise CheckpointError("no checkpoint restores: " + "; ".join(failures))
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
        with open(os.path.join(workdir, "export", "info.json"), "w") as f:
            json.dump(info, f, indent=2, default=str)


def params_source(workdir: str) -> tuple[str, int]:
    """(directory, step) a later stage reads: export/, else best/, else checkpoints/."""
    for name in EXPORT_ORDER:
        directory = os.path.join(os.path.abspath(workdir), name)
        if os.path.isdir(directory):
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
    # A single-item manager: reading the metadata needs the item's handler (without one orbax
    # warns that the item "could not be restored", though the restore below works).
    mngr = ocp.CheckpointManager(directory, item_handlers=ocp.PyTreeCheckpointHandler())
    saved = mngr.item_metadata(step)
    saved_tree = saved.tree if hasattr(saved, "tree") else saved
    if saved_tree is not None and key in saved_tree:
        target = _partial_target(saved_tree[key], abstract_params)
    else:
        target = abstract_params
    restored = mngr.restore(
        step,
        args=ocp.args.PyTreeRestore(
            item={key: target},
            restore_args=ocp.checkpoint_utils.construct_restore_args({key: target}),
            partial_restore=True,
        ),
    )
    mngr.close()
    log.info("init_from %s (step %d)", directory, step)
    return restored[key]


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
