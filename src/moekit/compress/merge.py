"""Expert merging: cluster each layer's experts, then replace every cluster by one expert.

* ``hc_smoe``: HC-SMoE (Chen et al. 2024, "Retraining-Free Merging of Sparse MoE via Hierarchical
  Clustering", arXiv:2410.08589): features = each expert's mean output over ALL calibration tokens
  (``calibrate(..., all_experts=True)``: every expert runs on every token, so experts the router never picks
  have features too), hierarchical clustering with average linkage on Euclidean distances
  (``scipy.cluster.hierarchy.linkage(method="average")``), the tree cut into exactly ``n`` clusters
  (``cut_tree``), and the weights of each cluster averaged with the members' routing frequencies (routed
  calibration tokens) as weights.
* ``uncurl``: UNCURL (Sarkar et al. 2024, "Revisiting SMoE Language Models by Evaluating Inefficiencies with
  Task Specific Expert Pruning", arXiv:2409.01483), :mod:`moekit.compress.uncurl`: spectral clustering of the
  experts on the cosine similarity of their router-logit columns over the task (calibration) data, then each
  cluster merged after aligning the members' neurons to the dominant member (MC-SMoE style permutation
  alignment), frequency-weighted. ``uncurl_simple`` is the earlier simplified version kept for comparison
  (average-linkage clustering of ``1 - Pearson correlation`` of the logit columns, no neuron alignment).

Router rows: a merged expert cannot reproduce ``logsumexp`` of its members' logits with one linear row; the
default keeps the row of the member with the largest routing frequency (``router_rows="dominant"``, as
MC-SMoE's dominant expert), ``"average"`` takes the mean of the members' rows. The output really has fewer
experts (smaller tensors, ``num_experts`` rewritten), built by :func:`moekit.compress.prune.rebuild_model`.
"""
from __future__ import annotations

import numpy as np
import torch

from .calibrate import CalibrationStats, LayerCalibration
from .prune import keep_sets, rebuild_model

__all__ = ["MERGE_METHODS", "cluster_experts", "merge_groups", "merge_model"]

MERGE_METHODS = ("hc_smoe", "uncurl", "uncurl_simple")


def cluster_experts(features_ED: np.ndarray, n_clusters: int, *, metric: str = "euclidean",
                    distances: np.ndarray | None = None) -> list[list[int]]:
    """Average-linkage hierarchical clustering of ``E`` feature rows (or a precomputed condensed distance
    vector) cut into exactly ``n_clusters``; clusters as sorted member lists, ordered by their first member."""
    from scipy.cluster.hierarchy import cut_tree, linkage

    E = features_ED.shape[0] if distances is None else int(round((1 + np.sqrt(1 + 8 * len(distances))) / 2))
    if not 1 <= n_clusters <= E:
        raise ValueError(f"n_clusters must be in [1, {E}], got {n_clusters}")
    if n_clusters == E:
        return [[e] for e in range(E)]
    if distances is None:
        Z = linkage(np.asarray(features_ED, dtype=np.float64), method="average", metric=metric)
    else:
        Z = linkage(np.asarray(distances, dtype=np.float64), method="average")
    labels = cut_tree(Z, n_clusters=n_clusters).reshape(-1)
    groups: dict[int, list[int]] = {}
    for e, lab in enumerate(labels.tolist()):
        groups.setdefault(lab, []).append(e)
    return sorted(groups.values(), key=lambda g: g[0])


def _uncurl_distances(s: LayerCalibration) -> np.ndarray:
    from scipy.spatial.distance import squareform

    corr = s.logit_corr_EE.numpy()
    dist = np.clip(1.0 - corr, 0.0, 2.0)
    np.fill_diagonal(dist, 0.0)
    return squareform((dist + dist.T) / 2, checks=False)


def merge_groups(stats: CalibrationStats, counts: dict[int, int], method: str = "hc_smoe") -> dict[int, list[list[int]]]:
    """Clusters per layer (``counts[i]`` of them in layer ``i``) under ``method``."""
    out = {}
    for i, n in counts.items():
        s = stats.layer(i)
        if method == "hc_smoe":
            out[i] = cluster_experts(s.output_mean_ED.numpy(), n)
        elif method == "uncurl":
            from .uncurl import uncurl_groups

            out[i] = uncurl_groups(stats, {i: n})[i]
        elif method == "uncurl_simple":
            if s.logit_gram_EE is None:
                raise ValueError(f"uncurl needs router logits; layer {i}'s router gives none")
            out[i] = cluster_experts(np.zeros((s.num_experts, 1)), n, distances=_uncurl_distances(s))
        else:
            raise ValueError(f"unknown merge method {method!r}; choose from {', '.join(MERGE_METHODS)}")
    return out


def merge_model(model: torch.nn.Module, stats: CalibrationStats, counts: dict[int, int], *,
                method: str = "hc_smoe", router_rows: str = "dominant", clamp_top_k: bool = False):
    """``(merged model, groups)``: each layer's experts clustered into ``counts[i]`` and merged with
    frequency weights (module docstring)."""
    if method == "uncurl":
        from .uncurl import uncurl_model

        return uncurl_model(model, stats, counts, router_rows=router_rows, clamp_top_k=clamp_top_k)
    groups = merge_groups(stats, counts, method)
    weights = {i: stats.layer(i).count_E.double() for i in groups}
    model_out = rebuild_model(model, groups, member_weights=weights, router_rows=router_rows,
                              clamp_top_k=clamp_top_k)
    return model_out, groups


def global_counts(stats: CalibrationStats, total: int, layer_top_k: dict[int, int], clamp_top_k: bool) -> dict[int, int]:
    """Clusters per layer under a global budget: the frequency-score allocation of
    :func:`moekit.compress.prune.keep_sets` (how many experts each layer would keep)."""
    scores = {s.layer_index: s.count_E.double() for s in stats.layers}
    return {i: len(k) for i, k in keep_sets(scores, total, layer_top_k, clamp_top_k).items()}

