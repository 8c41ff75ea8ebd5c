"""Token-choice top-k routing: Switch (K=1), GShard / Mixtral (K=2), OLMoE (K=8), DeepSeek-V3 (sigmoid,
group-limited, auxiliary-loss-free bias).

Papers: Shazeer et al. 2017 (arXiv:1701.06538) for noisy top-k gating; Fedus et al. 2021, Switch
Transformers (arXiv:2101.03961) for K=1, the balancing loss and multiplicative input jitter (section 2.4);
Lepikhin et al. 2020, GShard (arXiv:2006.16668); Jiang et al. 2024, Mixtral (arXiv:2401.04088) for softmax
over the selected K; DeepSeek-AI 2024, DeepSeek-V3 (arXiv:2412.19437, section 2.1.2) for sigmoid scores,
node/group-limited selection, the scaling factor and the bias used for selection only.

Legend: T tokens, D model width, E experts, K experts per token, Q expert groups.
"""
from __future__ import annotations

import warnings

import torch

from .. import balance
from . import register
from .base import Router, Routing, RoutingContext

SCORE_FUNCS = ("softmax", "sigmoid")


def scores_from_logits(logits_TE: torch.Tensor, score_func: str) -> torch.Tensor:
    """softmax or sigmoid of float32 logits."""
    if score_func == "softmax":
        return torch.softmax(logits_TE, dim=-1)
    return torch.sigmoid(logits_TE)


def probs_from_scores(scores_TE: torch.Tensor, score_func: str) -> torch.Tensor:
    """Per-token distribution over experts used by balancing losses (sigmoid scores renormalised)."""
    if score_func == "softmax":
        return scores_TE
    return scores_TE / scores_TE.sum(dim=-1, keepdim=True).clamp(min=1e-20)


def group_limited_mask(choice_TE: torch.Tensor, num_groups: int, topk_groups: int) -> torch.Tensor:
    """Boolean ``[T, E]`` mask of the experts inside each token's ``topk_groups`` best groups.

    A group's score is the sum of its two highest choice scores (DeepSeek-V3), or its maximum when a group
    holds a single expert.
    """
    num_tokens, num_experts = choice_TE.shape
    group_size = num_experts // num_groups
    grouped_TQX = choice_TE.view(num_tokens, num_groups, group_size)
    group_scores_TQ = grouped_TQX.topk(min(2, group_size), dim=-1).values.sum(dim=-1)
    top_groups_TQ = group_scores_TQ.topk(topk_groups, dim=-1).indices
    group_mask_TQ = torch.zeros_like(group_scores_TQ, dtype=torch.bool).scatter_(1, top_groups_TQ, True)
    return group_mask_TQ.unsqueeze(-1).expand(-1, -1, group_size).reshape(num_tokens, num_experts)


@register("topk")
class TopKRouter(Router):
    """Token-choice top-k router with the balancing methods of the literature.

    Options:
        score_func: ``"softmax"`` (default) or ``"sigmoid"``.
        norm_topk: renormalise the K selected weights to sum to one (Mixtral: True, OLMoE: False). With
            ``top_k=1`` this makes every weight 1 (times ``scaling_factor``) and the router gets no gradient
            from the task loss: a ``UserWarning`` at construction.
        scaling_factor: multiply the routing weights (DeepSeek-V3's ``routed_scaling_factor``).
        num_groups, topk_groups: group-limited selection (DeepSeek-V3): keep the ``topk_groups`` best of
            ``num_groups`` equal expert groups, then take the top-k inside them. ``num_groups=1`` disables it.
        jitter: multiplicative uniform noise ``x * U(1-jitter, 1+jitter)`` on the router input in training
            (Switch Transformers, section 2.4; applied by :meth:`Router.logits`); 0 disables it.
        aux_loss: ``"switch"`` (default), ``"sequence"``, ``"global"`` or None; ``aux_loss_coef`` its weight.
        z_loss_coef: weight of the router z-loss (0 disables it).
        bias_update: auxiliary-loss-free bias rule ``"sign"``, ``"proportional"``, ``"decaying"`` or None;
            ``bias_update_rate`` its step ``u``. The bias (buffer ``e_score_correction_bias``, as in DeepSeek-V3
            checkpoints) is added to the scores for selection only and is updated by :meth:`end_step`.

    The router math runs in float32 whatever the input dtype.

    Under data parallelism (``data_group`` set by :mod:`moekit.parallel`) the losses are the global batch's:
    the expert, token and sequence counts are summed over the ranks first and each rank returns its share of
    the global loss (sums over its tokens divided by the global counts; the shares sum to the loss of the whole
    batch, and a rank without tokens contributes zero); the bias moves on the global load. Under your own DDP
    (without :func:`moekit.parallel.expert_parallel`), set ``router.data_group`` to the data-parallel group for
    the same behaviour; otherwise every rank balances on its own tokens.
    """

    global_batch_losses = True

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        *,
        score_func: str = "softmax",
        norm_topk: bool = False,
        scaling_factor: float = 1.0,
        num_groups: int = 1,
        topk_groups: int = 1,
        jitter: float = 0.0,
        aux_loss: str | None = "switch",
        aux_loss_coef: float = 1e-2,
        z_loss_coef: float = 0.0,
        bias_update: str | None = None,
        bias_update_rate: float = 1e-3,
    ):
        super().__init__(dim, num_experts, top_k, jitter=jitter)
        if score_func not in SCORE_FUNCS:
            raise ValueError(f"score_func must be one of {SCORE_FUNCS}, got {score_func!r}")
        if not isinstance(num_groups, int) or num_groups < 1 or num_experts % num_groups:
            raise ValueError(f"num_groups must be a positive divisor of num_experts={num_experts}, got {num_groups!r}")
        if not isinstance(topk_groups, int) or not 1 <= topk_groups <= num_groups:
            raise ValueError(f"topk_groups must be in [1, num_groups={num_groups}], got {topk_groups!r}")
        if num_groups > 1 and topk_groups * (num_experts // num_groups) < top_k:
            raise ValueError(
                f"topk_groups={topk_groups} groups of {num_experts // num_groups} experts hold fewer than top_k={top_k}"
            )
        if aux_loss is not None and aux_loss not in balance.AUX_LOSSES:
            raise ValueError(f"aux_loss must be one of {balance.AUX_LOSSES} or None, got {aux_loss!r}")
        if bias_update is not None and bias_update not in balance.BIAS_RULES:
            raise ValueError(f"bias_update must be one of {balance.BIAS_RULES} or None, got {bias_update!r}")
        for name, value in (("aux_loss_coef", aux_loss_coef), ("z_loss_coef", z_loss_coef),
                            ("bias_update_rate", bias_update_rate)):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        if not scaling_factor > 0:
            raise ValueError(f"scaling_factor must be > 0, got {scaling_factor!r}")
        if top_k == 1 and norm_topk:
            warnings.warn(f"{type(self).__name__}: top_k=1 with norm_topk=True makes every routing weight "
                          f"{scaling_factor:g}, so the task loss sends no gradient to the router (only the "
                          "auxiliary losses train it); use norm_topk=False with top_k=1", UserWarning, stacklevel=2)
        self.score_func = score_func
        self.norm_topk = norm_topk
        self.scaling_factor = float(scaling_factor)
        self.num_groups = num_groups
        self.topk_groups = topk_groups
        self.aux_loss_kind = aux_loss
        self.aux_loss_coef = float(aux_loss_coef)
        self.z_loss_coef = float(z_loss_coef)
        self.bias_update = bias_update
        self.bias_update_rate = float(bias_update_rate)
        if bias_update is not None:
            self.register_buffer("e_score_correction_bias", torch.zeros(num_experts, dtype=torch.float32))
        self.load = balance.LoadAccumulator(num_experts)
        self.batch_tokens = 0  # tokens of the last training batch (the global batch's under data parallelism)
        self._bias_updates = 0

    def has_balancing(self) -> bool:
        return self.aux_loss_kind is not None or self.bias_update is not None

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_experts={self.num_experts}, top_k={self.top_k}, score_func={self.score_func}, "
                f"aux_loss={self.aux_loss_kind}, bias_update={self.bias_update}")

    def forward(self, x_TD: torch.Tensor, ctx: RoutingContext | None = None) -> Routing:
        ctx = ctx if ctx is not None else RoutingContext()
        logits_TE = self.logits(x_TD, ctx)
        scores_TE = self.mix_scores(x_TD, scores_from_logits(logits_TE, self.score_func), ctx)
        return self.select(scores_TE, logits_TE, ctx)

    def mix_scores(self, x_TD: torch.Tensor, scores_TE: torch.Tensor, ctx: RoutingContext) -> torch.Tensor:
        """Hook for subclasses that combine the tokens' scores before selection (graph-of-tokens routing)."""
        return scores_TE

    def select(self, scores_TE: torch.Tensor, logits_TE: torch.Tensor, ctx: RoutingContext) -> Routing:
        """Top-k selection on ``scores_TE`` (plus the selection bias, within the allowed groups), routing weights
        from the scores, balancing losses in training."""
        choice_TE = scores_TE
        if self.bias_update is not None:
            choice_TE = scores_TE.detach() + self.e_score_correction_bias
        if self.num_groups > 1:
            mask_TE = group_limited_mask(choice_TE.detach(), self.num_groups, self.topk_groups)
            choice_TE = choice_TE.masked_fill(~mask_TE, float("-inf"))
        topk_ids_TK = torch.topk(choice_TE.detach(), self.top_k, dim=-1).indices
        topk_weights_TK = scores_TE.gather(1, topk_ids_TK)
        if self.norm_topk:
            topk_weights_TK = topk_weights_TK / (topk_weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        if self.scaling_factor != 1.0:
            topk_weights_TK = topk_weights_TK * self.scaling_factor
        probs_TE = probs_from_scores(scores_TE, self.score_func)
        routing = Routing.from_topk(topk_ids_TK, topk_weights_TK, self.num_experts, logits=logits_TE, probs=probs_TE,
                                    token_mask=ctx.flat_mask(scores_TE.shape[0], scores_TE.device))
        if self.training:
            routing.aux_losses = self._aux_losses(routing, ctx)
        return routing

    def _aux_losses(self, routing: Routing, ctx: RoutingContext | None) -> dict[str, torch.Tensor]:
        """Balancing losses of a training call, over the real tokens only (``routing.token_mask``): padding
        counts neither in the losses nor in the load the global-batch loss and the selection bias use."""
        losses: dict[str, torch.Tensor] = {}
        mask_T = routing.token_mask
        counts_E = routing.real_counts()
        num_rows, seq_len = (ctx or RoutingContext()).sequences(routing.num_tokens)
        num_tokens = routing.num_real_tokens()
        if routing.num_tokens == 0 or seq_len == 0:
            num_sequences = 0
        elif mask_T is None:
            num_sequences = num_rows
        else:
            num_sequences = int(mask_T.reshape(num_rows, seq_len).any(dim=1).sum())
        total_tokens, total_sequences = num_tokens, num_sequences
        if self.data_group is not None:  # global-batch losses: this rank's share of them
            counts_E, total_tokens, total_sequences = balance.global_counts(
                counts_E, num_tokens, num_sequences, self.data_group)
        self.batch_tokens = total_tokens  # for subclasses' own batch means
        track_load = self.bias_update is not None or self.aux_loss_kind == "global"
        seen_E = self.load.update(counts_E) if track_load else None  # once per forward, not per recomputation
        kind = self.aux_loss_kind
        if kind == "switch":
            losses["switch"] = self.aux_loss_coef * balance.switch_loss(routing.probs, counts_E, total_tokens,
                                                                        token_mask=mask_T)
        elif kind == "sequence":
            losses["sequence"] = self.aux_loss_coef * balance.sequence_loss(
                routing.probs, routing.topk_ids, num_rows, total_sequences, token_mask=mask_T)
        elif kind == "global":
            losses["global"] = self.aux_loss_coef * balance.switch_loss(routing.probs, seen_E, total_tokens,
                                                                        token_mask=mask_T)
        if self.z_loss_coef > 0:
            losses["z"] = self.z_loss_coef * balance.z_loss(routing.logits, total_tokens, token_mask=mask_T)
        return losses

    def balancing_state(self) -> dict:
        return {"bias_updates": self._bias_updates}

    def load_balancing_state(self, state: dict) -> None:
        self._bias_updates = int(state.get("bias_updates", 0))

    @torch.no_grad()
    def end_step(self) -> None:
        """After an optimiser step: apply the bias rule to the load seen since the last step, then reset."""
        if self.bias_update is not None and self.load.counts_E.sum() > 0:
            self._bias_updates += 1
            balance.bias_step(self.e_score_correction_bias, self.load.counts_E.to(self.e_score_correction_bias.device),
                              self.bias_update, self.bias_update_rate, self._bias_updates)
        self.load.reset()
