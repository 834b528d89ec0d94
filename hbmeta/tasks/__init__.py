"""Task distributions: what a meta-learner is trained and tested on.

Each distribution draws a :class:`hbmeta.inference.TaskBatch` of support and query sets:

- :mod:`hbmeta.tasks.sinusoid`: sinusoid regression (GEM-BML section 5.1);
- :mod:`hbmeta.tasks.multimodal`: sinusoids, lines and quadratics (the mixture prior's testbed);
- :mod:`hbmeta.tasks.fewshot`: N-way K-shot Omniglot / miniImageNet (section 5.2), loaders in :mod:`hbmeta.tasks.data`;
- :mod:`hbmeta.tasks.noisy`: label-flipped support sets and class budgets (ATS appendices C, D);
- :mod:`hbmeta.tasks.drug`: FS-Mol assays (ATS appendix B.1);
- :mod:`hbmeta.tasks.rl`: meta-RL environments and batched rollouts (section 5.3).

This layer knows nothing of run configs, training or evaluation (imports flow cli -> bench -> evaluation ->
training -> experiments -> tasks -> inference -> models).
"""

from hbmeta.tasks.fewshot import FewShotBatch, FewShotTasks, miniimagenet_tasks, omniglot_tasks
from hbmeta.tasks.multimodal import MultimodalBatch, MultimodalTasks
from hbmeta.tasks.noisy import NoisyTasks
from hbmeta.tasks.sinusoid import SinusoidBatch, SinusoidTasks

__all__ = ["SinusoidTasks", "SinusoidBatch", "MultimodalTasks", "MultimodalBatch", "FewShotTasks", "FewShotBatch",
           "omniglot_tasks", "miniimagenet_tasks", "NoisyTasks"]
