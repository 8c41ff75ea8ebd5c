"""Expert placement on G devices from a routing trace (expert parallelism).

* :func:`eplb`: DeepSeek's EPLB recipe (github.com/deepseek-ai/EPLB): give each layer ``R`` redundant slots,
  one at a time to the expert with the largest load per copy; then pack the copies (load split evenly among
  an expert's copies) largest first onto the least-loaded device that still has a free slot, every device
  getting ``(E + R) / G`` slots.
* :func:`milp_placement`: MoETuner ("MoETuner: Optimized Mixture of Expert Serving with Balanced Expert
  Placement and Token Routing", arXiv 2502.06643) as an integer program for ``scipy.optimize.milp``: binary
  ``x[l, e, g]`` (expert e of layer l on device g), ``E / G`` experts per device, minimising
  ``sum_l max_g load_l(g) + w * traffic``, where traffic counts token transitions (expert i at layer l, expert
  j at layer l+1, same token) whose two experts sit on different devices (``z[l,i,j] >= x[l,i,g] -
  x[l+1,j,g]`` for every g).
* :func:`round_robin`: expert e on device ``e % G``, the baseline.

A placement is an int array ``device_IE`` (logical experts only) or, with replicas, ``slots_IP`` (the
logical expert of each physical slot, device-major: device g owns slots ``g*S .. g*S+S-1``), which is what
SGLang's ``--init-expert-location`` reads as ``physical_to_logical_map``.

Legend (docs/architecture.md): I layers, E experts, G devices (here), P physical slots.
"""
from __future__ import annotations

import numpy as np

from ..trace.format import Trace

__all__ = ["expert_loads", "transitions", "round_robin", "eplb", "milp_placement", "placement_stats",
           "slot_stats", "sglang_json"]


def expert_loads(trace: Trace) -> np.ndarray:
    """``[I, E]``: routed (token, expert) pairs per expert of each layer."""
    experts_ITK = trace.experts.numpy().astype(np.int64)
    out = np.zeros((trace.num_layers, trace.num_experts))
    for l in range(trace.num_layers):
        ids = experts_ITK[l][experts_ITK[l] >= 0]
        out[l] = np.bincount(ids, minlength=trace.num_experts)
    return out


def transitions(trace: Trace) -> np.ndarray:
    """``[I-1, E, E]``: tokens routed to expert i at layer l and to expert j at layer l+1."""
    experts_ITK = trace.experts.numpy().astype(np.int64)
    I, E = trace.num_layers, trace.num_experts
    out = np.zeros((max(I - 1, 0), E, E))
    for l in range(I - 1):
        a, b = experts_ITK[l], experts_ITK[l + 1]
        for ka in range(a.shape[1]):
            for kb in range(b.shape[1]):
                ok = (a[:, ka] >= 0) & (b[:, kb] >= 0)
                np.add.at(out[l], (a[ok, ka], b[ok, kb]), 1.0)
    return out


def _check(num_experts: int, devices: int) -> None:
    if devices < 1:
        raise ValueError(f"devices must be >= 1, got {devices}")
    if num_experts % devices:
        raise ValueError(f"{num_experts} experts cannot be split evenly over {devices} devices")


def round_robin(num_layers: int, num_experts: int, devices: int) -> np.ndarray:
    _check(num_experts, devices)
    return np.tile(np.arange(num_experts) % devices, (num_layers, 1))


def placement_stats(device_IE: np.ndarray, loads_IE: np.ndarray, trans_IEE: np.ndarray, devices: int,
                    traffic_weight: float = 0.0) -> dict:
    """Max device load (summed over layers, each layer's maximum), balancedness (mean over layers of
    mean/max device load), cross-device traffic and the program's objective for a placement without replicas."""
    dev_load_IG = np.zeros((loads_IE.shape[0], devices))
    for l in range(loads_IE.shape[0]):
        np.add.at(dev_load_IG[l], device_IE[l], loads_IE[l])
    traffic = 0.0
    for l in range(trans_IEE.shape[0]):
        cross = device_IE[l][:, None] != device_IE[l + 1][None, :]
        traffic += float((trans_IEE[l] * cross).sum())
    return _summary(dev_load_IG, traffic, traffic_weight)


def _summary(dev_load_IG: np.ndarray, traffic: float | None, traffic_weight: float) -> dict:
    max_I = dev_load_IG.max(1)
    bal = np.where(max_I > 0, dev_load_IG.mean(1) / np.maximum(max_I, 1e-300), 1.0)
    out = {"max_device_load": float(max_I.sum()), "balancedness": float(bal.mean()),
           "max_device_load_per_layer": max_I.tolist()}
    if traffic is not None:
        out["cross_device_traffic"] = traffic
        out["objective"] = float(max_I.sum() + traffic_weight * traffic)
    return out


# ------------------------------------------------------------------------------------------------ EPLB
def eplb(loads_IE: np.ndarray, devices: int, replicas: int = 0) -> np.ndarray:
    """``slots_IP`` (P = E + replicas): EPLB replication then greedy balanced packing, device-major."""
    I, E = loads_IE.shape
    P = E + replicas
    if replicas < 0:
        raise ValueError(f"replicas must be >= 0, got {replicas}")
    _check(P, devices)
    per = P // devices
    out = np.zeros((I, P), dtype=np.int64)
    for l in range(I):
        count = np.ones(E, dtype=np.int64)
        for _ in range(replicas):
            count[np.argmax(loads_IE[l] / count)] += 1
        copies = [(loads_IE[l, e] / count[e], e) for e in range(E) for _ in range(count[e])]
        copies.sort(key=lambda c: (-c[0], c[1]))
        dev_load = np.zeros(devices)
        dev_items: list[list[int]] = [[] for _ in range(devices)]
        for load, e in copies:
            room = [g for g in range(devices) if len(dev_items[g]) < per]
            g = min(room, key=lambda d: (dev_load[d], d))
            dev_items[g].append(e)
            dev_load[g] += load
        out[l] = [e for g in range(devices) for e in dev_items[g]]
    return out


def slot_stats(slots_IP: np.ndarray, loads_IE: np.ndarray, devices: int) -> dict:
    """Max device load and balancedness of a slot map, an expert's load split evenly among its copies."""
    I, P = slots_IP.shape
    per = P // devices
    dev_load_IG = np.zeros((I, devices))
    for l in range(I):
        count = np.bincount(slots_IP[l], minlength=loads_IE.shape[1])
        for p, e in enumerate(slots_IP[l]):
            dev_load_IG[l, p // per] += loads_IE[l, e] / count[e]
    return _summary(dev_load_IG, None, 0.0)


def sglang_json(slots_IP: np.ndarray) -> dict:
    """What SGLang's ``--init-expert-location`` reads: ``{"physical_to_logical_map": [layers, slots]}``."""
    return {"physical_to_logical_map": np.asarray(slots_IP).astype(int).tolist()}


# ------------------------------------------------------------------------------------------------ MILP
def milp_placement(loads_IE: np.ndarray, trans_IEE: np.ndarray, devices: int, traffic_weight: float = 0.1,
                   time_limit: float = 60.0) -> tuple[np.ndarray, dict]:
    """MoETuner's program solved with HiGHS (``scipy.optimize.milp``); returns ``(device_IE, info)``.

    Raises ``ValueError`` when the solver finds no feasible placement within ``time_limit`` seconds.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    I, E = loads_IE.shape
    G = devices
    _check(E, G)
    pairs = [(l, i, j) for l in range(trans_IEE.shape[0]) for i in range(E) for j in range(E)
             if trans_IEE[l, i, j] > 0] if traffic_weight > 0 else []
    nx = I * E * G
    n = nx + I + len(pairs)  # x, then M_l, then z

    def xi(l, e, g):
        return (l * E + e) * G + g

    rows, cols, vals, lo, hi = [], [], [], [], []
    r = 0

    def add(entries, low, high):
        nonlocal r
        for c, v in entries:
            rows.append(r), cols.append(c), vals.append(v)
        lo.append(low), hi.append(high)
        r += 1

    for l in range(I):
        for e in range(E):  # every expert on exactly one device
            add([(xi(l, e, g), 1.0) for g in range(G)], 1.0, 1.0)
        for g in range(G):  # E / G experts per device; load_l(g) - M_l <= 0
            add([(xi(l, e, g), 1.0) for e in range(E)], E // G, E // G)
            add([(xi(l, e, g), float(loads_IE[l, e])) for e in range(E)] + [(nx + l, -1.0)], -np.inf, 0.0)
    for p, (l, i, j) in enumerate(pairs):
        for g in range(G):  # z >= x[l,i,g] - x[l+1,j,g]
            add([(nx + I + p, 1.0), (xi(l, i, g), -1.0), (xi(l + 1, j, g), 1.0)], 0.0, np.inf)
    c = np.zeros(n)
    c[nx:nx + I] = 1.0
    for p, (l, i, j) in enumerate(pairs):
        c[nx + I + p] = traffic_weight * trans_IEE[l, i, j]
    lb, ub = np.zeros(n), np.ones(n)
    ub[nx:nx + I] = np.inf
    ub[:nx][[xi(0, 0, g) for g in range(1, G)]] = 0.0  # symmetry: expert 0 of layer 0 on device 0
    integrality = np.zeros(n)
    integrality[:nx] = 1
    A = coo_matrix((vals, (rows, cols)), shape=(r, n)).tocsr()
    res = milp(c, constraints=LinearConstraint(A, lo, hi), integrality=integrality, bounds=Bounds(lb, ub),
               options={"time_limit": time_limit, "disp": False})
    if res.x is None:
        raise ValueError(f"the placement program found no solution in {time_limit:g} s ({res.message})")
    x = res.x[:nx].reshape(I, E, G)
    device_IE = x.argmax(-1).astype(np.int64)
    return device_IE, {"status": int(res.status), "optimal": res.status == 0, "message": str(res.message),
                       "objective": float(res.fun), "variables": n, "constraints": r}

