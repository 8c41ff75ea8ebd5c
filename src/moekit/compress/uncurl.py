"""UNCURL: task-specific expert pruning by clustering experts on their router logits, then merging each cluster.

Paper: Sarkar et al. 2024, "Revisiting SMoE Language Models by Evaluating Inefficiencies with Task Specific
Expert Pruning" (arXiv:2409.01483). What is taken from it, and what differs:

* **Task data.** The router logits are collected on the calibration data, which is the task's data when
  ``--calib-domain`` / ``--calib-data`` names it (the paper's setting: pruning for one downstream task).
* **Expert features and similarity.** Each expert is represented by its column of router logits over the task
  tokens; the similarity of two experts is the cosine similarity of their columns, computed from the streamed
  Gram matrix ``LayerCalibration.logit_gram_EE`` (no stored activations).
* **Clustering.** Spectral clustering, as in the paper: affinity ``A = (1 + cos) / 2``, symmetric normalised
  affinity ``D^-1/2 A D^-1/2``, its ``n`` leading eigenvectors with unit-norm rows as the embedding. The
  embedding is then cut into exactly ``n`` clusters by average-linkage hierarchical clustering (deterministic and
  always exactly ``n`` non-empty clusters) instead of the k-means of standard spectral clustering, which can
  leave clusters empty.
* **Merging.** As MC-SMoE (which UNCURL builds on): inside each cluster the experts' hidden neurons are first
  aligned to the cluster's dominant expert (the most frequently routed member) by a permutation that maximises
  the summed cosine similarity of matched neuron segments (gate row, up row and down column;
  ``scipy.optimize.linear_sum_assignment``); permuting an expert's hidden neurons leaves its function unchanged.
  The aligned weights are averaged with the members' routing frequencies as weights, and the merged expert
  takes the dominant member's router row.
* Not taken: the paper's analysis of where pruning hurts (layer-wise sweeps), and any fine-tuning after
  merging.

Legend: E experts, F expert hidden width, D model width, P segment length.
"""
from __future__ import annotations

import numpy as np
import torch

from .calibrate import CalibrationStats, LayerCalibration
from .dern import segments
from .prune import moe_layer_map, rebuild_model

__all__ = ["align_permutation", "logit_cosine", "spectral_clusters", "uncurl_groups", "uncurl_model"]


def logit_cosine(s: LayerCalibration) -> np.ndarray:
    """``[E, E]`` cosine similarity of the experts' router-logit columns over the calibration tokens."""
    if s.logit_gram_EE is None:
        raise ValueError(f"uncurl needs router logits; layer {s.layer_index}'s router gives none")
    g = s.logit_gram_EE.double().numpy()
    d = np.sqrt(np.clip(np.diag(g), 1e-300, None))
    return np.clip(g / d[:, None] / d[None, :], -1.0, 1.0)


def spectral_clusters(similarity_EE: np.ndarray, n_clusters: int) -> list[list[int]]:
    """Exactly ``n_clusters`` clusters of the ``E`` experts from a similarity in [-1, 1] (module docstring)."""
    from .merge import cluster_experts

    S = np.asarray(similarity_EE, dtype=np.float64)
    E = S.shape[0]
    if not 1 <= n_clusters <= E:
        raise ValueError(f"n_clusters must be in [1, {E}], got {n_clusters}")
    if n_clusters == E:
        return [[e] for e in range(E)]
    A = (1.0 + (S + S.T) / 2) / 2
    deg = A.sum(1)
    L = A / np.sqrt(np.outer(deg, deg))
    vals, vecs = np.linalg.eigh(L)
    emb = vecs[:, np.argsort(vals)[::-1][:n_clusters]]
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(min=1e-30)
    return cluster_experts(emb, n_clusters)


def align_permutation(anchor_FP: torch.Tensor, member_FP: torch.Tensor) -> torch.Tensor:
    """``perm [F]`` such that ``member_FP[perm]`` is aligned to ``anchor_FP``: the permutation maximising
    ``sum_j cos(anchor_j, member_perm[j])`` (Hungarian algorithm)."""
    from scipy.optimize import linear_sum_assignment

    a = anchor_FP.double()
    b = member_FP.double()
    a = a / a.norm(dim=1, keepdim=True).clamp(min=1e-30)
    b = b / b.norm(dim=1, keepdim=True).clamp(min=1e-30)
    rows, cols = linear_sum_assignment((a @ b.T).numpy(), maximize=True)
    perm = torch.empty(a.shape[0], dtype=torch.int64)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return perm


def uncurl_groups(stats: CalibrationStats, counts: dict[int, int]) -> dict[int, list[list[int]]]:
    """Clusters per layer (``counts[i]`` of them in layer ``i``)."""
    return {i: spectral_clusters(logit_cosine(stats.layer(i)), n) for i, n in counts.items()}


@torch.no_grad()
def merge_aligned(w_up_EHD: torch.Tensor, w_down_EDF: torch.Tensor, gated: bool, group: list[int],
                  weights_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One cluster's merged expert ``(w_up [H, D], w_down [D, F])``: members aligned to the dominant one (largest
    weight), then averaged with ``weights_E`` (uniform when they sum to zero)."""
    F = w_down_EDF.shape[-1]
    w = weights_E[group].double().clamp(min=0)
    if float(w.sum()) <= 0:
        w = torch.ones(len(group), dtype=torch.float64)
    w = w / w.sum()
    dom = group[int(torch.argmax(w))]
    seg = segments(w_up_EHD[group], w_down_EDF[group], gated)
    anchor = seg[group.index(dom)]
    up = torch.zeros_like(w_up_EHD[0], dtype=torch.float64)
    down = torch.zeros_like(w_down_EDF[0], dtype=torch.float64)
    for m, (e, c) in enumerate(zip(group, w.tolist())):
        perm = torch.arange(F) if e == dom else align_permutation(anchor, seg[m])
        rows = torch.cat([perm, perm + F]) if gated else perm
        up += c * w_up_EHD[e].double()[rows]
        down += c * w_down_EDF[e].double()[:, perm]
    return up.to(w_up_EHD.dtype), down.to(w_down_EDF.dtype)


@torch.no_grad()
def uncurl_model(model: torch.nn.Module, stats: CalibrationStats, counts: dict[int, int], *,
                 router_rows: str = "dominant", clamp_top_k: bool = False, align: bool = True):
    """``(merged model, groups)``: UNCURL clusters merged with neuron alignment (``align=False``: plain
    frequency-weighted averaging, the earlier simplified version)."""
    from ..experts.dense import DenseExperts

    groups = uncurl_groups(stats, counts)
    weights = {i: stats.layer(i).count_E.double() for i in groups}
    new_model = rebuild_model(model, groups, member_weights=weights, router_rows=router_rows,
                              clamp_top_k=clamp_top_k)
    if not align:
        return new_model, groups
    old, new = moe_layer_map(model), moe_layer_map(new_model)
    for i, g in groups.items():
        ex = old[i][1].experts
        if not isinstance(ex, DenseExperts):
            continue  # no neuron structure to align: the plain average of rebuild_model stays
        nex = new[i][1].experts
        for c, grp in enumerate(g):
            if len(grp) > 1:
                up, down = merge_aligned(ex.w_up, ex.w_down, ex.gated, grp, weights[i])
                nex.w_up[c].copy_(up)
                nex.w_down[c].copy_(down)
    return new_model, groups
