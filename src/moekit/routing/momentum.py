"""MomentumSMoE and AdamSMoE: heavy-ball and Adam momentum on the residual stream across MoE layers.

Paper: Rachel S.Y. Teo, Tan M. Nguyen, "MomentumSMoE: Integrating Momentum into Sparse Mixture of Experts",
NeurIPS 2024, arXiv:2410.14574; authors' code github.com/rachtsy/MomentumSMoE (``models.py``,
``CustomizedMoEPositionwiseFFMoM`` and ``CustomizedMoEPositionwiseFFAdam``).

The paper reads a stack of SMoE layers ``x_{l+1} = x_l + f(x_l)`` as gradient descent on a multi-objective
problem whose negative gradient is the MoE output ``f``, and replaces the descent step by heavy-ball momentum.
In moekit's convention (``f_l`` the MoE output of layer ``l``, used as the update direction)::

    p_l     = mu * p_{l-1} + gamma * f_l,        p_0 = 0
    x_{l+1} = x_l + p_l

so ``mu = 0, gamma = 1`` is the plain residual ``x_{l+1} = x_l + f_l``. What was checked: the authors' code
computes ``moment = mu * moment + gamma2 * core_out`` and ``output = inp - moment`` with ``core_out`` the MoE
output, i.e. the same recursion with the MoE output's sign flipped (``f = -core_out``); the experts' last
linear map absorbs that sign, so both are the same family of models, and only this convention makes
``mu = 0, gamma = 1`` the ordinary residual block. Defaults ``mu = 0.7, gamma = 1.0`` are those of the authors'
``TransformerSeqLayer``.

AdamSMoE, in the same convention and as in the authors' code (no bias correction, ``eps`` inside the root)::

    m_l     = beta1 * m_{l-1} + (1 - beta1) * f_l
    v_l     = beta2 * v_{l-1} + (1 - beta2) * f_l * f_l          (element-wise)
    x_{l+1} = x_l + adam_gamma * m_l / sqrt(v_l + eps)

The authors' code applies the Adam step only in the first MoE layer (``layerth < 1``) and heavy-ball momentum
in every later one, the heavy-ball buffer being accumulated from the first layer on; ``adam_layers`` (default 1)
reproduces that, ``adam_layers=None`` uses the Adam step in every MoE layer. Not reproduced from that code: its
post-norm blocks add the residual twice (``norm(h + (h - moment))``); moekit's blocks are pre-norm and add it
once. The paper's own equations could not be read here beyond the abstract, so equation numbers are not cited.

How the model uses these routers: routing is plain token-choice top-k (every :class:`TopKRouter` option works).
The router carries :meth:`MomentumRouter.residual_update` (and ``updates_residual = True``);
:class:`moekit.model.layers.DecoderLayer` calls it with the MoE output and the layer's
:class:`~moekit.routing.base.RoutingContext` and adds what it returns to the residual stream instead of the MoE
output. The momentum lives in ``ctx.momentum`` (a :class:`~moekit.routing.base.MomentumState` the model creates
for one forward call and shares between its layers), never on the module, so every call starts from ``p_0 = 0``.
The recursion runs along the depth of the network for each token separately, so incremental decoding with a KV
cache gives the same result as a full forward. Used on its own (``moekit.MoE`` outside the decoder) the layer is
a plain top-k MoE.

Legend: B batch, L sequence length, D model width.
"""
from __future__ import annotations

import math

import torch

from . import register
from .base import MomentumState, RoutingContext
from .topk import TopKRouter


def _check_state(name: str, state: torch.Tensor | None, f: torch.Tensor) -> None:
    if state is not None and state.shape != f.shape:
        raise ValueError(f"momentum state {name!r} in RoutingContext.momentum has shape {tuple(state.shape)}, but "
                         f"the MoE output has shape {tuple(f.shape)}: one MomentumState must serve one forward call")


@register("momentum")
class MomentumRouter(TopKRouter):
    """MomentumSMoE (Teo & Nguyen, NeurIPS 2024, arXiv:2410.14574): top-k routing plus heavy-ball momentum
    on the residual stream across MoE layers, ``p_l = mu p_{l-1} + gamma f_l``, ``x_{l+1} = x_l + p_l``.

    Options: ``mu`` (momentum, in ``[0, 1)``, default 0.7), ``gamma`` (step, > 0, default 1.0), and every
    :class:`~moekit.routing.topk.TopKRouter` option. See the module docstring for the verified update rule.
    """

    updates_residual = True

    def __init__(self, dim: int, num_experts: int, top_k: int, *, mu: float = 0.7, gamma: float = 1.0,
                 **topk_options):
        super().__init__(dim, num_experts, top_k, **topk_options)
        if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not 0.0 <= mu < 1.0:
            raise ValueError(f"mu must be a number in [0, 1), got {mu!r}")
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 < gamma < math.inf:
            raise ValueError(f"gamma must be a finite number > 0, got {gamma!r}")
        self.mu = float(mu)
        self.gamma = float(gamma)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mu={self.mu}, gamma={self.gamma}"

    def _heavy_ball(self, f: torch.Tensor, state: MomentumState) -> torch.Tensor:
        p_prev = state.p
        _check_state("p", p_prev, f)
        p = self.gamma * f if p_prev is None else self.mu * p_prev + self.gamma * f
        state.p = p
        return p

    def residual_update(self, f: torch.Tensor, ctx: RoutingContext) -> torch.Tensor:
        """What the decoder adds to the residual stream for MoE output ``f`` (``[..., D]``): the new momentum
        ``p_l``, kept in ``ctx.momentum`` for the next MoE layer of the same forward call."""
        return self._heavy_ball(f, ctx.momentum)


@register("adam")
class AdamRouter(MomentumRouter):
    """AdamSMoE (Teo & Nguyen, NeurIPS 2024, arXiv:2410.14574): top-k routing plus an Adam step on the
    residual stream, ``x_{l+1} = x_l + adam_gamma m_l / sqrt(v_l + eps)`` with first/second moments ``m, v``
    of the MoE outputs accumulated across layers; heavy-ball momentum after the first ``adam_layers`` MoE
    layers, as in the authors' code.

    Options: ``beta1`` (0.9), ``beta2`` (0.999), ``eps`` (1e-8), ``adam_gamma`` (1.0), ``adam_layers``
    (1; None = every MoE layer), the heavy-ball ``mu``/``gamma`` of :class:`MomentumRouter`, and every
    :class:`~moekit.routing.topk.TopKRouter` option. The moments are kept in float32.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int, *, beta1: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-8, adam_gamma: float = 1.0, adam_layers: int | None = 1, **options):
        super().__init__(dim, num_experts, top_k, **options)
        for name, value in (("beta1", beta1), ("beta2", beta2)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
        for name, value in (("eps", eps), ("adam_gamma", adam_gamma)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < math.inf:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if adam_layers is not None and (isinstance(adam_layers, bool) or not isinstance(adam_layers, int)
                                        or adam_layers < 0):
            raise ValueError(f"adam_layers must be an integer >= 0 or None (every MoE layer), got {adam_layers!r}")
        self.beta1 = float(beta1)
        self.beta2 = float(beta2)
        self.eps = float(eps)
        self.adam_gamma = float(adam_gamma)
        self.adam_layers = adam_layers

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, beta1={self.beta1}, beta2={self.beta2}, adam_gamma={self.adam_gamma}, "
                f"adam_layers={self.adam_layers}")

    def residual_update(self, f: torch.Tensor, ctx: RoutingContext) -> torch.Tensor:
        """The Adam step ``adam_gamma m / sqrt(v + eps)`` in the first ``adam_layers`` MoE layers of the call,
        the heavy-ball momentum afterwards (accumulated from the first layer on)."""
        state = ctx.momentum
        index = state.adam_layers_seen
        state.adam_layers_seen = index + 1
        p = self._heavy_ball(f, state)
        if self.adam_layers is not None and index >= self.adam_layers:
            return p
        f32 = f.float()
        if state.m is None:
            m = (1.0 - self.beta1) * f32
            v = (1.0 - self.beta2) * f32 * f32
        else:
            _check_state("m", state.m, f)
            m = self.beta1 * state.m + (1.0 - self.beta1) * f32
            v = self.beta2 * state.v + (1.0 - self.beta2) * f32 * f32
        state.m, state.v = m, v
        return (self.adam_gamma * m / torch.sqrt(v + self.eps)).to(f.dtype)
