"""Run an ordinary ``nn.Module`` for many flat weight vectors at once.

The hierarchical model puts a distribution over the flattened parameters ``theta`` (length ``P``) of a
user's network. During inference we need ``f(x; theta)`` for a whole stack of weight vectors (tasks x
Monte-Carlo samples) in one call, without rewriting the user's module. :class:`BatchedNet` does this with
:func:`torch.func.functional_call` under :func:`torch.vmap`; the module itself is never modified. Two fast
paths skip vmap: batched matmuls for plain MLPs, and a module's own ``forward_batched(theta [B, T, P],
x [T, N, ...]) -> [B, T, N, ...]`` where it defines one (e.g. :class:`~hbmeta.models.conv.Conv4`, whose grouped
convolutions are much faster than conv2d under vmap).
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

__all__ = ["BatchedNet", "DenseLayer", "mlp"]


def mlp(in_features: int = 1, hidden: tuple[int, ...] = (40, 40), out_features: int = 1) -> nn.Sequential:
    """The 2 x 40 ReLU network of Finn et al. (2017) used for sinusoid regression (GEM-BML section 5.1)."""
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)


#: dropout layers (random in train mode, which the batched forward cannot vmap and the posterior makes redundant)
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_ELEMENTWISE = (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Softplus, nn.Identity)


def _hidden_names(module: nn.Module, hide) -> set[str]:
    """Names of the parameters ``hide`` selects (module types, parameter names, submodule names)."""
    if isinstance(hide, (str, type)):
        hide = (hide,)
    names = {n for n, _ in module.named_parameters()}
    modules = dict(module.named_modules())
    out: set[str] = set()
    for item in hide:
        if isinstance(item, type) and issubclass(item, nn.Module):
            out |= {f"{m}.{n}" if m else n for m, sub in modules.items() if isinstance(sub, item)
                    for n, _ in sub.named_parameters(recurse=False)}
        elif isinstance(item, str) and item in names:
            out.add(item)
        elif isinstance(item, str) and item in modules:
            out |= {n for n in names if n.startswith(item + ".")}
        else:
            raise ValueError(f"hide={item!r} names no parameter, submodule or module type of {type(module).__name__}; "
                             f"its parameters are {', '.join(sorted(names))}")
    return out


def _is_plain_mlp(module: nn.Module) -> bool:
    """True for ``nn.Sequential`` of ``nn.Linear`` and parameter-free element-wise activations."""
    if type(module) is not nn.Sequential:
        return False
    for layer in module:
        if isinstance(layer, nn.Linear):
            continue
        if not isinstance(layer, _ELEMENTWISE) or any(True for _ in layer.parameters()):
            return False
    return True


@dataclass(frozen=True)
class DenseLayer:
    """One ``nn.Linear`` of a plain MLP (:attr:`BatchedNet.dense_layers`): where its weight ``[units, fan_in]`` and
    bias start in ``theta`` (``bias`` is ``None`` without one) and the element-wise activations after it."""

    weight: int
    units: int
    fan_in: int
    bias: int | None
    activations: tuple[nn.Module, ...]

    @property
    def relu(self) -> bool:
        """Whether the activation is exactly one ``nn.ReLU`` (taken in place, its slope is ``pre-activation > 0``)."""
        return len(self.activations) == 1 and type(self.activations[0]) is nn.ReLU

    def weight_of(self, theta: Tensor) -> Tensor:
        """The layer's weight ``[B, units, fan_in]`` in ``theta [B, P]`` (a view)."""
        return theta[:, self.weight:self.weight + self.units * self.fan_in].view(-1, self.units, self.fan_in)

    def affine(self, theta: Tensor, h: Tensor) -> Tensor:
        """``h W^T + b`` for every row of ``theta [B, P]`` and ``h [B, N, fan_in]``: one batched matmul with the bias
        fused (``baddbmm``; an outer product, ``addcmul``, for one input feature)."""
        weight = self.weight_of(theta).transpose(1, 2)
        if self.bias is None:
            return h * weight if self.fan_in == 1 else torch.bmm(h, weight)
        bias = theta[:, self.bias:self.bias + self.units].unsqueeze(1)
        return torch.addcmul(bias, h, weight) if self.fan_in == 1 else torch.baddbmm(bias, h, weight)


def _dense_layers(module: nn.Module) -> tuple[DenseLayer, ...]:
    """The :class:`DenseLayer` s of a plain MLP, in ``named_parameters`` order (weight, then bias)."""
    layers: list[list] = []
    offset = 0
    for layer in module:
        if isinstance(layer, nn.Linear):
            size = layer.out_features * layer.in_features
            layers.append([offset, layer.out_features, layer.in_features,
                           offset + size if layer.bias is not None else None, []])
            offset += size + (layer.out_features if layer.bias is not None else 0)
        elif layers:
            layers[-1][4].append(layer)
        else:  # an activation before the first Linear: no fast path
            return ()
    return tuple(DenseLayer(*spec[:4], tuple(spec[4])) for spec in layers)


class BatchedNet:
    """A functional view of ``module`` whose weights are one flat vector per task.

    Args:
        module: any ``nn.Module`` with parameters and no state that changes in ``forward`` (buffers are
            read as they are). If it has a method ``forward_batched(theta [B, T, P], x [T, N, ...])``
            returning ``[B, T, N, ...]`` (``theta`` in ``named_parameters`` order, as :meth:`unflatten`
            splits it), that method is used instead of vmap; with hidden parameters only if it takes them as
            ``forward_batched(theta, x, shared={name: tensor})`` (as :class:`~hbmeta.models.conv.Conv4` does).
        hide: parameters kept out of ``theta`` and so out of the hierarchical prior (TyXe's
            ``hide_module_types`` / ``hide``): module types (``nn.LayerNorm``, ``nn.BatchNorm2d``: all their
            parameters) and parameter or submodule names (``"head.bias"``, ``"head"``). A hidden parameter is shared
            by every task and meta-learned as a point estimate (GEM-BML(+), by Fisher's identity:
            :func:`hbmeta.inference.gem.shared_gem_gradient`).

    Example:
        >>> net = BatchedNet(mlp())
        >>> theta = net.initial_vector().expand(3, -1)   # 3 tasks
        >>> net(theta, torch.zeros(3, 10, 1)).shape
        torch.Size([3, 10, 1])
    """

    def __init__(self, module: nn.Module, hide: tuple | list = ()):
        self.module = module
        hidden = _hidden_names(module, hide)
        self.hidden = {n: p for n, p in module.named_parameters() if n in hidden}
        self.names = [n for n, _ in module.named_parameters() if n not in hidden]
        if not self.names:
            raise ValueError(f"{type(module).__name__} has no parameters to put a prior on"
                             + (f" (hide={list(hide)} hides all of them)" if hidden else ""))
        dropout = [n or type(m).__name__ for n, m in module.named_modules()
                   if isinstance(m, _DROPOUT) and m.training and m.p > 0]
        if dropout:
            raise ValueError(f"{type(module).__name__} has Dropout in train mode ({', '.join(dropout)}): weights "
                             f"are drawn from the posterior, so dropout's extra noise has no place in the batched "
                             f"forward; call net.eval() before building the learner, or remove the Dropout layers")
        self.shapes = [p.shape for n, p in module.named_parameters() if n not in hidden]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.num_params = sum(self.sizes)
        self.buffers = dict(module.named_buffers())
        self._dense = _dense_layers(module) if _is_plain_mlp(module) and not hidden else ()
        self._fast_mlp = bool(self._dense)
        batched = getattr(module, "forward_batched", None)
        self._shared_batched = callable(batched) and "shared" in inspect.signature(batched).parameters
        self._fast_batched = callable(batched) and (not hidden or self._shared_batched)
        self._caches = self._shared_batched and "cache" in inspect.signature(batched).parameters
        self._cache: dict | None = None

    @property
    def dense_layers(self) -> tuple[DenseLayer, ...]:
        """A plain MLP's layers, where each one's weights lie in ``theta`` (empty for any other module)."""
        return self._dense

    @property
    def is_plain_mlp(self) -> bool:
        """Whether the module is an ``nn.Sequential`` of ``nn.Linear`` and element-wise activations (fast paths)."""
        return self._fast_mlp

    def initial_vector(self) -> Tensor:
        """The module's current parameters as one flat vector ``[P]`` (detached)."""
        return torch.cat([p.detach().reshape(-1) for n, p in self.module.named_parameters() if n not in self.hidden])

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        """Split ``theta [P]`` into a name -> tensor dict with the module's shapes (views, no copies)."""
        chunks = torch.split(theta, self.sizes, dim=-1)
        return {n: c.reshape(s) for n, c, s in zip(self.names, chunks, self.shapes)}

    def _single(self, theta: Tensor, x: Tensor) -> Tensor:
        params = self.unflatten(theta)
        return functional_call(self.module, ({**params, **self.hidden}, self.buffers), (x,))

    def __call__(self, theta: Tensor, x: Tensor) -> Tensor:
        """Evaluate the network.

        Args:
            theta: ``[*sample, T, P]`` weights, one vector per task (and per Monte-Carlo sample).
            x: ``[T, N, *in]`` inputs of each task.

        Returns:
            ``[*sample, T, N, *out]`` outputs.
        """
        if theta.shape[-1] != self.num_params:
            raise ValueError(f"theta has {theta.shape[-1]} weights in its last dim; the network has {self.num_params}")
        if theta.dim() < 2 or theta.shape[-2] != x.shape[0]:
            raise ValueError(f"theta {tuple(theta.shape)} and x {tuple(x.shape)} disagree on the number of tasks")
        sample_shape = theta.shape[:-2]
        flat = theta.reshape(-1, *theta.shape[-2:])  # [S, T, P]
        if self._fast_batched:
            if not self.hidden:
                out = self.module.forward_batched(flat, x)
            elif self._cache is not None:  # inside shared_constant(): hidden parameters are constants
                out = self.module.forward_batched(flat, x, shared={n: p.detach() for n, p in self.hidden.items()},
                                                  cache=self._cache)
            else:
                out = self.module.forward_batched(flat, x, shared=self.hidden)
            return out.reshape(*sample_shape, *out.shape[1:])
        if self._fast_mlp:
            return self._mlp_forward(theta, x)
        per_task = torch.vmap(self._single, in_dims=(0, 0))
        out = torch.vmap(per_task, in_dims=(0, None))(flat, x)
        return out.reshape(*sample_shape, *out.shape[1:])

    @contextlib.contextmanager
    def shared_constant(self) -> Iterator[None]:
        """Within this block the hidden parameters are constants (no gradient reaches them) and the module may reuse
        work that depends on them and the input alone: an inner loop that calls the net many times on the same
        images computes a shared body's features once (``Conv4.forward_batched(..., cache=)``). A no-op without
        hidden parameters or such a module; not re-entrant (an inner block shares the outer one's cache)."""
        if not self._caches or self._cache is not None:
            yield
            return
        self._cache = {}
        try:
            yield
        finally:
            self._cache = None

    def _mlp_forward(self, theta: Tensor, x: Tensor) -> Tensor:
        """Fast path for ``nn.Sequential`` of ``nn.Linear`` and element-wise activations: one batched matmul per layer
        (:meth:`DenseLayer.affine`) over every (sample, task) weight vector at once."""
        if x.dim() != 3:  # [T, N, ..., in]: broadcasting matmuls
            return self._mlp_forward_broadcast(theta, x)
        sample_shape, num_points = theta.shape[:-2], x.shape[1]
        flat = theta.reshape(-1, theta.shape[-1])                     # [S T, P]
        rows = flat.shape[0]
        h = x.expand(*sample_shape, *x.shape).reshape(rows, num_points, -1)
        for layer in self._dense:
            h = layer.affine(flat, h)
            if layer.relu:
                h = h.relu_()
            else:
                for activation in layer.activations:
                    h = activation(h)
        return h.reshape(*sample_shape, x.shape[0], num_points, -1)

    def _mlp_forward_broadcast(self, theta: Tensor, x: Tensor) -> Tensor:
        params = iter(torch.split(theta, self.sizes, dim=-1))
        h = x
        for layer in self.module:
            if isinstance(layer, nn.Linear):
                weight = next(params).unflatten(-1, (layer.out_features, layer.in_features))
                h = torch.matmul(h, weight.transpose(-1, -2))
                if layer.bias is not None:
                    h = h + next(params).unsqueeze(-2)
            else:
                h = layer(h)
        return h

    def to(self, device: torch.device | str) -> "BatchedNet":
        self.module.to(device)
        self.buffers = dict(self.module.named_buffers())
        self.hidden = {n: p for n, p in self.module.named_parameters() if n in self.hidden}
        return self
