"""Router-only fine-tuning and the RoMA regulariser.

RoMA: Li, Li, Zhou 2025, "Routing Manifold Alignment Improves Generalization of Mixture-of-Experts LLMs"
(arXiv:2511.07419). Only the routers are fine-tuned, with

    L = L_task + lambda * sum_i sum_{j in kNN(i)} W_ij ||r_i - r_j||^2

where ``r_i`` is sample ``i``'s routing-weight vector and the neighbours ``j`` of ``i`` are taken, in a
task-embedding space, among the samples the model handles well ("successful" neighbours), so that samples
of similar tasks are pulled towards the same experts in every layer.

moekit's concrete choices (the paper uses an external embedding model and answer correctness; a byte-level
LM has neither, so these are stand-ins, all arguments):

- ``r_i`` (:func:`routing_vectors`): per MoE layer, the mean over the sample's real tokens of the routing
  probabilities ``probs_TE``; the layers' vectors concatenated;
- task embedding (:func:`task_embeddings`): the mean over real tokens of the model's final (normed) hidden
  states, computed without gradient;
- successful samples (:func:`roma_loss`): those whose next-token loss is at most the batch median, unless
  ``candidates`` is given;
- neighbours: the ``k`` candidates of highest cosine similarity to ``i`` (``i`` itself excluded);
- ``W_ij``: ``weight="cosine"`` uses the cosine similarity clamped at 0; ``weight="heat"`` uses the heat
  kernel ``exp(-||u_i - u_j||^2 / tau)`` of the unit-normalised embeddings ``u``. ``W`` is a constant (no
  gradient). The sum is not normalised, as in the formula (``reduction="mean"`` divides by the number of
  neighbour pairs).

Legend: N samples, L length, E experts, R routing-vector size (sum of E over layers), H embedding size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data.tokenizer import PAD_ID
from ..layer import moe_layers

__all__ = ["router_parameters", "routing_vectors", "task_embeddings", "neighbour_weights", "roma_term",
           "roma_loss"]


def router_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of every MoE layer's router (``gate.weight``, ``gate.bias`` where present),
    in model order: hand them to an optimiser for router-only fine-tuning."""
    params, seen = [], set()
    for layer in moe_layers(model):
        for p in layer.gate.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    if not params:
        raise ValueError(f"router_parameters: {type(model).__name__} has no router with trainable parameters")
    return params


def _real_mask(ids_NL: torch.Tensor) -> torch.Tensor:
    return (ids_NL != PAD_ID)


def _masked_mean(x_NLX: torch.Tensor, mask_NL: torch.Tensor) -> torch.Tensor:
    m_NL1 = mask_NL[..., None].to(x_NLX.dtype)
    return (x_NLX * m_NL1).sum(1) / m_NL1.sum(1).clamp_min(1.0)


def routing_vectors(model: nn.Module, ids_NL: torch.Tensor | None = None,
                    mask_NL: torch.Tensor | None = None) -> torch.Tensor:
    """``r_NR``: per MoE layer the mean routing probabilities over each sample's real tokens, concatenated.

    With ``ids_NL`` the model is run on it first (with gradient, so the result trains the routers); without,
    the layers' last call is read (``mask_NL`` then gives the real tokens, default all)."""
    if ids_NL is not None:
        mask_NL = _real_mask(ids_NL)
        model(ids_NL, attention_mask=None if bool(mask_NL.all()) else mask_NL)
    parts = []
    for i, layer in enumerate(moe_layers(model)):
        routing = layer.last_routing
        if routing is None or routing.probs is None:
            raise ValueError(f"routing_vectors: MoE layer {i} ({type(layer.gate).__name__}) has no routing "
                             "probabilities")
        probs_TE = routing.probs
        if mask_NL is None:
            raise ValueError("routing_vectors: pass ids_NL or mask_NL")
        N, L = mask_NL.shape
        parts.append(_masked_mean(probs_TE.reshape(N, L, -1).float(), mask_NL))
    return torch.cat(parts, dim=-1)


@torch.no_grad()
def task_embeddings(model: nn.Module, ids_NL: torch.Tensor) -> torch.Tensor:
    """``e_NH``: the mean of the model's final hidden states over each sample's real tokens (no gradient)."""
    mask_NL = _real_mask(ids_NL)
    hidden_NLH = model.model(ids_NL, None, 0, None if bool(mask_NL.all()) else mask_NL)
    return _masked_mean(hidden_NLH.float(), mask_NL)


def neighbour_weights(emb_NH: torch.Tensor, k: int, *, weight: str = "cosine", tau: float = 1.0,
                      candidates: torch.Tensor | None = None) -> torch.Tensor:
    """``W_NN``: row ``i`` holds the weights of ``i``'s ``k`` nearest candidates by cosine similarity (fewer
    when fewer candidates exist), zero elsewhere and on the diagonal."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"roma: k must be an integer >= 1, got {k!r}")
    if weight not in ("cosine", "heat"):
        raise ValueError(f"roma: weight must be 'cosine' or 'heat', got {weight!r}")
    if not tau > 0:
        raise ValueError(f"roma: tau must be > 0, got {tau!r}")
    unit_NH = F.normalize(emb_NH.detach().float(), dim=-1)
    sim_NN = unit_NH @ unit_NH.T
    N = sim_NN.shape[0]
    allowed_NN = ~torch.eye(N, dtype=torch.bool, device=sim_NN.device)
    if candidates is not None:
        allowed_NN &= candidates.to(sim_NN.device, torch.bool)[None, :]
    kk = min(k, N - 1)
    W_NN = torch.zeros_like(sim_NN)
    if kk < 1:
        return W_NN
    ranked_NN = sim_NN.masked_fill(~allowed_NN, float("-inf"))
    top_NK = ranked_NN.topk(kk, dim=-1).indices
    picked_NK = allowed_NN.gather(1, top_NK)  # fewer than k candidates: drop the filler picks
    if weight == "cosine":
        w_NK = sim_NN.gather(1, top_NK).clamp_min(0.0)
    else:
        w_NK = torch.exp(-(2.0 - 2.0 * sim_NN.gather(1, top_NK)).clamp_min(0.0) / tau)
    W_NN.scatter_(1, top_NK, torch.where(picked_NK, w_NK, torch.zeros_like(w_NK)))
    return W_NN


def roma_term(r_NR: torch.Tensor, emb_NH: torch.Tensor, k: int = 3, *, weight: str = "cosine",
              tau: float = 1.0, candidates: torch.Tensor | None = None, reduction: str = "sum") -> torch.Tensor:
    """``sum_i sum_{j in kNN(i)} W_ij ||r_i - r_j||^2`` (see the module docstring for kNN and W)."""
    if r_NR.dim() != 2 or emb_NH.dim() != 2 or r_NR.shape[0] != emb_NH.shape[0]:
        raise ValueError(f"roma_term: r [N, R] and embeddings [N, H] with the same N, got {tuple(r_NR.shape)} "
                         f"and {tuple(emb_NH.shape)}")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"roma_term: reduction must be 'sum' or 'mean', got {reduction!r}")
    W_NN = neighbour_weights(emb_NH, k, weight=weight, tau=tau, candidates=candidates).to(r_NR.dtype)
    dist_NN = (r_NR[:, None, :] - r_NR[None, :, :]).pow(2).sum(-1)
    total = (W_NN * dist_NN).sum()
    if reduction == "mean":
        total = total / (W_NN > 0).sum().clamp_min(1)
    return total


def roma_loss(model: nn.Module, ids_NL: torch.Tensor, lam: float, k: int = 3, *, weight: str = "cosine",
              tau: float = 1.0, candidates: torch.Tensor | None = None,
              embeddings: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """``(loss, parts)``: mean next-token loss of ``model`` on ``ids_NL`` plus ``lam`` times the RoMA term of
    the batch's samples, from one forward pass. ``candidates`` defaults to the samples whose loss is at most
    the batch median; ``embeddings`` to :func:`task_embeddings`."""
    inputs_NL, targets_NL = ids_NL[:, :-1], ids_NL[:, 1:].clone()
    mask_NL = _real_mask(inputs_NL)
    logits_NLV = model(inputs_NL, attention_mask=None if bool(mask_NL.all()) else mask_NL)
    r_NR = routing_vectors(model, mask_NL=mask_NL)
    targets_NL[targets_NL == PAD_ID] = -100
    nats_NL = F.cross_entropy(logits_NLV.float().transpose(1, 2), targets_NL, ignore_index=-100, reduction="none")
    real_NL = targets_NL != -100
    per_sample_N = (nats_NL * real_NL).sum(1) / real_NL.sum(1).clamp_min(1)
    task = (nats_NL * real_NL).sum() / real_NL.sum().clamp_min(1)
    if candidates is None:
        candidates = per_sample_N.detach() <= per_sample_N.detach().median()
    if embeddings is None:
        embeddings = task_embeddings(model, inputs_NL)
    reg = roma_term(r_NR, embeddings, k, weight=weight, tau=tau, candidates=candidates)
    loss = task + lam * reg
    return loss, {"task": float(task.detach()), "roma": float(reg.detach())}
