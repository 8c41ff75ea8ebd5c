"""Simulation of Nguyen, Akbarian, Ho 2024, "Is Temperature Sample Efficient for Softmax Gaussian Mixture of
Experts?" (ICML 2024, arXiv:2401.13875): parameter-estimation error of the maximum-likelihood estimator vs
the sample size n, for a Gaussian MoE whose gate is the plain dense-to-sparse (temperature softmax) gate or
the activation dense-to-sparse gate.

    python benchmarks/activation_dts_simulation.py            # ~2 min on 2 cores
    python benchmarks/activation_dts_simulation.py --quick    # < 1 min

Model (2 experts, scalar covariate X ~ U[-2, 2]; expert 2 is the reference with gate logit 0):
    Y | X ~ G_1(X) N(a_1 X + b_1, nu_1) + G_2(X) N(a_2 X + b_2, nu_2)
    plain gate:       G = softmax([(beta_1 X + beta_0) / tau, 0])
    activation gate:  G = softmax([sigma(beta_1 X + beta_0) / tau, 0]),  sigma = tanh by default
Data are drawn from the model with the same gate as the one fitted (both exactly specified). The MLE is
found by L-BFGS from the true parameters perturbed by N(0, 0.25^2) noise (same perturbations for every n).
Error: the exactly-specified Voronoi loss, which for matched components reduces (up to constants) to the sum
of absolute parameter errors |d beta_1| + |d beta_0| + |d tau| + sum_i (|d a_i| + |d b_i| + |d nu_i|).

What was checked in the paper (abstract and summary, via the ``search`` tool): the gate forms, the claim
(plain gate: slower than any polynomial rate, as slow as O(1/log n), caused by the interaction between tau
and the gate parameters through a PDE; activation gate: polynomial rates, density at n^-1/2) and that a
simulation study validates it. Not checked [recon]: the paper's exact simulation setup (dimensions, true
parameters, EM vs gradient fitting, the n grid), which this script chooses itself. For the plain gate the
interaction is exact here: the gate only depends on (beta_1 / tau, beta_0 / tau), so (beta, tau) are not
separately identifiable and their error does not shrink with n; the script also prints the error of the
identifiable ratios as a control.

Prints a table, the fitted log-log slopes and the verdict; writes benchmarks/activation_dts_simulation.png.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

from moekit.routing.dense_to_sparse import GATE_ACTIVATIONS

NAMES = ("beta1", "beta0", "log_tau", "a1", "a2", "b1", "b2", "log_nu1", "log_nu2")
TRUE = {"beta1": 1.0, "beta0": 0.3, "tau": 0.5, "a1": 1.0, "a2": -1.0, "b1": 0.5, "b2": -0.5,
        "nu1": 0.1, "nu2": 0.1}


def true_vector() -> torch.Tensor:
    t = TRUE
    return torch.tensor([t["beta1"], t["beta0"], math.log(t["tau"]), t["a1"], t["a2"], t["b1"], t["b2"],
                         math.log(t["nu1"]), math.log(t["nu2"])], dtype=torch.float64)


def gate_logit(theta: torch.Tensor, x_N: torch.Tensor, gate: str, activation: str) -> torch.Tensor:
    """Logit of expert 1 against the reference expert 2."""
    lin_N = theta[0] * x_N + theta[1]
    if gate == "activation":
        lin_N = GATE_ACTIVATIONS[activation](lin_N)
    return lin_N / theta[2].exp()


def log_likelihood(theta: torch.Tensor, x_N: torch.Tensor, y_N: torch.Tensor, gate: str, activation: str):
    logit_N = gate_logit(theta, x_N, gate, activation)
    log_g_N2 = torch.log_softmax(torch.stack([logit_N, torch.zeros_like(logit_N)], dim=1), dim=1)
    mean_N2 = torch.stack([theta[3] * x_N + theta[5], theta[4] * x_N + theta[6]], dim=1)
    log_nu_2 = theta[7:9]
    log_pdf_N2 = -0.5 * (math.log(2 * math.pi) + log_nu_2 + (y_N[:, None] - mean_N2).square() / log_nu_2.exp())
    return torch.logsumexp(log_g_N2 + log_pdf_N2, dim=1).mean()


def sample(n: int, gate: str, activation: str, generator: torch.Generator):
    theta = true_vector()
    x_N = torch.rand(n, generator=generator, dtype=torch.float64) * 4 - 2
    p1_N = torch.sigmoid(gate_logit(theta, x_N, gate, activation))
    first_N = torch.rand(n, generator=generator, dtype=torch.float64) < p1_N
    mean_N = torch.where(first_N, theta[3] * x_N + theta[5], theta[4] * x_N + theta[6])
    std_N = torch.where(first_N, theta[7], theta[8]).mul(0.5).exp()
    return x_N, mean_N + std_N * torch.randn(n, generator=generator, dtype=torch.float64)


def fit(x_N, y_N, init: torch.Tensor, gate: str, activation: str, max_iter: int) -> torch.Tensor:
    theta = init.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=max_iter, tolerance_grad=1e-11, tolerance_change=1e-15,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -log_likelihood(theta, x_N, y_N, gate, activation)
        loss.backward()
        return loss

    opt.step(closure)
    return theta.detach()


def natural(theta: torch.Tensor) -> torch.Tensor:
    """(beta1, beta0, tau, a1, a2, b1, b2, nu1, nu2)."""
    out = theta.clone()
    out[2] = theta[2].exp()
    out[7:9] = theta[7:9].exp()
    return out


def errors(theta_hat: torch.Tensor) -> dict[str, float]:
    est, true = natural(theta_hat), natural(true_vector())
    diff = (est - true).abs()
    ratio_err = float((est[:2] / est[2] - true[:2] / true[2]).abs().sum())
    return {"voronoi": float(diff.sum()), "gate": float(diff[:3].sum()), "ratio": ratio_err}


def slope(ns, values) -> float:
    return float(np.polyfit(np.log(ns), np.log(values), 1)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer sample sizes and replicates (< 1 min)")
    parser.add_argument("--n-min", type=int, default=None)
    parser.add_argument("--n-max", type=int, default=None)
    parser.add_argument("--num-n", type=int, default=None, help="sample sizes on a log grid")
    parser.add_argument("--reps", type=int, default=None, help="replicates per sample size")
    parser.add_argument("--activation", default="tanh", choices=sorted(GATE_ACTIVATIONS))
    parser.add_argument("--max-iter", type=int, default=400, help="L-BFGS iterations per fit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).with_suffix(".png")))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n_min = args.n_min or 1000
    n_max = args.n_max or (30_000 if args.quick else 200_000)
    num_n = args.num_n or (5 if args.quick else 9)
    reps = args.reps or (6 if args.quick else 20)
    ns = np.unique(np.round(np.geomspace(n_min, n_max, num_n)).astype(int))

    start = time.time()
    init_gen = torch.Generator().manual_seed(args.seed)
    inits = [true_vector() + 0.25 * torch.randn(len(NAMES), generator=init_gen, dtype=torch.float64)
             for _ in range(reps)]
    results = {gate: {key: np.zeros((len(ns), reps)) for key in ("voronoi", "gate", "ratio")}
               for gate in ("plain", "activation")}
    for gate in ("plain", "activation"):
        for i, n in enumerate(ns):
            for r in range(reps):
                gen = torch.Generator().manual_seed(args.seed * 1_000_003 + int(n) * 101 + r)
                x_N, y_N = sample(int(n), gate, args.activation, gen)
                theta_hat = fit(x_N, y_N, inits[r], gate, args.activation, args.max_iter)
                for key, value in errors(theta_hat).items():
                    results[gate][key][i, r] = value

    print(f"Gaussian MoE, 2 experts, X ~ U[-2, 2], sigma = {args.activation}; {reps} replicates per n; "
          f"{time.time() - start:.0f} s")
    print(f"{'n':>8} | {'plain: Voronoi':>15} {'plain: (beta,tau)':>18} {'plain: beta/tau':>16} | "
          f"{'activation: Voronoi':>20} {'activation: (beta,tau)':>23}")
    for i, n in enumerate(ns):
        p, a = results["plain"], results["activation"]
        print(f"{n:>8} | {p['voronoi'][i].mean():>15.4g} {p['gate'][i].mean():>18.4g} {p['ratio'][i].mean():>16.4g} | "
              f"{a['voronoi'][i].mean():>20.4g} {a['gate'][i].mean():>23.4g}")
    slopes = {(gate, key): slope(ns, results[gate][key].mean(axis=1))
              for gate in results for key in ("voronoi", "gate", "ratio")}
    print("log-log slopes of the mean error vs n (n^-1/2 is -0.5):")
    print(f"  plain temperature softmax: Voronoi {slopes['plain', 'voronoi']:+.3f}, gate (beta, tau) "
          f"{slopes['plain', 'gate']:+.3f}, identifiable beta/tau {slopes['plain', 'ratio']:+.3f}")
    print(f"  activation gate ({args.activation}):   Voronoi {slopes['activation', 'voronoi']:+.3f}, gate (beta, tau) "
          f"{slopes['activation', 'gate']:+.3f}")
    better = slopes["activation", "voronoi"] < slopes["plain", "voronoi"] - 0.1
    print(f"activation gate's rate beats plain temperature softmax: {'YES' if better else 'NO'} "
          f"(slope {slopes['activation', 'voronoi']:+.3f} vs {slopes['plain', 'voronoi']:+.3f})")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for ax, key, title in ((axes[0], "voronoi", "all parameters (Voronoi loss)"),
                           (axes[1], "gate", "gate parameters (beta, tau)")):
        for gate, color in (("plain", "tab:red"), ("activation", "tab:blue")):
            vals = results[gate][key]
            mean = vals.mean(axis=1)
            sem = vals.std(axis=1, ddof=1) / math.sqrt(vals.shape[1]) if vals.shape[1] > 1 else 0 * mean
            ax.errorbar(ns, mean, yerr=[np.minimum(sem, 0.9 * mean), sem], fmt="o", color=color, capsize=3, ms=4)
            coef = np.polyfit(np.log(ns), np.log(mean), 1)
            label = "temperature softmax" if gate == "plain" else f"activation ({args.activation})"
            ax.plot(ns, np.exp(np.polyval(coef, np.log(ns))), "-", color=color,
                    label=f"{label}: slope {coef[0]:+.2f}")
        if key == "voronoi":
            mean = results["plain"]["ratio"].mean(axis=1)
            coef = np.polyfit(np.log(ns), np.log(mean), 1)
            ax.plot(ns, mean, "s--", color="gray", ms=3, label=f"softmax, identifiable beta/tau: slope {coef[0]:+.2f}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("sample size n")
        ax.set_ylabel("mean absolute parameter error (+- s.e.)")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.suptitle("MLE error vs n: dense-to-sparse gate, plain vs activation (Nguyen et al. 2024)")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
