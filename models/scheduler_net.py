r"""The neural task scheduler :math:`\phi` of ATS (Yao et al. 2021, appendix B.2, Figure 1).

For a pool of :math:`N^{pool}` candidate tasks it maps per-task features (the query loss after adaptation
and the support/query gradient similarity, :math:`f_i \in \mathbb{R}^F`) and the fraction of training done
:math:`p \in [0, 1]` to sampling probabilities

.. math::
    h_i = \mathrm{BiLSTM}(f_1..f_N)_i \in \mathbb{R}^{20}, \quad e = \mathrm{FC}_5(p), \quad
    s_i = \mathrm{fusion}([h_i, e, f_i]), \quad w_i = \frac{\exp(s_i / T)}{\sum_j \exp(s_j / T)} ,

with one fully connected layer of 5 units on the progress, a bidirectional LSTM with 10 hidden units per
direction run over the pool (so each task's score sees the rest of the pool), a fusion layer and a softmax
with temperature ``T`` (0.1 in the paper's noisy setting, 1 with limited budgets). The fusion layer also
sees the task's own features ``f_i`` (a skip connection the paper does not state): on the synthetic
half-noise pool of the tests REINFORCE then learns the clean/noisy preference in far fewer iterations.

Example:
    >>> import torch
    >>> net = SchedulerNet(num_features=3)
    >>> w = net(torch.randn(10, 3), progress=0.5, temperature=0.1)
    >>> w.shape, round(float(w.sum().detach()), 5)
    (torch.Size([10]), 1.0)

References:
    [1] Yao, H., Wang, Y., Wei, Y., Zhao, P., Mahdavi, M., Lian, D. & Finn, C. Meta-learning with an
        Adaptive Task Scheduler. NeurIPS 2021 (appendix B.2).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["SchedulerNet"]


class SchedulerNet(nn.Module):
    """ATS's scheduler network: FC(5) on progress, BiLSTM(10) on task features, fusion, tempered softmax.

    Args:
        num_features: features per candidate task ``F``.
        progress_hidden: width of the progress embedding (5 in the paper).
        lstm_hidden: LSTM units per direction (10 in the paper).
        fusion_hidden: width of the fusion layer before the scalar score.
    """

    def __init__(self, num_features: int = 3, progress_hidden: int = 5, lstm_hidden: int = 10,
                 fusion_hidden: int = 16):
        super().__init__()
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1; got {num_features}")
        self.num_features = num_features
        self.progress = nn.Linear(1, progress_hidden)
        self.lstm = nn.LSTM(num_features, lstm_hidden, batch_first=True, bidirectional=True)
        self.fusion = nn.Sequential(nn.Linear(2 * lstm_hidden + progress_hidden + num_features, fusion_hidden), nn.Tanh(),
                                    nn.Linear(fusion_hidden, 1))

    def scores(self, features: Tensor, progress: float) -> Tensor:
        """Unnormalised scores ``s [N]`` for ``features [N, F]`` at training progress ``progress``."""
        if features.dim() != 2 or features.shape[1] != self.num_features or features.shape[0] < 1:
            raise ValueError(f"features must be [pool, {self.num_features}]; got {tuple(features.shape)}")
        if not torch.isfinite(features).all():
            raise ValueError("scheduler features contain NaN or inf")
        ref = self.progress.weight
        h, _ = self.lstm(features.to(ref).unsqueeze(0))  # [1, N, 2H]
        e = torch.tanh(self.progress(torch.tensor([[float(progress)]], dtype=ref.dtype, device=ref.device)))
        fused = torch.cat([h.squeeze(0), e.expand(features.shape[0], -1), features.to(ref)], dim=-1)
        return self.fusion(fused).squeeze(-1)

    def forward(self, features: Tensor, progress: float, temperature: float = 1.0) -> Tensor:
        """Sampling probabilities ``w [N]`` over the pool (softmax of the scores divided by ``temperature``)."""
        if not temperature > 0:
            raise ValueError(f"temperature must be positive; got {temperature}")
        return torch.softmax(self.scores(features, progress) / temperature, dim=0)
