r"""The conv4 body of the few-shot image experiments (GEM-BML appendix C.4.2; Finn et al., 2017 [1]).

Four blocks of ``[3x3 conv (padding 1), batch norm, ReLU, 2x2 max-pool]`` and a linear layer. As in the
reference MAML code [2]:

* **Omniglot** (``strided=True``, ``1 x 28 x 28``, 64 filters): the convolutions have stride 2 and there is
  no max-pool (28 -> 14 -> 7 -> 4 -> 2); the last feature map is averaged over its spatial positions
  (``tf.reduce_mean(hidden4, [1, 2])`` in [2]), so the last hidden layer has 64 units.
* **miniImageNet** (``strided=False``, ``3 x 84 x 84``, 32 filters): stride 1 and a 2x2 max-pool
  (84 -> 42 -> 21 -> 10 -> 5); the last feature map is flattened (``32 * 5 * 5 = 800`` units).

Batch norm keeps **no running statistics** (``track_running_stats=False``, as ``tf_layers.batch_norm`` is
used in [2]): every forward pass normalises with the mean and biased variance of the images it is given —
one task's support set during adaptation, its query set at prediction (transductive, as in MAML). The scale
and shift (gamma, beta) are ordinary weights and so carry the prior like every other weight. The module has
no buffers; its output does not depend on ``train()`` / ``eval()``. The convolution biases are kept (as in
[2]) although the batch norm that follows cancels them: their likelihood gradient is zero, only the prior
acts on them.

:meth:`Conv4.forward_batched` evaluates the net for a stack of flat weight vectors ``theta [B, T, P]`` at once
(:class:`~hbmeta.models.functional.BatchedNet` dispatches to it): the ``B * T`` weight sets are folded into the
channel dimension, so each layer is one grouped convolution (``groups = B * T``) and one ``F.batch_norm``.

[1] C. Finn, P. Abbeel, S. Levine. Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks. ICML 2017.
[2] https://github.com/cbfinn/maml, ``utils.py`` (``conv_block``, ``normalize``) and ``maml.py`` (``forward_conv``).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Conv4"]

_BN_EPS = 1e-5


class Conv4(nn.Module):
    """Four conv blocks and a linear classifier (GEM-BML appendix C.4.2).

    Args:
        in_channels: image channels ``C`` (1 for Omniglot, 3 for miniImageNet).
        num_classes: ways ``K`` of the classification task.
        filters: channels of every conv layer (64 for Omniglot, 32 for miniImageNet).
        strided: stride-2 convolutions and a spatial mean (Omniglot) instead of stride 1, 2x2 max-pool and
            flatten (miniImageNet).
        image_size: height and width of the (square) input images.

    Example:
        >>> net = Conv4.omniglot(5)
        >>> net(torch.zeros(10, 1, 28, 28)).shape
        torch.Size([10, 5])
        >>> theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()]).expand(2, 3, -1)
        >>> net.forward_batched(theta, torch.randn(3, 10, 1, 28, 28)).shape   # 2 samples x 3 tasks
        torch.Size([2, 3, 10, 5])
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 5, filters: int = 64, strided: bool = True,
                 image_size: int = 28):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("num_classes", num_classes), ("filters", filters),
                            ("image_size", image_size)):
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        self.in_channels, self.num_classes, self.filters = in_channels, num_classes, filters
        self.strided, self.image_size = strided, image_size
        stride = 2 if strided else 1
        blocks, channels, size = [], in_channels, image_size
        for _ in range(4):
            block = [nn.Conv2d(channels, filters, 3, stride=stride, padding=1),
                     nn.BatchNorm2d(filters, eps=_BN_EPS, track_running_stats=False), nn.ReLU()]
            size = (size - 1) // 2 + 1 if strided else size
            if not strided:
                block.append(nn.MaxPool2d(2))
                size //= 2
            if size < 1:
                kind = "strided" if strided else "pooled"
                raise ValueError(f"image_size {image_size} is too small for four {kind} blocks")
            blocks.append(nn.Sequential(*block))
            channels = filters
        self.features = nn.Sequential(*blocks)
        self.final_size = size  # spatial size of the last feature map
        self.hidden = filters if strided else filters * size * size
        self.head = nn.Linear(self.hidden, num_classes)
        self._sizes = [p.numel() for p in self.parameters()]

    @classmethod
    def omniglot(cls, ways: int) -> "Conv4":
        """64 filters, stride 2, ``1 x 28 x 28`` images, spatial mean: 64 hidden units."""
        return cls(in_channels=1, num_classes=ways, filters=64, strided=True, image_size=28)

    @classmethod
    def miniimagenet(cls, ways: int) -> "Conv4":
        """32 filters, 2x2 max-pool, ``3 x 84 x 84`` images, flatten: 800 hidden units."""
        return cls(in_channels=3, num_classes=ways, filters=32, strided=False, image_size=84)

    @property
    def num_params(self) -> int:
        return sum(self._sizes)

    def _check_images(self, x: Tensor, leading: tuple[str, ...]) -> None:
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.dim() != len(leading) + 3 or tuple(x.shape[-3:]) != expected:
            raise ValueError(f"Conv4 expects x of shape [{', '.join(leading)}, {', '.join(map(str, expected))}]; "
                             f"got {tuple(x.shape)}")

    def _pool(self, h: Tensor) -> Tensor:
        """``[N, ..., C, H, W]`` -> ``[N, ..., hidden]``: spatial mean (strided) or flatten (pooled)."""
        return h.mean((-2, -1)) if self.strided else h.flatten(-3)

    def forward(self, x: Tensor) -> Tensor:
        """``x [N, C, H, W]`` -> logits ``[N, num_classes]``; batch norm uses the statistics of these ``N`` images."""
        self._check_images(x, ("N",))
        return self.head(self._pool(self.features(x)))

    def forward_batched(self, theta: Tensor, x: Tensor, shared: dict[str, Tensor] | None = None,
                        cache: dict | None = None) -> Tensor:
        """Evaluate the net for many flat weight vectors at once.

        ``theta`` is laid out as ``torch.cat([p.reshape(-1) for p in self.parameters()])`` (the layout of
        :meth:`BatchedNet.unflatten <hbmeta.models.functional.BatchedNet.unflatten>`). The ``G = T * B`` weight sets
        are folded into the channel dim, task-major, so the images of task ``t`` are read once for its ``B``
        weight sets: layer 1 is a convolution with ``groups = T`` (no copy of ``x`` per sample), layers 2-4
        with ``groups = G``. Batch norm of each (weight set, channel) over ``(N, H, W)`` is one ``F.batch_norm``
        over ``G * filters`` channels (biased variance, ``eps = 1e-5``); the max-pool is applied before the
        ReLU (they commute; same values and gradients, less memory traffic). Differentiable (twice) w.r.t.
        ``theta``; nothing is copied per sample but the weights (``theta`` once, task-major).

        Args:
            theta: ``[B, T, P]`` or ``[T, P]`` weights: every parameter not in ``shared``, in
                ``named_parameters`` order.
            x: ``[T, N, C, H, W]`` images of each task.
            shared: parameters common to every weight set (``BatchedNet(net, hide=...)``), by name, with the
                module's shapes. When the whole body (``features``) is shared, the conv blocks run once per task,
                not once per weight set: only the head sees ``B``.
            cache: with a shared body whose tensors are constants (``BatchedNet.shared_constant``), a dict that keeps
                each input's features (keyed by the tensor, which it holds so that the key stays unique) across
                calls, computed without a graph.

        Returns:
            ``[B, T, N, num_classes]`` (or ``[T, N, num_classes]``) logits.
        """
        self._check_images(x, ("T", "N"))
        shared = shared or {}
        layout = [(n, p.numel()) for n, p in self.named_parameters()]
        unknown = set(shared) - {n for n, _ in layout}
        if unknown:
            raise ValueError(f"Conv4.forward_batched: shared names no parameter of Conv4: {sorted(unknown)}")
        free = sum(size for n, size in layout if n not in shared)
        if theta.dim() not in (2, 3) or theta.shape[-2:] != (x.shape[0], free):
            raise ValueError(f"Conv4.forward_batched expects theta [B, T={x.shape[0]}, P={free}] or "
                             f"[T, P] for x {tuple(x.shape)}; got {tuple(theta.shape)}")
        squeeze = theta.dim() == 2
        if squeeze:
            theta = theta.unsqueeze(0)
        num_samples, num_tasks = theta.shape[0], theta.shape[1]
        groups = num_tasks * num_samples
        chunks = iter(torch.split(theta.transpose(0, 1), [size for n, size in layout if n not in shared], dim=-1))
        per_set = [shared[n].reshape(1, 1, -1) if n in shared else next(chunks) for n, _ in layout]  # [T|1, B|1, size]
        body = len(per_set) - 2
        if all(n in shared for n, _ in layout[:body]):  # a shared body: its features once per task
            key = (x.data_ptr(), tuple(x.shape), x.stride(), x._version, x.dtype, x.device)
            if cache is not None and key in cache:
                h = cache[key][1]
            else:
                with torch.no_grad() if cache is not None else contextlib.nullcontext():
                    h = self._body(iter([p.expand(num_tasks, 1, -1) for p in per_set[:body]]), x, 1)  # [T, N, hidden]
                if cache is not None:
                    cache[key] = (x, h)
            h = h.unsqueeze(1).expand(-1, num_samples, -1, -1).reshape(groups, *h.shape[1:])
        else:
            h = self._body(iter([p.expand(num_tasks, num_samples, -1) for p in per_set[:body]]), x, num_samples)
        weight, bias = (p.expand(num_tasks, num_samples, -1) for p in per_set[body:])
        weight = weight.reshape(groups, self.num_classes, self.hidden)
        bias = bias.reshape(groups, 1, self.num_classes)
        logits = torch.baddbmm(bias, h, weight.transpose(-1, -2))  # [G, N, K]
        logits = logits.unflatten(0, (num_tasks, num_samples)).transpose(0, 1)  # [B, T, N, K]
        return logits.squeeze(0) if squeeze else logits

    def _body(self, params, x: Tensor, num_samples: int) -> Tensor:
        """The four conv blocks for ``G = T * B`` weight sets (``params`` yields each block's tensors, task-major):
        features ``[G, N, hidden]``."""
        num_tasks, num_images = x.shape[0], x.shape[1]
        groups = num_tasks * num_samples
        h = x.transpose(0, 1).reshape(num_images, num_tasks * self.in_channels, *x.shape[-2:])  # [N, T*C, H, W]
        conv_groups = num_tasks  # layer 1: the B weight sets of task t share its images
        for block in self.features:
            conv = block[0]
            weight = next(params).reshape(groups * self.filters, *conv.weight.shape[1:])
            bias = next(params).reshape(groups * self.filters)
            h = F.conv2d(h, weight, bias, stride=conv.stride, padding=conv.padding, groups=conv_groups)
            gamma, beta = next(params).reshape(-1), next(params).reshape(-1)
            h = F.batch_norm(h, None, None, gamma, beta, training=True, eps=_BN_EPS)
            if not self.strided:
                h = F.max_pool2d(h, 2)  # before the ReLU: the two commute, and the ReLU runs on 1/4 of the values
            h = F.relu(h)
            conv_groups = groups
        return self._pool(h.unflatten(1, (groups, self.filters))).transpose(0, 1)  # [G, N, hidden]

    def forward_flipout(self, loc: Tensor, delta: Tensor, x: Tensor, draw) -> Tensor:
        r"""Logits ``[B, T, N, K]`` for ``B`` samples of ``q = N(loc, s^2)``, ``delta [B, T, P] = s * eps``, with
        Flipout (Wen et al. 2018) in the classifier head.

        The convolutions share one weight sample ``loc + delta`` per sample and task: batch norm normalises each
        image with statistics of the whole support set, so per-image weight flips there would change every
        image's output distribution (measured: a 1% bias in the expected log-likelihood and no lower variance).
        The head acts on each image alone, so there each image ``n`` gets
        :math:`W_n = \bar W + \Delta W \odot r_n s_n^\top` (signs of ``draw(shape)``), computed as
        :math:`h_n \bar W^\top + r_n \odot ((h_n \odot s_n) \Delta W^\top)`: unbiased, with the images' noise
        in the head decorrelated (:mod:`hbmeta.models.local_reparam`).
        """
        self._check_images(x, ("T", "N"))
        num_samples, num_tasks, num_images = delta.shape[0], x.shape[0], x.shape[1]
        groups = num_tasks * num_samples
        theta = (loc.unsqueeze(0) + delta).transpose(0, 1)                     # [T, B, P]
        params = iter(torch.split(theta, self._sizes, dim=-1))
        h = self._body(params, x, num_samples)                                  # [G, N, hidden]
        head = self._sizes[-2] + self._sizes[-1]
        w_bar, b_bar = torch.split(loc[:, -head:].unsqueeze(1).expand(num_tasks, num_samples, head),
                                   self._sizes[-2:], dim=-1)
        w_delta, b_delta = torch.split(delta[..., -head:].transpose(0, 1), self._sizes[-2:], dim=-1)
        shape = (groups, self.num_classes, self.hidden)
        flip_in = draw(torch.Size((groups, num_images, self.hidden))).sign()
        flip_out = draw(torch.Size((groups, num_images, self.num_classes))).sign()
        logits = torch.baddbmm(b_bar.reshape(groups, 1, -1), h, w_bar.reshape(shape).transpose(-1, -2))
        perturb = torch.baddbmm(b_delta.reshape(groups, 1, -1), h * flip_in, w_delta.reshape(shape).transpose(-1, -2))
        logits = logits + flip_out * perturb
        return logits.unflatten(0, (num_tasks, num_samples)).transpose(0, 1)  # [B, T, N, K]
