"""What ``hbmeta train`` / ``hbmeta evaluate`` do for the meta-RL experiments (the CLI hands over to these)."""

from __future__ import annotations

import json
from pathlib import Path

from hbmeta.experiments.rl import RL_EXPERIMENTS
from hbmeta.training.runs import load_checkpoint

__all__ = ["evaluate_command", "is_rl_run", "train_command"]


def is_rl_run(run: str | Path) -> bool:
    """Whether a run folder (or checkpoint file) holds a meta-RL run."""
    path = Path(run)
    checkpoint = path / "checkpoint.pt" if path.is_dir() else path
    if checkpoint.is_file():  # the checkpoint's own config, not config.json (which may be damaged or edited)
        return load_checkpoint(checkpoint)["config"].get("experiment") in RL_EXPERIMENTS
    return False


def train_command(config, out: str, resume: bool, progress: bool, eval_tasks: int | None, overwrite: bool = False) -> int:
    """Meta-train, then report the return after 0..test_steps adaptation steps on new tasks (evaluation.json)."""
    from hbmeta.evaluation.rl import evaluate_rl_run, format_returns
    from hbmeta.training import train  # the run folder's lock and checks, then the RL loop
    from hbmeta.training.runs import atomic_write_text

    result = train(config, out, resume=resume, progress=progress, overwrite=overwrite)
    evaluation = evaluate_rl_run(result.learner, config, config.inner.test_steps, num_tasks=eval_tasks)
    atomic_write_text(Path(out) / "evaluation.json", json.dumps(evaluation, indent=2))
    print(f"trained {config.algorithm} on {config.experiment} for {config.iterations} iterations in {result.seconds:.1f}s")
    print(format_returns(evaluation))
    print(f"wrote {out}/evaluation.json")
    return 0


def evaluate_command(run: str, steps: int, num_tasks: int | None, seed: int, out: Path | None = None) -> int:
    """``hbmeta evaluate RUN --steps N`` for an RL run: average return after 0..N steps (40 rollouts each)."""
    from hbmeta.evaluation.rl import evaluate_rl_run, format_returns
    from hbmeta.training.rl import load_policy_learner
    from hbmeta.training.runs import write_evaluation

    learner, config, iteration = load_policy_learner(run)
    evaluation = evaluate_rl_run(learner, config, steps, num_tasks=num_tasks, seed=seed)
    print(f"{config.algorithm} on {config.experiment}, checkpoint at iteration {iteration}, "
          f"{evaluation[0]['num_tasks']} new tasks x {evaluation[0]['episodes']} rollouts per step")
    print(format_returns(evaluation))
    out = out if out is not None else (Path(run) if Path(run).is_dir() else Path(run).parent)
    written = write_evaluation(out, evaluation, tasks=evaluation[0]["num_tasks"], steps=steps, seed=seed,
                               checkpoint_iteration=iteration)
    print(f"wrote {written}")
    return 0
