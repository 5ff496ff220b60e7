"""Two-stage fine-tuning in one command, as the Keras InceptionV3 recipe does with two fit() calls:

1. heads only: every learnable layer but the classifier head(s) frozen (lr_mult 0, BatchNorm on global stats);
2. unfreeze from a layer on (everything before it stays frozen) with a lower base_lr, starting from stage one's
   best weights.

Each stage is an ordinary run directory (runs/<name>/stage1, runs/<name>/stage2) with its own best.caffemodel and
optional early stopping; runs/<name>/best.caffemodel is the best of both.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from google.protobuf.message import Message

from caffetune import files
from caffetune.errors import NetError, RunError
from caffetune.model import heads as heads_module
from caffetune.model import layers
from caffetune.surgery import lr_policy
from caffetune.train import run_dir as run_files
from caffetune.train import runner


@dataclass
class StagePlan:
    unfreeze_from: str | None = None      # first layer trained in stage two (None: every layer)
    stage1_iter: int | None = None        # default: the solver's max_iter
    stage2_iter: int | None = None
    lr_factor: float = 0.1                # stage two's base_lr = the solver's times this
    heads: list[str] = field(default_factory=list)   # default: found by heads.find_heads


def _head_mults(net: Message, names: set[str]) -> tuple[float, float]:
    """The head's own (weight, bias) lr_mult as written, so that stage one does not change them."""
    for layer in layers.all_layers(net):
        if layer.name in names:
            mults = layers.lr_mults(layer) or [1.0]
            return mults[0], mults[1] if len(mults) > 1 else mults[0]
    return 1.0, 1.0


def freeze_backbone(heads: list[str]):
    """Stage one's net edit: freeze every learnable layer except the heads."""
    def transform(net: Message) -> Message:
        names = {head.name for head in heads_module.find_heads(net, heads or None)}
        policy = lr_policy.Policy(new_layers=frozenset(names), freeze="backbone",
                                  new_lr_mult=_head_mults(net, names))
        return lr_policy.apply(net, lr_policy.plan(net, policy))
    return transform


def freeze_before(layer_name: str | None):
    """Stage two's net edit: freeze every layer before `layer_name` (nothing when None)."""
    def transform(net: Message) -> Message:
        if layer_name is None:
            return net
        names = [layer.name for layer in layers.all_layers(net)]
        if layer_name not in names:
            raise NetError(f"--unfreeze-from {layer_name}: the net has no layer of that name",
                           fix=f"use one of: {', '.join(names)}")
        index = names.index(layer_name)
        if index == 0:
            return net
        return lr_policy.apply(net, lr_policy.plan(net, lr_policy.Policy(freeze_through=names[index - 1])))
    return transform


def _stage_weights(result: runner.RunResult) -> Path:
    weights = result.best or result.snapshot
    if weights is None:
        raise RunError("stage one left no weights to start stage two from", where=str(result.run_dir),
                       fix="check stage one's caffe.log; set snapshot_after_train or a test phase")
    return weights


def _write_overall_best(root: Path, results: list[runner.RunResult]) -> None:
    ranked = [r for r in results if r.best is not None and r.best_accuracy is not None]
    if not ranked:
        return
    best = max(ranked, key=lambda r: r.best_accuracy)
    run_files.copy_atomic(best.best, root / "best.caffemodel")
    info = json.loads((best.run_dir / "best.json").read_text()) | {"stage": best.run_dir.name}
    files.write_atomic(root / "best.json", json.dumps(info, indent=2) + "\n")


STAGES_FILE = "stages.json"


def _save_plan(root: Path, options: runner.RunOptions, plan: StagePlan, base: Path) -> None:
    """What `--resume runs/<name>` needs to finish the stages: the plan and the options, paths absolute."""
    saved = {"plan": asdict(plan), "solver": str(runner.resolve(str(options.solver), base)),
             "weights": [str(runner.resolve(str(w), base)) for w in options.weights],
             "options": {key: getattr(options, key) for key in ("gpu", "strict_gpu", "caffe", "keep_best",
                                                                "early_stop", "max_iter", "preflight")}}
    files.write_atomic(root / STAGES_FILE, json.dumps(saved, indent=2) + "\n")


def run_two_stages(options: runner.RunOptions, plan: StagePlan, callback: runner.Callback = runner._quiet,
                   base: Path | None = None) -> list[runner.RunResult]:
    """Stage one (heads only), then stage two from stage one's best weights. Returns the runs made (one when
    stage one was interrupted: `resume_stages` finishes it and runs stage two)."""
    if options.snapshot:
        raise RunError("--stages starts from weights, not from a snapshot", fix="drop --snapshot, or run without "
                                                                                 "--stages to continue a snapshot")
    base = (base or Path.cwd()).resolve()
    options = replace(options, name=options.name or runner.default_name(options.solver))
    root = base / options.runs_root / options.name
    callback(runner.Notice("info", "stage 1: heads only, backbone frozen"))
    first = runner.start(replace(options, name=f"{options.name}/stage1", transform_net=freeze_backbone(plan.heads),
                                 max_iter=plan.stage1_iter or options.max_iter), callback, base)
    _save_plan(root, options, plan, base)
    if first.status == "interrupted":
        return [first]
    return [first, _second_stage(root, options, plan, first, callback, base)]


def _second_stage(root: Path, options: runner.RunOptions, plan: StagePlan, first: runner.RunResult,
                  callback: runner.Callback, base: Path) -> runner.RunResult:
    weights = _stage_weights(first)
    callback(runner.Notice("info", f"stage 2: unfreeze from {plan.unfreeze_from or 'the first layer'}, base_lr x "
                                   f"{plan.lr_factor:g}, from {weights}"))
    second = runner.start(replace(options, name=f"{root.name}/stage2", runs_root=root.parent, weights=[weights],
                                  fit_head=False,
                                  transform_net=freeze_before(plan.unfreeze_from), lr_factor=plan.lr_factor,
                                  max_iter=plan.stage2_iter or options.max_iter), callback, base)
    _write_overall_best(root, [first, second])
    return second


def is_staged(run_dir: Path | str) -> bool:
    return (Path(run_dir) / STAGES_FILE).is_file()


def resume_stages(root: Path | str, callback: runner.Callback = runner._quiet) -> list[runner.RunResult]:
    """Finish an interrupted two-stage run: resume the stage that was stopped, then run stage two if it is due."""
    root = Path(root).resolve()
    saved = json.loads((root / STAGES_FILE).read_text())
    plan = StagePlan(**saved["plan"])
    options = runner.RunOptions(solver=Path(saved["solver"]), weights=[Path(w) for w in saved["weights"]],
                                name=root.name, runs_root=root.parent, **saved["options"])
    if (root / "stage2" / "run.json").is_file():
        callback(runner.Notice("info", "stage 2: resuming"))
        second = runner.resume(root / "stage2", callback)
        _write_overall_best(root, [_finished(root / "stage1"), second])
        return [second]
    callback(runner.Notice("info", "stage 1: resuming"))
    first = runner.resume(root / "stage1", callback)
    if first.status == "interrupted":
        return [first]
    return [first, _second_stage(root, options, plan, first, callback, root.parent)]


def _finished(run_dir: Path) -> runner.RunResult:
    """A finished stage as a RunResult, from its best.json (for ranking the stages' best snapshots)."""
    best = json.loads((run_dir / "best.json").read_text()) if (run_dir / "best.json").is_file() else None
    return runner.RunResult(run_dir, "done", best["iteration"] if best else 0, None, None,
                            run_dir / "best.caffemodel" if best else None, best["accuracy"] if best else None, [], [])
