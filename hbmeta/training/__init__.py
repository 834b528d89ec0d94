"""Meta-training: the loop (Algorithm 1, Meta-train), run folders and checkpoints, task schedulers, torchrun,
mixed precision and meta-RL training.

- :mod:`hbmeta.training.loop`: :func:`train` (progress, logging, checkpoints, bit-exact resume);
- :mod:`hbmeta.training.runs`: the run folder: atomic checkpoints, resume, :func:`load_learner`;
- :mod:`hbmeta.training.schedulers`, :mod:`hbmeta.training.scheduled`: task schedulers (ATS) inside a run;
- :mod:`hbmeta.training.distributed`: tasks split over torchrun ranks;
- :mod:`hbmeta.training.runtime`: device, CPU threads, bf16 autocast;
- :mod:`hbmeta.training.rl`: the meta-RL loop.
"""

from hbmeta.training.loop import train
from hbmeta.training.runs import (CheckpointError, TrainResult, atomic_write_text, build_learner, iteration_generators,
                                  load_checkpoint, load_learner, save_checkpoint)
from hbmeta.training.runtime import keep_freed_memory, resolve_device, torch_threads

__all__ = ["train", "TrainResult", "iteration_generators", "build_learner", "load_learner", "save_checkpoint",
           "load_checkpoint", "atomic_write_text", "CheckpointError", "resolve_device", "torch_threads",
           "keep_freed_memory"]
