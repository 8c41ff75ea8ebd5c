"""A slow, independent reference Mixture-of-Experts layer, written from scratch for the tests.

Nothing here imports moekit. Everything is a Python loop over tokens and the experts each token picked,
on small torch tensors, so autograd gives reference gradients of every input.

Conventions (the ones moekit documents; Hugging Face transformers 5 weight layout):

* ``router_w [E, D]``: logits of token t are ``router_w @ x_t``; ``score_func`` softmax or sigmoid.
* selection uses ``choice = scores + bias`` (bias only for selection), optionally group-limited
  (DeepSeek-V3: E experts in G equal groups, group score = sum of the two highest choice scores of the
  group, or its only score for one-expert groups; keep the ``topk_groups`` best groups, top-k inside them).
* gate weight of a selected expert = its *score* (never the bias), renormalised over the K selected when
  ``norm_topk``, times ``scaling_factor``.
* capacity ``C = ceil(capacity_factor * T * K / E)``. Pairs are ordered token-major, k-minor. ``position``:
  an expert keeps its first C pairs in that order; ``probs``: the C pairs with the highest gate weight, ties
  to the earlier pair. Dropped pairs contribute nothing (their weight still counts in the normalisation).
* experts: ``up [E, H, D]`` (``H = 2F`` gate rows first then up rows for swiglu / geglu, ``H = F`` for
  gelu / relu), ``down [E, D, F]``: ``y = down_e @ act(up_e @ x)`` (gated: ``act(g) * u``).
* shared expert (Qwen2-MoE names): ``down(act(gate(x)) * up(x))`` (ungated: ``down(act(up(x)))``),
  multiplied by ``sigmoid(shared_gate @ x)`` when a shared gate is given.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

ACTIVATION_NAMES = ("swiglu", "geglu", "gelu", "relu")
GATED = {"swiglu": True, "geglu": True, "gelu": False, "relu": False}


# ----------------------------------------------------------------------------------------- elementwise math
def _silu(z):
    return z / (1.0 + torch.exp(-z))


def _gelu(z):  # exact (erf) GELU
    return 0.5 * z * (1.0 + torch.erf(z / math.sqrt(2.0)))


def _relu(z):
    return torch.where(z > 0, z, torch.zeros_like(z))


ACT = {"swiglu": _silu, "geglu": _gelu, "gelu": _gelu, "relu": _relu}


def ffn(x_d, up_hd, down_df, activation):
    """One expert on one token vector."""
    h = torch.mv(up_hd, x_d)
    if GATED[activation]:
        f = h.shape[0] // 2
        a = ACT[activation](h[:f]) * h[f:]
    else:
        a = ACT[activation](h)
    return torch.mv(down_df, a)


def softmax_vec(v):
    z = v - v.max().detach()
    e = torch.exp(z)
    return e / e.sum()


def sigmoid_vec(v):
    return 1.0 / (1.0 + torch.exp(-v))


# -------------------------------------------------------------------------------------------- selection
def _top_indices(values, k, allowed=None):
    """Indices of the k largest values (ties to the lower index), restricted to ``allowed``."""
    idx = range(len(values)) if allowed is None else allowed
    return sorted(idx, key=lambda e: (-values[e], e))[:k]


def select_experts(choice, top_k, num_groups=1, topk_groups=1):
    """Pure-Python top-k selection from a list of floats, optionally group-limited (DeepSeek-V3)."""
    num_experts = len(choice)
    if num_groups <= 1:
        return _top_indices(choice, top_k)
    size = num_experts // num_groups
    group_scores = []
    for g in range(num_groups):
        members = sorted(choice[g * size:(g + 1) * size], reverse=True)
        group_scores.append(sum(members[:2]))
    groups = _top_indices(group_scores, topk_groups)
    allowed = [e for g in groups for e in range(g * size, (g + 1) * size)]
    return _top_indices(choice, top_k, allowed)


def capacity_of(capacity_factor, num_tokens, top_k, num_experts):
    return math.ceil(capacity_factor * (num_tokens * top_k) / num_experts)


def keep_mask(ids, weights, num_experts, capacity, policy):
    """``kept[t][k]`` for pairs (token t, slot k); ``weights`` are floats."""
    num_tokens = len(ids)
    kept = [[True] * len(ids[t]) for t in range(num_tokens)]
    if capacity is None:
        return kept
    pairs_of = {e: [] for e in range(num_experts)}
    order = 0
    for t in range(num_tokens):
        for k, e in enumerate(ids[t]):
            pairs_of[e].append((order, t, k))
            order += 1
    for e, pairs in pairs_of.items():
        if policy == "position":
            ranked = sorted(pairs, key=lambda p: p[0])
        elif policy == "probs":
            ranked = sorted(pairs, key=lambda p: (-weights[p[1]][p[2]], p[0]))
        else:
            raise AssertionError(policy)
        for _, t, k in ranked[capacity:]:
            kept[t][k] = False
    return kept


# ------------------------------------------------------------------------------------------- the layer
@dataclass
class RefOut:
    out: torch.Tensor                  # [T, D] in x's dtype (float64 math)
    ids: list                          # ids[t] = selected experts, best first
    weights: list                      # weights[t][k] = 0-d tensor (gate weight, differentiable)
    kept: list                         # kept[t][k] = bool
    routed_E: list                     # pairs per expert before dropping
    kept_E: list                       # pairs per expert after dropping
    capacity: int | None
    logits: torch.Tensor               # [T, E] router dtype, differentiable
    scores: torch.Tensor               # [T, E]
    probs: torch.Tensor                # [T, E]: softmax scores, or sigmoid scores renormalised
    extra: dict = field(default_factory=dict)

    @property
    def num_pairs(self):
        return sum(len(i) for i in self.ids)

    @property
    def num_dropped(self):
        return sum(not k for row in self.kept for k in row)


def reference_moe(x, router_w, up, down, *, top_k, activation="swiglu", score_func="softmax",
                  norm_topk=False, scaling_factor=1.0, num_groups=1, topk_groups=1, bias=None,
                  capacity_factor=None, drop_policy="position", shared=None, router_dtype=torch.float32,
                  compute_dtype=torch.float64):
    """Reference MoE forward on ``x [T, D]``; returns :class:`RefOut` (differentiable ``out``).

    ``shared``: None or a dict with ``up [Fs, D]``, ``down [D, Fs]``, optional ``gate [Fs, D]`` (gated
    activations) and optional ``sgate [1, D]`` (Qwen2-MoE sigmoid gate).
    ``router_dtype``: the dtype the router math runs in (moekit documents float32 whatever the input).
    """
    num_tokens, dim = x.shape
    num_experts = router_w.shape[0]
    xc = x.to(compute_dtype)
    wr = router_w.to(router_dtype)
    logits, scores, probs = [], [], []
    ids, weights = [], []
    for t in range(num_tokens):
        l_e = torch.mv(wr, x[t].to(router_dtype))
        s_e = softmax_vec(l_e) if score_func == "softmax" else sigmoid_vec(l_e)
        p_e = s_e if score_func == "softmax" else s_e / s_e.sum()
        logits.append(l_e)
        scores.append(s_e)
        probs.append(p_e)
        choice = [float(v) for v in s_e.detach()]
        if bias is not None:
            choice = [c + float(b) for c, b in zip(choice, bias)]
        sel = select_experts(choice, top_k, num_groups, topk_groups)
        w = [s_e[e] for e in sel]
        if norm_topk:
            total = sum(w)
            w = [wi / total for wi in w]
        w = [wi * scaling_factor for wi in w]
        ids.append(sel)
        weights.append(w)
    capacity = None if capacity_factor is None else capacity_of(capacity_factor, num_tokens, top_k, num_experts)
    kept = keep_mask(ids, [[float(w.detach()) for w in row] for row in weights], num_experts, capacity, drop_policy)
    rows = []
    for t in range(num_tokens):
        acc = torch.zeros(dim, dtype=compute_dtype)
        for k, e in enumerate(ids[t]):
            if kept[t][k]:
                y = ffn(xc[t], up[e].to(compute_dtype), down[e].to(compute_dtype), activation)
                acc = acc + weights[t][k].to(compute_dtype) * y
        if shared is not None:
            s_up = shared["up"].to(compute_dtype)
            s_down = shared["down"].to(compute_dtype)
            if shared.get("gate") is not None:
                h = ACT[activation](torch.mv(shared["gate"].to(compute_dtype), xc[t])) * torch.mv(s_up, xc[t])
            else:
                h = ACT[activation](torch.mv(s_up, xc[t]))
            ys = torch.mv(s_down, h)
            if shared.get("sgate") is not None:
                ys = sigmoid_vec(torch.mv(shared["sgate"].to(compute_dtype), xc[t])) * ys
            acc = acc + ys
        rows.append(acc)
    out = torch.stack(rows).to(x.dtype) if rows else x.new_zeros(0, dim)
    routed = [0] * num_experts
    kept_counts = [0] * num_experts
    for t in range(num_tokens):
        for k, e in enumerate(ids[t]):
            routed[e] += 1
            kept_counts[e] += int(kept[t][k])
    return RefOut(out=out, ids=ids, weights=weights, kept=kept, routed_E=routed, kept_E=kept_counts,
                  capacity=capacity, logits=torch.stack(logits), scores=torch.stack(scores),
                  probs=torch.stack(probs))


# -------------------------------------------------------------------------------- balancing references
def ref_switch_loss(probs, ids, num_experts):
    """``E * sum_e f_e * P_e``; f from the assignment lists, P the mean of ``probs`` rows (differentiable)."""
    counts = [0] * num_experts
    for row in ids:
        for e in row:
            counts[e] += 1
    total = sum(counts)
    P = probs.mean(dim=0)
    return num_experts * sum((counts[e] / total) * P[e] for e in range(num_experts))


def ref_max_violation(counts):
    mean = sum(counts) / len(counts)
    return 0.0 if mean == 0 else (max(counts) - mean) / mean


# ------------------------------------------------------------------------------------------------ utils
def rel_err(a, b):
    """``max|a - b| / max|b|`` (``max|a - b|`` when b is all zeros)."""
    a = a.detach().to(torch.float64)
    b = b.detach().to(torch.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    if a.numel() == 0:
        return 0.0
    diff = (a - b).abs().max().item()
    scale = b.abs().max().item()
    return diff / scale if scale > 0 else diff


def random_weights(num_experts, dim, hidden, activation="swiglu", *, shared_hidden=None, shared_gate=False,
                   seed=0, dtype=torch.float64, std=0.5):
    """Random parameters keyed by their Hugging Face / moekit state-dict names."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=std):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(dtype)

    gated = GATED[activation]
    sd = {"gate.weight": rnd(num_experts, dim, s=1.0)}
    up_name = "experts.gate_up_proj" if gated else "experts.up_proj"
    sd[up_name] = rnd(num_experts, (2 if gated else 1) * hidden, dim)
    sd["experts.down_proj"] = rnd(num_experts, dim, hidden)
    if shared_hidden:
        if gated:
            sd["shared_expert.gate_proj.weight"] = rnd(shared_hidden, dim)
        sd["shared_expert.up_proj.weight"] = rnd(shared_hidden, dim)
        sd["shared_expert.down_proj.weight"] = rnd(dim, shared_hidden)
        if shared_gate:
            sd["shared_expert_gate.weight"] = rnd(1, dim)
    return sd


def leaves(sd):
    """Fresh leaf copies requiring grad."""
    return {k: v.detach().clone().requires_grad_(True) for k, v in sd.items()}


def reference_from_state(x, sd, **kw):
    """Run :func:`reference_moe` on parameters named as in a moekit / HF state dict."""
    up = sd.get("experts.gate_up_proj", sd.get("experts.up_proj"))
    shared = None
    if "shared_expert.up_proj.weight" in sd:
        shared = {
            "up": sd["shared_expert.up_proj.weight"],
            "down": sd["shared_expert.down_proj.weight"],
            "gate": sd.get("shared_expert.gate_proj.weight"),
            "sgate": sd.get("shared_expert_gate.weight"),
        }
    return reference_moe(x, sd["gate.weight"], up, sd["experts.down_proj"], shared=shared, **kw)
