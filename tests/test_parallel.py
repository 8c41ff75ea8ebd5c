"""Expert parallelism on torch.distributed (gloo, CPU): spawned process groups of 2 and 4 ranks.

The workers (tests/dist_workers.py) compare the all-to-all dispatcher with the local dispatcher on the
whole batch (outputs and every gradient), with uneven splits, ranks that receive nothing and a rank with
no tokens; chunked overlap with r = 1 bit for bit; a MoE layer's global-batch losses, gradients and
auxiliary-loss-free bias with the single-process layer, with experts sharded over all ranks and over half of
them (replicas all-reduce their gradients); and the layout-independent state.
"""
import json
from pathlib import Path

import pytest
import torch.multiprocessing as mp

import dist_workers
from moekit.parallel import check_layout
from moekit.parallel.cost_model import LinearCost, OverlapCostModel

TOL = 1e-10  # float64 everywhere
LAYER_TOL = 1e-6  # MoE layers in float64, but routers compute logits and losses in float32


def _spawn(world: int, tmp: Path) -> list[dict]:
    try:
        mp.start_processes(dist_workers.worker, args=(world, str(tmp)), nprocs=world, join=True,
                           start_method="spawn")
    except mp.ProcessExitedException:
        # A worker that has run every check and written its results can still abort while the process tears
        # down (seen twice in full-suite runs: "terminate called without an active exception"). Accept the
        # results only when every rank wrote the last check; anything less is a failure.
        last = f"layer/ep{world // 2}/global/sign/grads"
        files = [tmp / f"rank{r}.json" for r in range(world)]
        if not all(f.exists() and last in json.loads(f.read_text()) for f in files):
            raise
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module", params=[2, 4], ids=["world2", "world4"])
def dist_results(request, tmp_path_factory):
    return request.param, _spawn(request.param, tmp_path_factory.mktemp(f"dist{request.param}"))


def _values(results, suffix):
    vals = [(r, k, v) for r, res in enumerate(results) for k, v in res.items() if k.endswith(suffix)]
    assert vals, f"no check ends with {suffix}"
    return vals


@pytest.mark.parametrize("what", ["out", "dx", "dweight", "dw_up", "dw_down"])
def test_all_to_all_matches_local_dispatch(dist_results, what):
    _, results = dist_results
    for rank, key, err in _values(results, f"/{what}"):
        if key.startswith("layer/"):
            continue
        assert err < (1e-5 if key.startswith("float32/") else TOL), (rank, key, err)


def test_overlap_chunks_equal_no_overlap_bitwise(dist_results):
    _, results = dist_results
    for rank, key, equal in _values(results, "_r1"):
        assert equal is True, (rank, key)


def test_uneven_and_zero_splits(dist_results):
    world, results = dist_results
    # everything routed to experts 0 and 1: both live on rank 0 (8 experts, at most 4 ranks)
    for rank, res in enumerate(results):
        received = res["one_expert/r1/rows_received"]
        assert (received > 0) == (rank == 0), (rank, received)
    assert "empty_rank/r1/out" in results[0]  # rank 0 had no tokens and still took part


@pytest.mark.parametrize("check", ["out", "dx", "grads", "aux_sum", "bias", "full_state", "reshard"])
def test_layer_under_expert_parallelism(dist_results, check):
    _, results = dist_results
    for rank, key, err in _values(results, f"/{check}"):
        if key.startswith("layer/"):
            assert err < LAYER_TOL, (rank, key, err)


def test_custom_experts_under_expert_parallelism(dist_results):
    """The two test-only Experts kinds ran through every layer check (tests/custom_experts.py)."""
    world, results = dist_results
    for kind in ("test_loop", "test_fakequant"):
        for check in ("out", "dx", "grads", "full_state", "reshard"):
            assert f"layer/ep{world}/global/sign/{kind}/{check}" in results[0], (kind, check)


def test_loss_free_bias_synchronised(dist_results):
    world, results = dist_results
    for res in results:
        for ep in {world, world // 2}:
            assert res[f"layer/ep{ep}/global/sign/bias_moved"] > 0  # it moved, and as in one process
            assert res[f"layer/ep{ep}/global/sign/bias"] < TOL


# --------------------------------------------------------------------------- layout checks and cost model
@pytest.mark.parametrize("world,ep,experts,batch,msg", [
    (3, 2, 8, None, "does not divide the world size 3"),
    (2, 2, 9, None, "does not divide num_experts=9"),
    (1, 2, 8, None, "needs 2 processes"),
    (4, 2, 8, 6, "batch_size=6 is not divisible by the world size 4"),
    (2, 0, 8, None, "expert_parallel must be an integer >= 1"),
])
def test_check_layout_errors(world, ep, experts, batch, msg):
    with pytest.raises(ValueError, match=msg):
        check_layout(world, ep, experts, batch)


def _brute_force_pipeline(chunks, c, g):
    """Event-by-event replay of the issue order d0, d1, r0, d2, r1, ... on one link and one device."""
    events = [("d", 0)]
    for k in range(chunks):
        if k + 1 < chunks:
            events.append(("d", k + 1))
        events.append(("r", k))
    arrived, computed, link = {}, {}, 0.0
    device = 0.0
    for kind, k in events:
        if kind == "d":
            ready = arrived[k - 1] if k else 0.0
            link = max(link, ready) + c
            arrived[k] = link
        else:
            for j in range(k + 1):
                if j not in computed:
                    device = max(device, arrived[j]) + g
                    computed[j] = device
            link = max(link, computed[k]) + c
    return link


@pytest.mark.parametrize("alpha,beta,gamma,delta", [(1e-3, 1e-9, 0, 1e-6), (0, 1e-8, 1e-4, 1e-7),
                                                    (5e-3, 1e-10, 1e-5, 1e-5)])
def test_cost_model_matches_event_replay(alpha, beta, gamma, delta):
    model = OverlapCostModel(LinearCost(alpha, beta), LinearCost(gamma, delta))
    for chunks in (1, 2, 3, 5, 8):
        c, g = alpha + beta * 1e6 / chunks, gamma + delta * 4096 / chunks
        assert model.time(chunks, 1e6, 4096) == pytest.approx(_brute_force_pipeline(chunks, c, g))
    assert model.time(1, 1e6, 4096) == pytest.approx(2 * (alpha + beta * 1e6) + gamma + delta * 4096)


def test_cost_model_choice():
    # compute-bound with free messages: more chunks always help, up to the limit
    fast = OverlapCostModel(LinearCost(0.0, 1e-9), LinearCost(0.0, 1e-6))
    assert fast.best_chunks(1e6, 4096, 8) == 8
    # latency-bound: chunking only adds per-message latency
    slow = OverlapCostModel(LinearCost(1.0, 0.0), LinearCost(0.0, 1e-9))
    assert slow.best_chunks(1e6, 4096, 8) == 1
    assert fast.gain(8, 1e6, 4096) > 1 > slow.gain(8, 1e6, 4096)


def test_linear_cost_fit():
    xs = [1, 2, 4, 8]
    fit = LinearCost.fit(xs, [0.5 + 0.25 * x for x in xs])
    assert fit.intercept == pytest.approx(0.5) and fit.slope == pytest.approx(0.25)
    with pytest.raises(ValueError):
        LinearCost.fit([1, 1], [1, 2])


# --------------------------------------------------------------------------- routers under data parallelism
def test_router_fitted_per_process_is_refused():
    from moekit import MoE
    from moekit.parallel import ParallelLayout, expert_parallel

    layer = MoE(dim=8, num_experts=4, top_k=1, hidden_dim=8, router="mixer", aux_loss=None)
    with pytest.raises(ValueError, match="cannot run on 2 processes"):
        expert_parallel(layer, ParallelLayout(world_size=2, rank=0, ep_size=1))


@pytest.mark.parametrize("router,extra", [("topk", {}), ("top_any", {})])
def test_global_batch_losses_are_shares_of_the_global_batch(monkeypatch, router, extra):
    """Pretend the other ranks hold an identical batch (global counts doubled): every loss a router computes
    as a global-batch loss must then be exactly half of its single-process value, the keep loss of top_any
    included (it once was counted whole on every rank)."""
    import torch

    from moekit import MoE, balance

    torch.manual_seed(0)
    layer = MoE(dim=8, num_experts=4, top_k=2, hidden_dim=8, router=router, z_loss_coef=1e-3, **extra).train()
    x = torch.randn(2, 5, 8)
    torch.manual_seed(1)
    alone = {k: float(v) for k, v in layer.gate(x.reshape(-1, 8)).aux_losses.items()}
    monkeypatch.setattr(balance, "global_counts",
                        lambda counts, tokens, seqs, group: (2 * counts, 2 * tokens, 2 * seqs))
    layer.gate.data_group = object()
    torch.manual_seed(1)
    shared = {k: float(v) for k, v in layer.gate(x.reshape(-1, 8)).aux_losses.items()}
    assert set(alone) == set(shared) and len(alone) >= 2
    for name in alone:
        assert shared[name] == pytest.approx(alone[name] / 2, rel=1e-6), name
