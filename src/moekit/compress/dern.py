"""DERN: drop experts by router statistics, then recombine the dropped experts' neurons into the kept ones.

Paper: Zhou et al. 2025, "Dropping Experts, Recombining Neurons: Retraining-Free Pruning for Sparse
Mixture-of-Experts LLMs" (EMNLP 2025 Findings, arXiv:2509.10377). Its three steps, as built here:

1. **Drop by router statistics.** Each expert's score is the sum over the calibration tokens of the routing
   weight it receives (``LayerCalibration.weight_sum_E``: frequency x mean gate weight); the ``n`` highest are
   kept, per layer (or under a global budget, :func:`moekit.compress.prune.keep_sets`).
2. **Split dropped experts into neuron segments and assign each to its most compatible kept expert.** A
   segment of expert ``e`` is its hidden neuron ``j``: the gate row ``gate_up_proj[e, j]``, the up row
   ``gate_up_proj[e, F + j]`` (gated activations; ``up_proj[e, j]`` otherwise) and the down column
   ``down_proj[e, :, j]``, concatenated into one vector. A segment's compatibility with a kept expert is the
   largest cosine similarity between it and any of that expert's own segments; the segment goes to the kept
   expert with the highest compatibility (and within it to the neuron that attains it), and is discarded when
   that similarity is below ``alpha`` (the paper's similarity threshold; it reports moderate thresholds,
   about 0.4, working best; default here 0.4).
3. **Merge segments within each kept expert.** The kept expert keeps its width ``F``: every one of its neurons
   becomes the weighted average of itself and the segments assigned to it, the weights being the experts'
   router scores of step 1. This is one assignment step of k-means on the expert's segments, seeded at the
   expert's own neurons; the paper clusters the segments inside each kept expert into ``F`` groups and merges
   each group, which this reproduces when the clustering starts from the expert's own neurons and does not
   iterate (what was not taken: further k-means iterations, which can move a kept neuron away from its own
   weights).

The result has the kept experts only (router rows sliced as in pruning, ``num_experts`` rewritten) with the
same shapes per expert: a pruned model whose kept experts absorbed compatible neurons of the dropped ones.
Only dense experts (``DenseExperts``: ``gate_up_proj`` / ``up_proj`` and ``down_proj``) are supported.

Legend: E experts, F expert hidden width, D model width, S segments, P segment length (3D gated, 2D ungated).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .calibrate import CalibrationStats
from .prune import moe_layer_map, prune_model

__all__ = ["DERN_ALPHA", "DernLayerResult", "assign_segments", "dern_layer", "dern_model", "segments"]

DERN_ALPHA = 0.4


def segments(w_up_EHD: torch.Tensor, w_down_EDF: torch.Tensor, gated: bool) -> torch.Tensor:
    """Neuron segments ``[E, F, P]``: for each expert and hidden neuron ``j``, the gate row, the up row (gated)
    and the down column concatenated (float64)."""
    E, D, F = w_down_EDF.shape
    parts = [w_up_EHD[:, :F, :]] + ([w_up_EHD[:, F:, :]] if gated else []) + [w_down_EDF.transpose(1, 2)]
    return torch.cat([p.double() for p in parts], dim=-1)


def assign_segments(seg_SP: torch.Tensor, kept_KFP: torch.Tensor, alpha: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every segment ``seg_SP[s]``: ``(kept expert index in [0, K) or -1, neuron index or -1, similarity)``.

    The similarity to kept expert ``k`` is ``max_j cos(seg_s, kept_KFP[k, j])``; the segment goes to the ``k``
    with the largest one (ties: lowest ``k``, then lowest ``j``) unless that similarity is below ``alpha``."""
    def unit(t):
        return t / t.norm(dim=-1, keepdim=True).clamp(min=1e-30)

    K, F, P = kept_KFP.shape
    sim_SKF = torch.einsum("sp,kfp->skf", unit(seg_SP.double()), unit(kept_KFP.double()))
    flat = sim_SKF.reshape(seg_SP.shape[0], K * F)
    best, idx = flat.max(dim=1)  # first maximum: lowest k, then lowest j
    k = torch.div(idx, F, rounding_mode="floor")
    j = idx % F
    drop = best < alpha
    k[drop] = -1
    j[drop] = -1
    return k, j, best


@dataclass
class DernLayerResult:
    """One layer's recombination: new weights of the kept experts and what went where."""

    w_up_KHD: torch.Tensor
    w_down_KDF: torch.Tensor
    kept: list[int]
    assigned: int        # segments merged into kept experts
    discarded: int       # segments below alpha


@torch.no_grad()
def dern_layer(w_up_EHD: torch.Tensor, w_down_EDF: torch.Tensor, gated: bool, scores_E: torch.Tensor,
               kept: list[int], alpha: float = DERN_ALPHA) -> DernLayerResult:
    """DERN steps 2 and 3 on one layer's stacked weights; ``kept`` the experts kept (step 1), ``scores_E`` the
    router scores used as merge weights (a kept neuron and each segment merged into it, weighted by their
    experts' scores; uniform when they are all zero)."""
    E, D, F = w_down_EDF.shape
    kept = sorted(kept)
    dropped = [e for e in range(E) if e not in set(kept)]
    seg_EFP = segments(w_up_EHD, w_down_EDF, gated)
    kept_KFP = seg_EFP[kept]
    w = scores_E.double().clamp(min=0)
    if float(w.sum()) <= 0:
        w = torch.ones_like(w)
    acc_KFP = kept_KFP * w[kept].view(-1, 1, 1)
    mass_KF = w[kept].view(-1, 1).expand(-1, F).clone()
    assigned = discarded = 0
    if dropped:
        seg_SP = seg_EFP[dropped].reshape(-1, seg_EFP.shape[-1])
        src_S = torch.tensor(dropped).repeat_interleave(F)
        k, j, _ = assign_segments(seg_SP, kept_KFP, alpha)
        ok = k >= 0
        assigned, discarded = int(ok.sum()), int((~ok).sum())
        ws = w[src_S[ok]]
        acc_KFP.index_put_((k[ok], j[ok]), seg_SP[ok] * ws.unsqueeze(-1), accumulate=True)
        mass_KF.index_put_((k[ok], j[ok]), ws, accumulate=True)
    merged_KFP = torch.where(mass_KF.unsqueeze(-1) > 0, acc_KFP / mass_KF.clamp(min=1e-300).unsqueeze(-1), kept_KFP)
    gate_KFD = merged_KFP[..., :D]
    parts = [gate_KFD] + ([merged_KFP[..., D:2 * D]] if gated else [])
    w_up = torch.cat(parts, dim=1).to(w_up_EHD.dtype)
    w_down = merged_KFP[..., -D:].transpose(1, 2).contiguous().to(w_down_EDF.dtype)
    return DernLayerResult(w_up, w_down, kept, assigned, discarded)


def dern_scores(stats: CalibrationStats) -> dict[int, torch.Tensor]:
    """Step 1's router scores per layer: summed routing weights."""
    return {s.layer_index: s.weight_sum_E.clone() for s in stats.layers}


@torch.no_grad()
def dern_model(model: torch.nn.Module, stats: CalibrationStats, keep: dict[int, list[int]], *,
               alpha: float = DERN_ALPHA, clamp_top_k: bool = False, log=None):
    """The DERN model: ``keep[i]`` experts of layer ``i`` (chosen by :func:`dern_scores`), each having absorbed
    the compatible segments of the dropped experts. Returns ``(model, {layer: (assigned, discarded)})``."""
    from ..experts.dense import DenseExperts

    if not (alpha == alpha) or not -1.0 <= alpha <= 1.0:
        raise ValueError(f"--dern-alpha must be a cosine similarity in [-1, 1], got {alpha}")
    layers = moe_layer_map(model)
    for i in keep:
        if not isinstance(layers[i][1].experts, DenseExperts):
            raise ValueError(f"dern needs dense experts (gate_up_proj/down_proj); layer {i} has "
                             f"{type(layers[i][1].experts).__name__}")
    new_model = prune_model(model, keep, clamp_top_k=clamp_top_k)
    new_layers = moe_layer_map(new_model)
    report = {}
    scores = dern_scores(stats)
    for i, k in keep.items():
        ex = layers[i][1].experts
        r = dern_layer(ex.w_up, ex.w_down, ex.gated, scores[i], k, alpha)
        nex = new_layers[i][1].experts
        nex.w_up.copy_(r.w_up_KHD)
        nex.w_down.copy_(r.w_down_KDF)
        report[i] = (r.assigned, r.discarded)
        if log:
            log(f"dern layer {i}: kept {r.kept}; {r.assigned} dropped neuron segments merged, {r.discarded} "
                f"below alpha {alpha}")
    return new_model, report
