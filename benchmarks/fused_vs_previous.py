"""The fused experts function against the one it replaced, in one run: ``FusedExperts`` (dispatch/fused.py)
vs ``GroupedGLUDispatch`` as it stood in ``src/moekit/dispatch/local.py`` at ``--rev`` (read with ``git show``).

    python benchmarks/fused_vs_previous.py                 # olmoe, mixtral and decode shapes of `moekit bench`
    python benchmarks/fused_vs_previous.py --rounds 31

Forward + backward of the experts path alone (gather, experts, weights, scatter-add) on identical inputs,
float32 on the CPU; the two alternate within each round (order swapped every round) and the medians over
the rounds after three warm-up rounds are compared.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

from moekit.bench import SHAPES
from moekit.dispatch.fused import ActivationSpec, fused_experts
from moekit.dispatch.plan import make_plan
from moekit.experts.activations import get_activation
from moekit.routing.base import Routing

PREVIOUS_REV = "15fa690"  # the last commit with GroupedGLUDispatch in dispatch/local.py


def previous_function(rev: str):
    root = Path(__file__).resolve().parent.parent
    source = subprocess.run(["git", "-C", str(root), "show", f"{rev}:src/moekit/dispatch/local.py"],
                            capture_output=True, text=True, check=True).stdout
    source = source.replace("from .grouped import", "from moekit.dispatch.grouped import")
    source = source.replace("from .plan import", "from moekit.dispatch.plan import")
    module = types.ModuleType("previous_local")
    exec(compile(source, f"{rev}:src/moekit/dispatch/local.py", "exec"), module.__dict__)
    return module.GroupedGLUDispatch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", default=PREVIOUS_REV)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    previous = previous_function(args.rev)
    act = get_activation("swiglu")
    gate = ActivationSpec.from_activation(act)
    print(f"| shape | previous ({args.rev}) fwd+bwd | FusedExperts fwd+bwd | new / previous |")
    print("|---|---|---|---|")
    for name, shape in SHAPES.items():
        torch.manual_seed(0)
        tokens, dim, hidden, experts, top_k = (shape[k] for k in ("tokens", "dim", "hidden", "experts", "top_k"))
        x = torch.randn(tokens, dim, requires_grad=True)
        up = (torch.randn(experts, 2 * hidden, dim) * 0.02).requires_grad_()
        down = (torch.randn(experts, dim, hidden) * 0.02).requires_grad_()
        ids = torch.stack([torch.randperm(experts)[:top_k] for _ in range(tokens)])
        plan = make_plan(Routing.from_topk(ids, torch.rand(tokens, top_k), experts))
        weight_S = plan.weight_S.detach().requires_grad_()
        grad = torch.randn(tokens, dim)

        def run_previous():
            previous.apply(x, plan.token_S, weight_S, plan.offsets_E, up, down, act).backward(grad)

        def run_new():
            fused_experts(x, plan.token_S, weight_S, plan.expert_S, plan.offsets_E, up, down, gate).backward(grad)

        times = {"previous": [], "new": []}
        rounds = args.rounds if tokens > 100 else args.rounds * 10
        for i in range(rounds + 3):
            order = (("previous", run_previous), ("new", run_new))
            for key, fn in (order if i % 2 else order[::-1]):
                start = time.perf_counter()
                fn()
                if i >= 3:
                    times[key].append(time.perf_counter() - start)
        old, new = statistics.median(times["previous"]), statistics.median(times["new"])
        print(f"| {name} | {old * 1e3:.2f} ms | {new * 1e3:.2f} ms | {new / old:.3f} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
