"""Training checkpoints: Orbax CheckpointManager (async, keep the last K), the data-iterator
state and a crc32 of every array beside the arrays, fallback to an older step when the newest
cannot be read or does not match its checksums."""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from minimax_jax.checkpoint import CheckpointError, crc32, verify_tensor

log = logging.getLogger("minimax_jax.training")

UNFINISHED = "*.orbax-checkpoint-tmp*"  # what a save killed before it finished leaves behind


def ensure_writable(directory: Path, role: str) -> None:
    """Create `directory` and prove a file can be written there; otherwise raise a
    PermissionError naming the `role` ("run directory", ...) and the directory."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{uuid.uuid4().hex}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"{role} {directory} is not writable: {e.strerror or e}") from None


def tree_checksums(tree: Any) -> dict[str, list[int]]:
    """{dotted key path: [crc32 of the array's bytes]} for every array of `tree`, copied to the
    host one at a time."""
    return {jax.tree_util.keystr(path, simple=True, separator="."): [crc32(np.asarray(jax.device_get(leaf)))]
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def verify_tree(tree: Any, checksums: dict[str, list[int]], where: Path) -> None:
    """Raise a CheckpointError naming the array and `where` for the first array of `tree` that
    does not match `checksums` (from `tree_checksums`)."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = jax.tree_util.keystr(path, simple=True, separator=".")
        verify_tensor(name, np.asarray(jax.device_get(leaf)), checksums, where)


class TrainCheckpoints:
    """Saves and restores {state: TrainState arrays, extra: JSON (data iterator, counters),
    checksums: `tree_checksums(state)`}. With `verify`, a restored state must match its
    checksums. Checksums need every array on this process, so a multi-process run saves none
    and checks none."""

    def __init__(self, directory: Path, *, keep: int, save_every: int, verify: bool = True):
        ensure_writable(directory, "checkpoint directory")
        self.directory = directory.absolute()
        self.checksummed = jax.process_count() == 1
        self.verify = verify and self.checksummed
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, save_interval_steps=save_every, enable_async_checkpointing=True,
            ),
        )

    def save(self, step: int, state: Any, extra: dict[str, Any], *, force: bool = False) -> bool:
        """Start an async save of `state` (a pytree of arrays), its checksums and `extra` (JSON)
        at `step` if it is a save step (or `force`); returns whether a save started."""
        if not (force or self.manager.should_save(step)):
            return False
        items = {"state": ocp.args.StandardSave(state), "extra": ocp.args.JsonSave(extra)}
        if self.checksummed:
            items["checksums"] = ocp.args.JsonSave(tree_checksums(state))
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict[str, Any]] | None:
        """(step, state, extra) of the newest readable checkpoint, or None when there is none.

        First removes what saves killed before they finished left behind. A checkpoint that
        fails to restore or to match its checksums is moved aside to `<step>.unreadable` (kept
        for inspection, never read again) with a warning, and the previous one is tried. One
        without checksums is an error when verifying.
        """
        self._remove_unfinished()
        found = None
        for step in sorted(self.manager.all_steps(), reverse=True):
            where = self.directory / str(step)
            if self.verify and not (where / "checksums").is_dir():
                raise CheckpointError(f"{where} has no checksums, so it cannot be verified; "
                                      f"resume with --no-verify to use it unverified")
            items = {"state": ocp.args.StandardRestore(abstract_state), "extra": ocp.args.JsonRestore()}
            if self.verify:
                items["checksums"] = ocp.args.JsonRestore()
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(**items))
                if self.verify:
                    verify_tree(restored.state, restored.checksums, where)
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: fall back
                aside = self.directory / f"{step}.unreadable"
                os.replace(where, aside)
                log.warning("checkpoint at step %d in %s cannot be restored (%s); moved to %s, "
                            "trying an older one", step, self.directory, str(e).splitlines()[0][:300], aside)
                continue
            found = step, restored.state, restored.extra
            break
        self.manager.reload()
        return found

    def _remove_unfinished(self) -> None:
        """Delete the temporary directories of saves that were killed before they finished."""
        if jax.process_index() != 0:
            return
        for tmp in sorted(self.directory.glob(UNFINISHED)):
            shutil.rmtree(tmp)
            log.info("removed %s, left by a checkpoint save that did not finish", tmp)

    def wait(self) -> None:
        """Block until pending async saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) for a pytree of arrays, as restore targets."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
