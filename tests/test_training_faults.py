"""`train aligner` (tiny recipe) with each of its write points made to fail in turn: every
write, file fsync, rename and folder fsync of a whole run (log lines, checkpoints, the loss
plot, the final Aligner), with ENOSPC and EIO taking turns. After each fault: one line naming
a file of the run folder and the OS's reason, no temporary file left, and the next run
(--resume when a checkpoint was saved, else a fresh start in the same folder) ends with the
same losses, step for step, as a run that never failed, and a log that says so.
"""

from __future__ import annotations

import errno
import os
import shutil

import pytest

from plvmctl.errors import PlvmError
from plvmctl.train.aligner import logged_losses, train_aligner
from plvmctl.train.common import find_checkpoint, load_checkpoint

from test_faults import KINDS, Faults, temporary_files
from test_train_aligner import config_for, world  # noqa: F401 (world: a module fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

CODES = (errno.ENOSPC, errno.EIO)


def test_a_fault_at_any_write_of_a_training_run_resumes_to_the_same_losses(runtime, world, tmp_path):
    straight = train_aligner(runtime, config_for(world, tmp_path / "straight")).losses
    assert len(straight) == 6

    counted = tmp_path / "counted"
    with pytest.MonkeyPatch.context() as patch:
        points = Faults(patch, counted)
        train_aligner(runtime, config_for(world, counted))
    assert points.counts["write"] > 0 and points.counts["replace"] > 0

    run = tmp_path / "run"
    faults = 0
    for kind in KINDS:
        for fail_at in range(1, points.counts[kind] + 1):
            code = CODES[faults % 2]
            where = f"{kind} #{fail_at} ({os.strerror(code)})"
            shutil.rmtree(run, ignore_errors=True)
            with pytest.MonkeyPatch.context() as patch:
                Faults(patch, run, kind, fail_at, code)
                with pytest.raises(PlvmError) as failed:
                    train_aligner(runtime, config_for(world, run))
            message = str(failed.value)
            assert "\n" not in message and str(run) in message, where
            assert message.endswith(os.strerror(code)), (where, message)
            assert temporary_files(run) == [], where

            checkpoint = find_checkpoint(run)
            if checkpoint is not None:
                load_checkpoint(checkpoint)  # what a fault leaves as the checkpoint is whole
            again = train_aligner(runtime, config_for(world, run), resume=checkpoint is not None)
            assert again.losses == pytest.approx(straight, abs=1e-6), where
            assert logged_losses(run) == pytest.approx(dict(enumerate(straight)), abs=1e-6), where
            assert temporary_files(run) == [], where
            faults += 1
    assert faults == sum(points.counts.values())
