"""Training checkpoints: Orbax CheckpointManager (async, keep the last K), the data-iterator
state beside the arrays, fallback to an older step when the newest cannot be read."""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger("minimax_jax.training")


def ensure_writable(directory: Path) -> None:
    """Create `directory` and prove a file can be written there; raise a clear error otherwise."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{uuid.uuid4().hex}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"checkpoint directory {directory} is not writable: {e}") from e


class TrainCheckpoints:
    """Saves and restores {state: TrainState arrays, extra: JSON (data iterator, counters)}."""

    def __init__(self, directory: Path, *, keep: int, save_every: int):
        ensure_writable(directory)
        self.directory = directory.absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, save_interval_steps=save_every, enable_async_checkpointing=True,
            ),
        )

    def save(self, step: int, state: Any, extra: dict[str, Any], *, force: bool = False) -> bool:
        """Start an async save of `state` (a pytree of arrays) and `extra` (JSON) at `step`."""
        return self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra)),
            force=force,
        )

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict[str, Any]] | None:
        """(step, state, extra) of the newest readable checkpoint, or None when there is none.

        A checkpoint that fails to restore is moved aside to `<step>.unreadable` (kept for
        inspection, never read again) with a warning, and the previous one is tried.
        """
        found = None
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state), extra=ocp.args.JsonRestore()
                    ),
                )
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: fall back
                aside = self.directory / f"{step}.unreadable"
                os.replace(self.directory / str(step), aside)
                log.warning("checkpoint at step %d in %s cannot be restored (%s); moved to %s, "
                            "trying an older one", step, self.directory, str(e).splitlines()[0][:200], aside)
                continue
            found = step, restored.state, restored.extra
            break
        self.manager.reload()
        return found

    def wait(self) -> None:
        """Block until pending async saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) for a pytree of arrays, as restore targets."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)

