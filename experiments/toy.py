"""Figure 1(a, b): the squeezing effect in the fixed-feature toy, and its (η, ρ) phase diagram.

    python -m experiments.toy --rho -0.01            # fig1a_modal.png, fig1b_residuals.png, metrics.json
    python -m experiments.toy --sweep                # sweep_phase.png, sweep.json (+ NumPy timing)

From one SFT'd start (label 0, positive lr) the label-1 phase runs with the signed ``--lr``
under GD and SAM with ρ = ±|--rho|; SAM with ρ of the lr's sign restrains the most confident
incorrect class y* and slows the fall of y⁻ (paper §3.2, Cor 3.6). ``--sweep`` runs one
vmapped, jitted grid of signed (η, ρ) and maps end log p relative to GD at the same η.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import SymLogNorm  # noqa: E402
import numpy as np  # noqa: E402

from dynamics import toy  # noqa: E402
from experiments import _cli  # noqa: E402

_RUN_COLORS = {"GD": "0.2", "same": "tab:blue", "opposite": "tab:red"}
_STYLES = ("-", "--", ":", "-.")


def _color(label: str) -> str:
    if label == "GD":
        return _RUN_COLORS["GD"]
    return _RUN_COLORS["same" if "same sign" in label else "opposite"]


def y_star(probs: np.ndarray, y_minus: int = toy.Y_MINUS) -> int:
    """The most confident incorrect class argmax_{j ≠ y⁻} p_j of one probability vector."""
    masked = np.where(np.arange(probs.shape[-1]) == y_minus, -np.inf, probs)
    return int(np.argmax(masked))


def plot_modal(ax, runs: dict[str, toy.Trajectory], minus_gd: bool = False) -> None:
    """Panel (a): modal coefficients e_k (eq. 4) of example 0 vs step, one color per run.

    ``minus_gd`` plots e_k − e_k(GD) instead, where the SAM corrections stand out.
    """
    base = np.asarray(runs["GD"].modal[:, 0]) if minus_gd else 0.0
    for label, traj in runs.items():
        modal = np.asarray(traj.modal[:, 0]) - base
        for k in range(modal.shape[-1]):
            ax.plot(modal[:, k], _STYLES[k % 4], color=_color(label), label=f"{label}: e_{k + 1}")
    ylabel = "$e_k - e_k^{GD}$" if minus_gd else "modal coefficient $e_k = v_k^T g$"
    title = "(a) modal coefficients" + (" relative to GD" if minus_gd else "")
    ax.set(xlabel="step", ylabel=ylabel, title=title)
    ax.legend(fontsize=6)


def plot_residuals(ax, runs: dict[str, toy.Trajectory], log_probs: bool = False) -> None:
    """Panel (b): class residuals g_k = p_k − y_k of example 0 (or log p_k) vs step."""
    for label, traj in runs.items():
        values = np.asarray(traj.probs[:, 0] if log_probs else traj.residuals[:, 0])
        for k in range(values.shape[-1]):
            ax.plot(values[:, k], _STYLES[k % 4], color=_color(label), label=f"{label}: class {k}")
    if log_probs:
        ax.set_yscale("log")
    ylabel = "probability $p_k$" if log_probs else "residual $g_k = p_k - y_k$"
    ax.set(xlabel="step", ylabel=ylabel, title="(b) class " + ("probabilities" if log_probs else "residuals"))
    ax.legend(fontsize=6)



def _save_panels(path, plot, runs, **variant):
    """Two panels side by side: ``plot(ax, runs)`` and ``plot(ax, runs, **variant)``."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    plot(axes[0], runs)
    plot(axes[1], runs, **variant)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

def figure1(config: toy.ToyConfig, out) -> dict:
    """Run GD / SAM(±|ρ|) from one SFT'd start; save both panels and metrics.json."""
    W, phi = toy.setup(config)
    runs = toy.sign_rule_runs(config, W, phi)
    start = np.asarray(toy.probs(W, phi))[0]
    rhos = {toy.run_label(rho, config.lr): rho for rho in toy.sign_rule_rhos(config)}
    metrics = {
        "config": dataclasses.asdict(config),
        "y_minus": toy.Y_MINUS,
        "y_star": y_star(start),
        "runs": {
            label: {
                "rho": float(rhos[label]),
                "lr": float(config.lr),
                "probs": np.asarray(traj.probs[:, 0], np.float64).tolist(),
                "modal": np.asarray(traj.modal[:, 0], np.float64).tolist(),
            }
            for label, traj in runs.items()
        },
    }
    _save_panels(out / "fig1a_modal.png", plot_modal, runs, minus_gd=True)
    _save_panels(out / "fig1b_residuals.png", plot_residuals, runs, log_probs=True)
    (out / "metrics.json").write_text(json.dumps(metrics))
    return metrics


def print_table(metrics: dict) -> None:
    ys, ym = metrics["y_star"], metrics["y_minus"]
    print(f"end of the label-{ym} phase (lr={metrics['config']['lr']:g}); y*={ys}, y-={ym}")
    print(f"{'run':<40} {'p[y*]':>10} {'p[y-]':>10}   all p")
    for label, run in metrics["runs"].items():
        p = run["probs"][-1]
        print(f"{label:<40} {p[ys]:>10.5f} {p[ym]:>10.5f}   " + " ".join(f"{x:.4f}" for x in p))


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def sweep(config: toy.ToyConfig, grid: int, repeats: int, out) -> dict:
    """The phase diagram over η ∈ ±2|lr|, ρ ∈ ±3|ρ| (grid × grid), timed against NumPy.

    Colour: end log p(η, ρ) − log p(η, 0) for y* and y⁻. The sign rule reads as the
    quadrants: ηρ > 0 lowers y* and raises y⁻ (blue / red), ηρ < 0 the reverse.
    """
    W, phi = toy.setup(config)
    etas = np.linspace(-2 * abs(config.lr), 2 * abs(config.lr), grid, dtype=np.float32)
    rhos = np.linspace(-3 * abs(config.rho), 3 * abs(config.rho), grid, dtype=np.float32)
    args = (W, phi, toy.Y_MINUS, etas, rhos, config.steps)
    t0 = time.perf_counter()
    compiled = toy.run_sweep.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    run = lambda: compiled(W, phi, etas, rhos).block_until_ready()  # noqa: E731
    probs = np.asarray(run())[:, :, 0]
    jax_s = _median_time(run, repeats)
    W64, phi64 = np.asarray(W, np.float64), np.asarray(phi, np.float64)
    ref_out = []
    ref = lambda: ref_out.append(toy.reference_sweep(W64, phi64, toy.Y_MINUS, etas, rhos, config.steps))  # noqa: E731
    numpy_s = _median_time(ref, repeats)
    ref_probs = ref_out[-1][:, :, 0]

    ys = y_star(np.asarray(toy.probs(W, phi))[0])
    logp = np.log(probs)
    gd = logp[:, grid // 2 : grid // 2 + 1]
    delta = logp - gd
    result = {
        "config": dataclasses.asdict(config),
        "y_minus": toy.Y_MINUS,
        "y_star": ys,
        "etas": etas.tolist(),
        "rhos": rhos.tolist(),
        "end_probs": probs.tolist(),
        "delta_log_p_y_star": delta[:, :, ys].tolist(),
        "delta_log_p_y_minus": delta[:, :, toy.Y_MINUS].tolist(),
        "max_abs_diff_vs_numpy_float64": float(np.max(np.abs(probs - ref_probs))),
        "timing": {
            "jax_compile_s": compile_s,
            "jax_run_s": jax_s,
            "numpy_run_s": numpy_s,
            "speedup": numpy_s / jax_s,
            "repeats": repeats,
            "trajectories": grid * grid,
            "steps": config.steps,
        },
    }
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    extent = (rhos[0], rhos[-1], etas[0], etas[-1])
    for ax, cls, name in ((axes[0], ys, "y*"), (axes[1], toy.Y_MINUS, "y (y- if eta<0, y+ if eta>0)")):
        d = delta[:, :, cls]
        lim = float(np.max(np.abs(d))) or 1.0
        # Symmetric log: near-saturated p_{y*} moves little in log p, yet its sign is the point.
        norm = SymLogNorm(linthresh=min(1e-3, lim), vmin=-lim, vmax=lim)
        im = ax.imshow(d, origin="lower", aspect="auto", extent=extent, cmap="RdBu_r", norm=norm)
        ax.axhline(0, color="k", lw=0.5)
        ax.axvline(0, color="k", lw=0.5)
        ax.set(xlabel="rho", ylabel="eta (label-1 phase)")
        ax.set_title(f"log p[{name} = {cls}] - GD at same eta", fontsize=9)
        fig.colorbar(im, ax=ax)
    fig.suptitle(f"end of {config.steps} steps; same-sign quadrants (eta*rho > 0) mitigate squeezing")
    fig.tight_layout()
    fig.savefig(out / "sweep_phase.png", dpi=120)
    plt.close(fig)
    (out / "sweep.json").write_text(json.dumps(result))
    return result


def build_parser() -> _cli.ArgumentParser:
    d = toy.ToyConfig()
    p = _cli.ArgumentParser(
        prog="python -m experiments.toy",
        description="Figure 1(a, b): GD vs SAM(+|rho|) vs SAM(-|rho|) after SFT, with a signed lr.",
    )
    p.add_argument("--rho", type=_cli.nonzero_float, default=d.rho, help="SAM radius; runs use +|rho| and -|rho| (default %(default)s)")
    p.add_argument("--lr", type=_cli.nonzero_float, default=d.lr, help="signed lr of the label-1 phase; < 0 is the y- objective (default %(default)s)")
    p.add_argument("--sft-lr", type=_cli.positive_float, default=d.sft_lr, help="SFT lr on label 0 (default %(default)s)")
    p.add_argument("--steps", type=_cli.positive_int, default=d.steps, help="steps of the label-1 phase (default %(default)s)")
    p.add_argument("--sft-epochs", type=_cli.nonnegative_int, default=d.sft_epochs, help="SFT epochs on label 0 (default %(default)s)")
    p.add_argument("--dim", type=_cli.positive_int, default=d.dim, help="feature dimension d (default %(default)s)")
    p.add_argument("--classes", type=_cli.int_at_least(2), default=d.classes, help="number of classes V >= 2 (default %(default)s)")
    p.add_argument("--feature-norm", type=_cli.positive_float, default=d.feature_norm, help="||phi|| = sqrt(mu) (default %(default)s)")
    p.add_argument("--seed", type=_cli.nonnegative_int, default=d.seed, help="seed of phi and W0 (default %(default)s)")
    p.add_argument("--out", default="runs/toy", help="output directory (default %(default)s)")
    p.add_argument("--sweep", action="store_true", help="run the (eta, rho) phase diagram instead")
    p.add_argument("--grid", type=_cli.int_at_least(3), default=21, help="sweep grid size per axis, odd (default %(default)s)")
    p.add_argument("--repeats", type=_cli.positive_int, default=3, help="sweep timing repeats (default %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.sweep and args.grid % 2 == 0:
        parser.error(f"argument --grid: must be odd so that rho = 0 (GD) is on the grid, got {args.grid}")
    config = toy.ToyConfig(
        dim=args.dim,
        classes=args.classes,
        feature_norm=args.feature_norm,
        sft_epochs=args.sft_epochs,
        sft_lr=args.sft_lr,
        lr=args.lr,
        rho=args.rho,
        steps=args.steps,
        seed=args.seed,
    )
    out = _cli.writable_dir(args.out)
    if args.sweep:
        result = sweep(config, args.grid, args.repeats, out)
        t = result["timing"]
        print(
            f"sweep {args.grid}x{args.grid} (eta, rho), {config.steps} steps: "
            f"jax compile {t['jax_compile_s']:.2f} s, run {t['jax_run_s']:.4f} s (median of {args.repeats}); "
            f"numpy float64 loop {t['numpy_run_s']:.2f} s; speedup {t['speedup']:.0f}x; "
            f"max |p_jax - p_numpy| = {result['max_abs_diff_vs_numpy_float64']:.2e}"
        )
        print(f"wrote {out / 'sweep_phase.png'} and {out / 'sweep.json'}")
    else:
        print_table(figure1(config, out))
        print(f"wrote {out / 'fig1a_modal.png'}, {out / 'fig1b_residuals.png'}, {out / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
