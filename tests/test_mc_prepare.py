"""The weight-independent part of an MC step (mc/train/prepare.py, --mc_async): built ahead it gives the same
step as built in line (random and LensNet-proposed variants); the worker hands back only what was submitted for
the micro-batch, and a failure in it stops training with a message that names it. (Same losses through the
trainer: tests/test_mc_train.py.)"""

import pytest
import torch

from mc.train.controller import MCController, MCControllerError
from mc.train.prepare import PrepareWorker
from mc.train.train_step import MCTrainStep
from tests.test_mc_controller import batch, make

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("kw", [{}, dict(priority_variants=1)], ids=["random", "proposed"])
def test_a_step_prepared_ahead_is_the_step_built_in_line(kw):
    model, mods, cfg = make(num_variants=3, **kw)
    ctl = MCController(model, mods, cfg, total_steps=10)
    x, y = batch(B=2)
    ids = torch.tensor([7, 8])
    inline = ctl.process_batch(x, y, step=4, row_ids=ids)
    prepared = ctl.prepare(x, y, step=4, row_ids=ids)
    assert (prepared.plans is None) == bool(kw)  # proposals need the step's tree: only the keys are ahead
    ahead = ctl.process_batch(x, y, step=4, row_ids=ids, prepared=prepared)
    assert torch.equal(inline.plans, ahead.plans)
    assert torch.equal(inline.loss, ahead.loss) and torch.equal(inline.horizon_nll, ahead.horizon_nll)
    assert inline.metrics["mc/prepared_ahead"] == 0.0 and ahead.metrics["mc/prepared_ahead"] == 1.0


def test_the_worker_hands_back_only_the_submitted_micro_batch():
    model, mods, cfg = make()
    worker = PrepareWorker(MCController(model, mods, cfg, total_steps=10))
    x, y = batch(B=2)
    worker.submit((3, 0, 6), x, y, 3, torch.tensor([6, 7]))
    assert worker.take((3, 1, 8), x) is None  # another micro-batch: built in line
    assert worker.take((3, 0, 6), x) is None  # nothing pending any more
    worker.submit((3, 0, 6), x, y, 3, torch.tensor([6, 7]))
    assert worker.take((3, 0, 6), x.clone()) is None  # another tensor than the one submitted
    worker.submit((3, 0, 6), x, y, 3, torch.tensor([6, 7]))
    got = worker.take((3, 0, 6), x)
    assert got.step == 3 and got.plans is not None
    worker.close()


def test_a_failure_in_the_worker_stops_training_and_names_it(monkeypatch):
    model, mods, cfg = make(async_prepare=True)
    ctl = MCController(model, mods, cfg, total_steps=10)
    step = MCTrainStep(ctl, rows_per_step=2, B=2, rank=0, world_size=1, report_dir="/tmp")
    x, y = batch(B=2)

    def broken(*a, **k):
        raise RuntimeError("the layout broke")

    monkeypatch.setattr(ctl, "prepare", broken)
    step.prefetch(x, y, 0, 0)
    with pytest.raises(MCControllerError, match="micro-batch 0 of step 0 in the --mc_async worker: RuntimeError: "
                                                "the layout broke"):
        step(x, y, 0, 0)
    step.close()
