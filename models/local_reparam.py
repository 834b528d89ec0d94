r"""Lower-variance Monte-Carlo forward passes for a mean-field Gaussian over the weights (GEM-BML appendix B.7).

The ELBO's likelihood term :math:`\mathbb{E}_{q} \log p(D \mid \theta)` with :math:`q = N(m, \mathrm{diag}\, s^2)`
is usually estimated by drawing ONE weight vector per sample and task and pushing every data point through it.
The paper estimates it instead by

- the **local reparameterisation trick** (Kingma, Salimans & Welling 2015) for ``nn.Linear`` layers: a layer's
  pre-activation :math:`a = h W^\top + b` is Gaussian given its input ``h``, with mean :math:`h \bar W^\top + \bar b`
  and variance :math:`h^2 (S_W^2)^\top + s_b^2`, so it is sampled directly, independently per data point
  (:func:`mlp_local_forward`);
- **Flipout** (Wen et al. 2018) for convolutions: one perturbation :math:`\Delta W = s \odot \epsilon` per sample,
  decorrelated across data points by random signs, :math:`W_n = \bar W + \Delta W \odot r_n s_n^\top`, computed as
  :math:`\mathrm{conv}(x_n, \bar W) + r_n \odot \mathrm{conv}(x_n \odot s_n, \Delta W)`
  (:meth:`hbmeta.models.conv.Conv4.forward_flipout`).

Both leave every data point's marginal distribution of outputs exactly that of plain reparameterisation (so the
expected log-likelihood, a sum over points, is unbiased) while making the points' noise (nearly) independent,
which lowers the variance of the estimate and of its gradient (``tests/test_local_reparam.py``).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from hbmeta.models.functional import BatchedNet

__all__ = ["mlp_local_forward", "supports_local_noise", "local_forward"]

#: ``draw(shape) -> standard-normal tensor`` (the caller's explicit random stream)
Draw = Callable[[torch.Size], Tensor]


def supports_local_noise(net: BatchedNet) -> bool:
    """Whether :func:`local_forward` has a lower-variance estimator for ``net`` (plain MLP or ``forward_flipout``)."""
    if net.hidden:  # shared parameters outside theta: the generic reparameterised path handles them
        return False
    return net.is_plain_mlp or callable(getattr(net.module, "forward_flipout", None))


def local_forward(net: BatchedNet, loc: Tensor, scale: Tensor, x: Tensor, num_samples: int, draw: Draw) -> Tensor:
    """``[S, T, N, out]`` outputs for ``S`` samples of ``q = N(loc, scale^2)`` (``[T, P]`` each): local
    reparameterisation for a plain MLP, Flipout for a module with ``forward_flipout``."""
    if net.is_plain_mlp:
        return mlp_local_forward(net, loc, scale, x, num_samples, draw)
    if callable(getattr(net.module, "forward_flipout", None)):
        delta = scale * draw(torch.Size((num_samples, *loc.shape)))
        return net.module.forward_flipout(loc, delta, x, draw)
    raise ValueError(f"{type(net.module).__name__} has no local-noise estimator: use InnerConfig(estimator='reparam')")


def mlp_local_forward(net: BatchedNet, loc: Tensor, scale: Tensor, x: Tensor, num_samples: int, draw: Draw) -> Tensor:
    """Local reparameterisation through an ``nn.Sequential`` of ``nn.Linear`` and element-wise activations."""
    locs = iter(torch.split(loc, net.sizes, dim=-1))
    variances = iter(torch.split(scale.pow(2), net.sizes, dim=-1))
    h = x.unsqueeze(0).expand(num_samples, *x.shape)  # [S, T, N, in]
    for layer in net.module:
        if isinstance(layer, nn.Linear):
            shape = (layer.out_features, layer.in_features)
            w_loc, w_var = next(locs).unflatten(-1, shape), next(variances).unflatten(-1, shape)  # [T, out, in]
            mean = torch.matmul(h, w_loc.transpose(-1, -2))
            var = torch.matmul(h.pow(2), w_var.transpose(-1, -2))
            if layer.bias is not None:
                mean = mean + next(locs).unsqueeze(-2)
                var = var + next(variances).unsqueeze(-2)
            h = mean + var.clamp_min(0).sqrt() * draw(mean.shape)
        else:
            h = layer(h)
    return h
