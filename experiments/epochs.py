"""The epoch loop ``experiments.train`` and ``experiments.sweep`` share.

One run, or one chunk of a sweep (its settings stacked on a leading axis), trains the same
way: each epoch is the compiled epoch, then (a run's option) its batch statistics
re-estimated, then the evaluation of the test split, then the numbers fetched to the host, then
a checkpoint every ``config.checkpoint_every_epochs`` epochs and after the last. What the
caller does with an epoch's numbers (history, logs, progress) is its ``on_epoch``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Epoch:
    """One finished epoch, its numbers on the host.

    Attributes:
      index: the epoch's index (0 = the first of the run).
      step: the step count after it (a chunk's settings all take the same steps).
      train: its training metrics (``loss``, ``accuracy``, ``all_finite``,
        ``first_nonfinite_step``; per setting in a chunk).
      test: ``accuracy`` and ``loss`` on the test split (per setting in a chunk); with
        re-estimated batch statistics also ``accuracy_moving_averages``, before it.
      seconds: its wall time: training, evaluation and fetching the numbers.
    """

    index: int
    step: int
    train: dict
    test: dict
    seconds: float


def run_epochs(
    state,
    spec,
    data,
    *,
    epoch_fn: Callable,
    eval_fn: Callable,
    keys: Callable[[int], Any],
    start: int,
    config,
    mgr,
    on_epoch: Callable[[Epoch], None],
    meta: Callable[[int], dict],
    recalibrate: Callable | None = None,
):
    """Trains epochs ``start`` .. ``config.num_epochs - 1`` from ``state``.

    Args:
      state: the train state (stacked for a chunk); donated to ``epoch_fn``.
      spec: the spec (stacked for a chunk).
      data: device-resident ``train_x``, ``train_y``, ``test_x``, ``test_y``.
      epoch_fn: ``epoch_fn(state, images, labels, keys, spec) -> (state, metrics)``.
      eval_fn: ``eval_fn(params, spec, images, labels, model_state) -> {"accuracy", "loss"}``.
      keys: ``keys(epoch)``: the data-order key (stacked for a chunk) of an epoch.
      start: the first epoch to train (a resumed run's saved epoch count).
      config: the run's config (``num_epochs``, ``checkpoint_every_epochs``).
      mgr: the checkpoint manager.
      on_epoch: called with each finished :class:`Epoch`, before its checkpoint.
      meta: ``meta(epochs_done)``: the metadata saved with a checkpoint.
      recalibrate: ``recalibrate(state, epoch) -> state``, applied after each epoch's training
        and before its evaluation and checkpoint (batch statistics re-estimated; the test split
        is evaluated before it too), or ``None``.

    Returns:
      The final state.
    """
    from experiments import common, multihost

    total = config.num_epochs
    for epoch in range(start, total):
        t0 = time.perf_counter()
        state, m = epoch_fn(state, data["train_x"], data["train_y"], keys(epoch), spec)
        before = None
        if recalibrate is not None:
            before = eval_fn(state.params, spec, data["test_x"], data["test_y"], state.model_state)
            state = recalibrate(state, epoch)
        ev = eval_fn(state.params, spec, data["test_x"], data["test_y"], state.model_state)
        if before is not None:
            ev = {**ev, "accuracy_moving_averages": before["accuracy"]}
        m, ev, steps = multihost.fetch((m, ev, state.step))
        seconds = time.perf_counter() - t0
        step = int(np.ravel(steps)[0])
        on_epoch(Epoch(epoch, step, m, ev, seconds))
        if (epoch + 1) % config.checkpoint_every_epochs == 0 or epoch + 1 == total:
            common.save_checkpoint(mgr, step, state, meta(epoch + 1))
    return state


def evaluate(eval_fn: Callable, state, spec, data) -> dict:
    """The final test-split evaluation of a run or chunk, on the host."""
    from experiments import multihost

    return multihost.fetch(
        eval_fn(state.params, spec, data["test_x"], data["test_y"], state.model_state)
    )
