"""A sweep with --metric loss over trials trained on cached features (`run --cache-features`): the snapshot kept
by the metric is a top-net snapshot while caffe runs; the trial's best-metric.caffemodel gets the frozen trunk back,
as the run does for its own snapshots."""
from __future__ import annotations

import pytest
from train.test_cached_run import _install, blobs, setup_net  # noqa: F401 (_install: autouse: install, cache dir)

from caffetune.train import cached_run, sweep, sweep_results, sweep_space

pytestmark = pytest.mark.caffe


def test_the_metric_s_best_snapshot_of_a_cached_trial_is_a_full_net(tmp_path):
    _, solver, start = setup_net(tmp_path / "data", max_iter=20)
    options = sweep.SweepOptions(solver=solver, weights=[start], name="cached", trials=1, metric="loss",
                                 space=sweep_space.parse(["base_lr=log:1e-3:1e-1"]), prune=False,
                                 cache_features=True, enqueue=[{"base_lr": 0.05}])
    result = sweep.run(options, base=tmp_path)
    run = tmp_path / "runs" / "cached" / "trial-0000"
    cached = cached_run.load(run)
    assert cached is not None                        # the trial trained the top on cached features
    kept = run / sweep_results.METRIC_WEIGHTS
    assert cached_run.is_full_net(kept, cached.cut)
    trained, frozen = blobs(kept), blobs(start)
    assert (trained["conv1"][0] == frozen["conv1"][0]).all()          # the trunk, as pretrained
    assert set(trained) == set(frozen)
    assert result.best["snapshot"]["metric"] == "loss"
    assert (tmp_path / "runs" / "cached" / "best.caffemodel").read_bytes() == kept.read_bytes()
