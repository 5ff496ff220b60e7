"""What `caffetune run` starts: a resumed run (of one stage or two), two stages, or one run."""
from __future__ import annotations

from pathlib import Path

from caffetune.train import runner
from caffetune.train import stages as two_stage


def start_or_resume(callback: runner.Callback, *, resume_dir: Path | str | None = None,
                    options: runner.RunOptions | None = None,
                    plan: two_stage.StagePlan | None = None) -> list[runner.RunResult]:
    """Continue `resume_dir` (a staged run resumes its stages), else start `options` in two stages when a `plan`
    is given, else as one run. Returns the runs made, the last one's status is the outcome."""
    if resume_dir is not None:
        if two_stage.is_staged(resume_dir):
            return two_stage.resume_stages(resume_dir, callback=callback)
        return [runner.resume(resume_dir, callback=callback)]
    if options is None:
        raise ValueError("start_or_resume needs options or resume_dir")
    if plan is not None:
        return two_stage.run_two_stages(options, plan, callback=callback)
    return [runner.start(options, callback=callback)]


def resume_target(result: runner.RunResult) -> Path:
    """The folder `caffetune run --resume` takes to continue an interrupted run: a stage's parent for a stage."""
    staged = result.run_dir.name in ("stage1", "stage2") and two_stage.is_staged(result.run_dir.parent)
    return result.run_dir.parent if staged else result.run_dir
