"""Resuming a checkpoint written at an epoch's end with ``max_steps`` set: Lightning 2.6 skips an epoch.

Lightning's fit loop counts a resume from a finished epoch (saved at its last batch's validation
or its end, before the epoch is marked completed) as no restart: the next epoch starts afresh.
With ``max_steps`` set ("iteration-based training") it forces a restart whatever the epoch's
state, so that a run stopped by ``max_steps`` mid-epoch continues that epoch; for a finished
epoch the restart runs the epoch's end again, counts it as processed twice, and the next epoch is
skipped: ``fit --trainer.max_steps N --ckpt_path last.ckpt`` from such a checkpoint trains
nothing for a whole epoch (with ``max_epochs`` 2 after epoch 0: no step at all), and exits 0
(Lightning issue 19617 is a neighbour of this case). No Lightning setting avoids it, hence this
subclass: it restarts a finished epoch only when it did not run to its last batch, with or
without ``max_steps``.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.loops.fit_loop import _FitLoop
from lightning.pytorch.loops.loop import _Loop


class FitLoopResumingFinishedEpochs(_FitLoop):
    """Lightning's fit loop, resuming an epoch that ran to its last batch as the next epoch's start."""

    @_Loop.restarting.setter
    def restarting(self, restarting: bool) -> None:
        current = self.epoch_progress.current
        epoch_finished = current.ready == current.started == current.processed
        # Mid-epoch stops (max_steps, a kill) keep Lightning's iteration-based restart.
        stopped_inside = self._iteration_based_training() and not self.epoch_loop.batch_progress.is_last_batch
        _Loop.restarting.fset(self, restarting and (not epoch_finished or stopped_inside))


def resume_finished_epochs_as_the_next(trainer: pl.Trainer) -> None:
    """Give ``trainer`` the fit loop above, before a checkpoint's loop state is restored into it
    (it keeps every counter; only the restart decision changes). A custom fit loop is left alone."""
    if type(trainer.fit_loop) is _FitLoop:
        trainer.fit_loop.__class__ = FitLoopResumingFinishedEpochs
