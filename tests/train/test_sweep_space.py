"""The sweep's search space: --param parsing, sampling through an Optuna trial, and what a trial's values do to
copies of the solver and the nets (no Caffe needed)."""
from __future__ import annotations

import optuna
import pytest

from caffetune.errors import NetError, SweepError
from caffetune.model import layers, prototxt
from caffetune.train import sweep_space

NET = """name: "lenetish"
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  data_param { source: "/tmp/train_lmdb" backend: LMDB batch_size: 16 } }
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TEST }
  data_param { source: "/tmp/test_lmdb" backend: LMDB batch_size: 8 } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  param { lr_mult: 0 decay_mult: 0 } param { lr_mult: 0 decay_mult: 0 }
  convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
  param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "fc_new" type: "InnerProduct" bottom: "conv2" top: "fc_new"
  param { lr_mult: 10 decay_mult: 1 } param { lr_mult: 20 decay_mult: 0 }
  inner_product_param { num_output: 3 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc_new" bottom: "label" top: "loss" }
layer { name: "accuracy" type: "Accuracy" bottom: "fc_new" bottom: "label" top: "accuracy" include { phase: TEST } }
"""
SOLVER = 'net: "x.prototxt"\nbase_lr: 0.01\nlr_policy: "step"\ngamma: 0.1\nstepsize: 100\nmax_iter: 300\n'


def _net():
    return prototxt.parse(NET)


def _mults(net, name):
    layer = next(layer for layer in layers.all_layers(net) if layer.name == name)
    return layers.lr_mults(layer), layers.decay_mults(layer)


def test_specs_parse_into_optuna_distributions_and_back_to_text():
    space = sweep_space.parse(["base_lr=log:1e-4:1e-1", "momentum=uniform:0.8:0.99", "stepsize=int:100:400",
                               "freeze_through=choice:conv1,conv2,none", "fit_head=choice:true,false",
                               "lr_policy=choice:step,fixed", "batch_size=choice:8,32"])
    dists = space.distributions()
    assert dists["base_lr"] == optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)
    assert dists["momentum"] == optuna.distributions.FloatDistribution(0.8, 0.99)
    assert dists["stepsize"] == optuna.distributions.IntDistribution(100, 400)
    assert dists["freeze_through"].choices == ("conv1", "conv2", "none")
    assert dists["fit_head"].choices == (True, False)
    assert dists["batch_size"].choices == (8, 32)
    assert space.specs() == ["base_lr=log:0.0001:0.1", "momentum=uniform:0.8:0.99", "stepsize=int:100:400",
                             "freeze_through=choice:conv1,conv2,none", "fit_head=choice:true,false",
                             "lr_policy=choice:step,fixed", "batch_size=choice:8,32"]
    assert sweep_space.parse(space.specs()) == space   # the stored text parses to the same space


@pytest.mark.parametrize("text, message", [
    ("base_lr", "expected NAME=SPEC"),
    ("learning_rate=log:1e-4:1", "not a parameter caffetune sweeps"),
    ("base_lr=gauss:0:1", "unknown kind 'gauss'"),
    ("base_lr=log:0:1", "needs LOW > 0"),
    ("base_lr=uniform:0.1:0.01", "is above HIGH"),
    ("base_lr=log:1e-4", "needs LOW:HIGH"),
    ("momentum=uniform:0.5:1.5", "out of range"),
    ("stepsize=log:10:100", "is an integer, so log:... does not apply"),
    ("max_iter=int:10:abc", "'abc' is not an int"),
    ("lr_policy=uniform:0:1", "is a name, so uniform:... does not apply"),
    ("lr_policy=choice:step,stair", "no learning-rate policy 'stair'"),
    ("fit_head=choice:maybe", "is not a boolean"),
    ("base_lr=choice:", "at least one value"),
    ("base_lr=uniform:0:inf", "not a finite number"),
])
def test_bad_specs_are_one_clear_error(text, message):
    with pytest.raises(SweepError) as error:
        sweep_space.parse([text])
    assert message in str(error.value) and error.value.fix


def test_a_parameter_given_twice_or_none_at_all_is_refused():
    with pytest.raises(SweepError, match="given twice"):
        sweep_space.parse(["base_lr=log:1e-4:1e-1", "base_lr=log:1e-3:1e-1"])
    with pytest.raises(SweepError, match="nothing to search"):
        sweep_space.parse([])


def test_cache_features_is_accepted_exactly_when_the_feature_cache_exists():
    if sweep_space.feature_cache_available():
        assert sweep_space.parse(["cache_features=choice:true,false"]).names() == ["cache_features"]
    else:
        with pytest.raises(SweepError, match="no feature cache"):
            sweep_space.parse(["cache_features=choice:true,false"])


def test_a_trial_samples_inside_the_space_and_an_enqueued_trial_gets_its_values():
    space = sweep_space.parse(["base_lr=log:1e-4:1e-1", "stepsize=int:100:400", "freeze_through=choice:conv1,none"])
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    study.enqueue_trial({"base_lr": 0.005, "stepsize": 123, "freeze_through": "none"})
    first = space.suggest(study.ask())
    assert first == {"base_lr": 0.005, "stepsize": 123, "freeze_through": "none"}
    for _ in range(20):
        values = space.suggest(study.ask())
        assert 1e-4 <= values["base_lr"] <= 1e-1 and isinstance(values["stepsize"], int)
        assert 100 <= values["stepsize"] <= 400 and values["freeze_through"] in ("conv1", "none")


def test_solver_values_go_to_a_copy_with_the_schema_types():
    solver = prototxt.parse(SOLVER, "SolverParameter")
    result = sweep_space.apply_solver(solver, {"base_lr": 0.003, "stepsize": 50, "lr_policy": "fixed",
                                               "batch_size": 8})
    assert (result.base_lr, result.stepsize, result.lr_policy) == (pytest.approx(0.003), 50, "fixed")
    assert (solver.base_lr, solver.stepsize, solver.lr_policy) == (pytest.approx(0.01), 100, "step")
    assert result.max_iter == 300
    assert sweep_space.value_type("max_iter") is int and sweep_space.value_type("base_lr") is float


def test_the_sweep_preflights_a_solver_with_the_swept_fields_set():
    """A base solver without base_lr / max_iter is fine when the sweep sets them: the one preflight sees the first
    --try's values, else the first choice or the low end; the other fields stay the base solver's."""
    from caffetune.train import checks_solver
    from caffetune.train.checks_common import Run

    base = prototxt.parse('net: "x"\nlr_policy: "fixed"\n', "SolverParameter")
    space = sweep_space.parse(["base_lr=log:1e-4:1e-1", "max_iter=choice:200,100", "freeze_through=choice:a,none"])
    checked = sweep_space.preflight_solver(base, space)
    assert (checked.base_lr, checked.max_iter, checked.lr_policy) == (pytest.approx(1e-4), 200, "fixed")
    assert not base.HasField("base_lr") and not base.HasField("max_iter")          # a copy
    assert checks_solver.check_solver(Run(nets={}, solver=checked)) == []
    assert [p.what for p in checks_solver.check_solver(Run(nets={}, solver=base))] == [
        "base_lr is 0 (unset)", "max_iter is 0 (unset: it defaults to 0)"]
    tried = sweep_space.preflight_solver(base, space, {"base_lr": 0.05, "freeze_through": "a"})
    assert (tried.base_lr, tried.max_iter) == (pytest.approx(0.05), 200)


def test_a_policy_the_solver_cannot_run_is_refused_before_any_trial():
    solver = prototxt.parse('net: "x"\nbase_lr: 0.01\nlr_policy: "fixed"\nmax_iter: 10\n', "SolverParameter")
    sweep_space.check_solver(solver, sweep_space.parse(["base_lr=log:1e-4:1e-1"]))
    with pytest.raises(SweepError, match="'step' needs gamma; lr_policy 'step' needs stepsize"):
        sweep_space.check_solver(solver, sweep_space.parse(["lr_policy=choice:fixed,step"]))
    sweep_space.check_solver(solver, sweep_space.parse(["lr_policy=choice:fixed,step", "gamma=uniform:0.1:0.5",
                                                         "stepsize=int:10:20"]))


def test_batch_size_changes_the_train_only_data_layer_of_a_copy():
    net = _net()
    result = sweep_space.net_transform({"batch_size": 4})(net)
    batches = {tuple(layers.phases(layer)): layer.data_param.batch_size for layer in layers.all_layers(result)
               if layer.type == "Data"}
    assert batches == {("TRAIN",): 4, ("TEST",): 8}
    assert layers.all_layers(net)[0].data_param.batch_size == 16


def test_freeze_through_decides_what_trains_and_the_head_keeps_its_multipliers():
    net = _net()
    conv2 = sweep_space.net_transform({"freeze_through": "conv2"})(net)
    assert _mults(conv2, "conv1") == ([0, 0], [0, 0]) and _mults(conv2, "conv2") == ([0, 0], [0, 0])
    assert _mults(conv2, "fc_new") == ([10, 20], [1, 0])
    none = sweep_space.net_transform({"freeze_through": "none"})(net)
    assert _mults(none, "conv1") == ([1, 2], [1, 0]) and _mults(none, "conv2") == ([1, 2], [1, 0])
    assert _mults(net, "conv1") == ([0, 0], [0, 0])   # the caller's net is untouched


def test_backbone_and_new_lr_mult_scale_the_trainable_layers():
    result = sweep_space.net_transform({"freeze_through": "conv1", "backbone_lr_mult": 0.1,
                                        "new_lr_mult": 5.0})(_net())
    assert _mults(result, "conv1") == ([0, 0], [0, 0])
    assert _mults(result, "conv2")[0] == pytest.approx([0.1, 0.2])
    assert _mults(result, "fc_new") == ([5, 10], [1, 0])
    again = sweep_space.net_transform({"freeze_through": "conv1", "backbone_lr_mult": 0.1,
                                       "new_lr_mult": 5.0})(result)
    assert prototxt.format(again) == prototxt.format(result)   # applying a trial's values twice changes nothing


def test_the_space_is_checked_against_the_nets_before_any_trial():
    nets = {"train_val.prototxt": _net()}
    sweep_space.check_nets(nets, sweep_space.parse(["freeze_through=choice:conv1,none", "batch_size=int:4:8"]))
    with pytest.raises(SweepError, match="no layer conv5") as error:
        sweep_space.check_nets(nets, sweep_space.parse(["freeze_through=choice:conv5,none"]))
    assert "conv1" in error.value.fix
    shared = prototxt.parse(NET.replace(" include { phase: TRAIN }", "", 1))
    with pytest.raises(SweepError, match="TRAIN phase only"):
        sweep_space.check_nets({"n": shared}, sweep_space.parse(["batch_size=int:4:8"]))
    headless = prototxt.parse('layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" '
                              'inner_product_param { num_output: 2 } }')
    with pytest.raises(NetError):
        sweep_space.check_nets({"n": headless}, sweep_space.parse(["backbone_lr_mult=uniform:0:1"]))


def test_a_trial_to_try_first_is_typed_and_must_lie_in_the_space():
    space = sweep_space.parse(["base_lr=log:1e-4:1e-1", "freeze_through=choice:conv1,none", "stepsize=int:10:20"])
    assert sweep_space.parse_fixed("base_lr=0.01,freeze_through=none,stepsize=12", space) == {
        "base_lr": 0.01, "freeze_through": "none", "stepsize": 12}
    for text, message in [("base_lr=1", "outside the space"), ("momentum=0.9", "not one of the swept"),
                          ("freeze_through=conv9", "outside the space"), ("stepsize=1.5", "not an int")]:
        with pytest.raises(SweepError, match=message):
            sweep_space.parse_fixed(text, space)


def test_the_metric_of_a_test_pass_and_its_direction():
    from caffetune.train import sweep

    values = {"accuracy": 0.75, "accuracy_top5": 0.9, "loss": 0.4}
    assert sweep.metric_value(values, "accuracy") == 0.75 and sweep.metric_value(values, "loss") == 0.4
    assert sweep.metric_value({"loss3/top-1": 0.6, "loss": 1.0}, "accuracy") == 0.6   # the main accuracy
    assert sweep.metric_value(values, "missing") is None
    assert sweep.direction_of("accuracy") == "maximize" and sweep.direction_of("loss") == "minimize"
    assert sweep.direction_of("loss", "maximize") == "maximize"
    with pytest.raises(SweepError, match="expected maximize or minimize"):
        sweep.direction_of("loss", "down")
