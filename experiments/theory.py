"""Numerical checks of every statement of paper §3.2 / Appendix A, in float64.

    python -m experiments.theory [--json] [--seed N] [--instances N]

Each check is a row (check, measured, tolerance, pass) of a printed table (or of the
``--json`` document); informative rows have no pass/fail. The exit status is 1 if any check
fails.

Instances. For each (V, d) in ``--shapes`` (default :data:`CONFIGS`), ``--instances``
random examples: features φ ~ N(0, I/d) (so μ = ‖φ‖² ≈ 1), head W with i.i.d. N(0, 1.5²)
entries (logits of spread ≈ 1.5, every p_i well inside (0, 1)), and a uniform random label.

Step sizes. The statements are asymptotic in η at a fixed instance. The instance enters
only through the logit step ημ and the logit-space SAM radius |ρ|√μ, so every step size is
set relative to the instance: |η| = s/μ with ρ = ±κ√|η| (Thm A.2 (2)); then the logit step
is s(g + ρ̃H_z g) with ρ̃ = ±κ√s/‖g‖ whatever μ is. The O(η²) slopes are fitted over
s ∈ :data:`STEP_GRID` (1e-2 … 1e-5); the one-step inequalities use s = :data:`SMALL_STEP`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dynamics import softmax_regression as sr
from dynamics import theory

CONFIGS: tuple[tuple[int, int], ...] = ((2, 3), (3, 16), (5, 8), (10, 4))  # (V, d)
LOGIT_SCALE = 1.5
KAPPA = 1.0
STEP_GRID = np.geomspace(1e-2, 1e-5, 10)  # s = |η| μ
SMALL_STEP = 1e-3
SLOPE_TOL = 0.15
# (sign η, sign ρ): both descent directions, SAM radius of either sign.
SIGNS = ((1.0, 1.0), (1.0, -1.0), (-1.0, 1.0), (-1.0, -1.0))
EXACT = 1e-12  # float64 identities: errors are rounding only
RANK_RTOL = 1e-9


class Instances(NamedTuple):
    """A batch of single-example problems: φ (n, d), W (n, V, d), one-hot y (n, V)."""

    phi: jax.Array
    W: jax.Array
    y: jax.Array


@dataclasses.dataclass(frozen=True)
class Row:
    check: str
    measured: float
    tolerance: str
    passed: bool | None  # None: informative
    detail: str = ""


def sample_instances(key: jax.Array, n: int, V: int, d: int) -> Instances:
    """``n`` random instances of shape (V, d); see the module docstring for the scales."""
    k_phi, k_w, k_y = jax.random.split(key, 3)
    phi = jax.random.normal(k_phi, (n, d)) / np.sqrt(d)
    W = LOGIT_SCALE * jax.random.normal(k_w, (n, V, d))
    y = jax.nn.one_hot(jax.random.randint(k_y, (n,), 0, V), V)
    return Instances(phi, W, y)


def step_sizes(phi: jax.Array, s, sign_eta, sign_rho) -> tuple[jax.Array, jax.Array]:
    """η = sign_η s/μ and ρ = sign_ρ κ√|η| for one instance."""
    eta = sign_eta * s / theory.feature_scale(phi)
    return eta, sign_rho * KAPPA * jnp.sqrt(jnp.abs(eta))


def loglog_slopes(s: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Least-squares slope of log(values) against log(s) along the last axis."""
    x = np.log(s) - np.log(s).mean()
    yv = np.log(values)
    return np.sum(x * (yv - yv.mean(axis=-1, keepdims=True)), axis=-1) / np.sum(x * x)


def numerical_rank(M: jax.Array) -> jax.Array:
    """Number of singular values above ``RANK_RTOL`` times the largest."""
    sv = jnp.linalg.svd(M, compute_uv=False)
    return jnp.sum(sv > RANK_RTOL * sv[0])


# --- per-instance computations (vmapped below) ------------------------------------------


def _prop31(phi, y, W, dW, v):
    V, d = W.shape
    dense = jax.hessian(lambda w: sr.loss(w, phi, y))(W).reshape(V * d, V * d)
    p = jax.nn.softmax(sr.logits(W, phi))
    matvec = sr.param_hessian_vp(p, phi, dW).reshape(-1)
    return {
        "kron": jnp.max(jnp.abs(dense - sr.param_hessian(p, phi))),
        "rank_W": numerical_rank(dense),
        "rank_z": numerical_rank(sr.logit_hessian(p)),
        "operator": jnp.max(jnp.abs(dense @ dW.reshape(-1) - matvec)),
        "adjoint": jnp.abs(
            jnp.vdot(sr.T_phi(dW, phi), v) - jnp.vdot(dW, sr.T_phi_adjoint(v, phi))
        ),
    }


def _prop33(phi, y, W):
    p = jax.nn.softmax(sr.logits(W, phi))
    g = p - y
    H = sr.logit_hessian(p)
    lam, v = sr.eigenbasis(p)
    V = p.shape[-1]
    return {
        "sum_g": jnp.abs(jnp.sum(g)),
        "kernel": jnp.max(jnp.abs(H @ jnp.ones(V))),
        "min_eig": jnp.min(jnp.linalg.eigvalsh(H)),
        "lam_min": jnp.min(lam) / jnp.max(lam),
        "orthonormal": jnp.max(jnp.abs(v.T @ v - jnp.eye(V - 1))),
        "perp": jnp.max(jnp.abs(jnp.sum(v, axis=0))),
        "reconstruct": jnp.max(jnp.abs((v * lam) @ v.T - H)),
        "expand": jnp.max(jnp.abs(v @ sr.modal_coefficients(g, v) - g)),
    }


def _remainder_sweep(phi, y, W):
    """Remainders and the Cor A.5 α-prediction error over SIGNS × STEP_GRID: (4, G) each."""

    def one(s, sign_eta, sign_rho):
        eta, rho = step_sizes(phi, s, sign_eta, sign_rho)
        r = theory.remainders(phi, y, W, eta, rho)
        alpha = theory.confidence_ratios(phi, y, W, eta, rho)
        alpha_hat = theory.predicted_confidence_ratios(phi, y, W, eta, rho)
        gd = theory.remainders(phi, y, W, eta, 0.0)
        return r, jnp.max(jnp.abs(alpha - alpha_hat)), gd.W

    signs = jnp.asarray(SIGNS)
    over_s = jax.vmap(one, (0, None, None))
    return jax.vmap(over_s, (None, 0, 0))(jnp.asarray(STEP_GRID), signs[:, 0], signs[:, 1])


def _ratios(phi, y, W, sign_eta, sign_rho):
    eta, rho = step_sizes(phi, SMALL_STEP, sign_eta, sign_rho)
    r = theory.squeeze_ratios(phi, y, W, eta, rho)
    return {
        "star_gd": r.gd[r.y_star],
        "star_sam": r.sam[r.y_star],
        "y_gd": r.gd[r.label],
        "y_sam": r.sam[r.label],
        "p_star": r.p[r.y_star],
        "p_y": r.p[r.label],
    }


_prop31_batch = jax.jit(jax.vmap(_prop31))
_prop33_batch = jax.jit(jax.vmap(_prop33))
_sweep_batch = jax.jit(jax.vmap(_remainder_sweep))
_ratios_batch = jax.jit(jax.vmap(_ratios, (0, 0, 0, None, None)))


def _concat(results: list[dict]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([np.asarray(r[k]).ravel() for r in results]) for k in results[0]}


# --- the checks ---------------------------------------------------------------------------


def check_prop31(data: dict, key: jax.Array) -> list[Row]:
    out = []
    for (V, d), inst in data.items():
        key, k1, k2 = jax.random.split(key, 3)
        n = inst.phi.shape[0]
        dW = jax.random.normal(k1, (n, V, d))
        v = jax.random.normal(k2, (n, V))
        res = _prop31_batch(inst.phi, inst.y, inst.W, dW, v)
        out.append({**res, "rank_ok": (res["rank_W"] == V - 1) & (res["rank_z"] == V - 1)})
    r = _concat(out)
    shapes = ", ".join(f"V={V},d={d}" for V, d in data)
    return [
        Row("Prop 3.1: jax.hessian(F) = H_z ⊗ φφᵀ (max abs err)", r["kron"].max(),
            f"≤ {EXACT:g}", bool(r["kron"].max() <= EXACT), shapes),
        Row("Prop 3.1: rank H_W = rank H_z = V−1 (fraction)", r["rank_ok"].mean(),
            "= 1", bool(r["rank_ok"].all()), f"numerical rank, rtol {RANK_RTOL:g}"),
        Row("Prop A.1(2): H_W vec(ΔW) = H_z ΔW φφᵀ (max abs err)", r["operator"].max(),
            f"≤ {EXACT:g}", bool(r["operator"].max() <= EXACT)),
        Row("Prop A.1: <T_φ ΔW, v> = <ΔW, T_φ* v>_F (max abs err)", r["adjoint"].max(),
            f"≤ {EXACT:g}", bool(r["adjoint"].max() <= EXACT)),
    ]


def check_prop33(data: dict) -> list[Row]:
    r = _concat([_prop33_batch(i.phi, i.y, i.W) for i in data.values()])

    def exact(name, key):
        return Row(name, r[key].max(), f"≤ {EXACT:g}", bool(r[key].max() <= EXACT))

    return [
        exact("Prop 3.3: 1ᵀg = 0 (max |1ᵀg|)", "sum_g"),
        exact("Prop 3.3: H_z 1 = 0 (max abs)", "kernel"),
        Row("Prop 3.3: H_z PSD (min eigenvalue)", r["min_eig"].min(), f"≥ −{EXACT:g}",
            bool(r["min_eig"].min() >= -EXACT)),
        Row("Prop 3.3: λ_k > 0 on 1^⊥ (min λ_min/λ_max)", r["lam_min"].min(),
            f"> {RANK_RTOL:g}", bool(r["lam_min"].min() > RANK_RTOL)),
        exact("Prop 3.3: eigenbasis orthonormal (max |VᵀV − I|)", "orthonormal"),
        exact("Prop 3.3: eigenbasis ⊥ 1 (max |1ᵀv_k|)", "perp"),
        exact("Prop 3.3: Σ λ_k v_k v_kᵀ = H_z (max abs err)", "reconstruct"),
        exact("Prop 3.3: g = Σ e_k v_k (max abs err)", "expand"),
    ]


def check_remainders(data: dict) -> list[Row]:
    rems, alpha_errs, gd_W = [], [], []
    for inst in data.values():
        r, a, g = _sweep_batch(inst.phi, inst.y, inst.W)
        rems.append(r)
        alpha_errs.append(np.asarray(a))
        gd_W.append(np.asarray(g))
    quantities = {
        "Thm 3.2: R_W": [np.asarray(r.W) for r in rems],
        "Thm 3.2: r_z": [np.asarray(r.z) for r in rems],
        "Thm 3.2: r_g": [np.asarray(r.g) for r in rems],
        "Cor 3.4: modal r_k (max_k)": [np.asarray(r.modes) for r in rems],
        "Cor A.5: α prediction (max_i)": alpha_errs,
    }
    rows = []
    for name, values in quantities.items():
        # Medians per shape and sign pair: pooled over shapes, an error confined to one
        # shape would hide behind the others' slopes.
        per_shape = np.stack([np.median(loglog_slopes(STEP_GRID, v), axis=0) for v in values])
        shape, sign = np.unravel_index(np.argmax(np.abs(per_shape - 2.0)), per_shape.shape)
        worst = per_shape[shape, sign]
        slopes = loglog_slopes(STEP_GRID, np.concatenate(values))  # (N, 4)
        p10, p90 = np.percentile(slopes, [10, 90])
        detail = "pooled medians " + " ".join(
            f"(η{'+' if se > 0 else '−'},ρ{'+' if sr_ > 0 else '−'})={m:.3f}"
            for (se, sr_), m in zip(SIGNS, np.median(slopes, axis=0))
        ) + f"; p10..p90 {p10:.2f}..{p90:.2f}; worst shape {list(data)[shape]}"
        rows.append(Row(f"{name} log-log slope in η (worst shape's median)", float(worst),
                        f"2 ± {SLOPE_TOL}", bool(abs(worst - 2.0) <= SLOPE_TOL), detail))
    gd = float(np.concatenate(gd_W).max())
    rows.append(Row("Thm 3.2, ρ=0: GD is exact in W (max ‖R_W‖)", gd, f"≤ {EXACT:g}",
                    bool(gd <= EXACT)))
    return rows


def check_ratios(data: dict) -> list[Row]:
    def ratios(sign_eta, sign_rho):
        return _concat([_ratios_batch(i.phi, i.y, i.W, sign_eta, sign_rho)
                        for i in data.values()])

    lemma = ratios(-1.0, -1.0)
    rows = [
        Row("Lemma 3.5 (η<0): α_{y*}^GD > 1 (fraction)", (lemma["star_gd"] > 1).mean(),
            "= 1", bool((lemma["star_gd"] > 1).all())),
        Row("Lemma 3.5 (η<0): α_{y⁻}^GD < 1 (fraction)", (lemma["y_gd"] < 1).mean(),
            "= 1", bool((lemma["y_gd"] < 1).all())),
    ]
    for sign_eta in (1.0, -1.0):
        label = "y⁺" if sign_eta > 0 else "y⁻"
        signs = f"η{'>' if sign_eta > 0 else '<'}0"
        r = ratios(sign_eta, sign_eta)
        holds = (r["star_sam"] <= r["star_gd"]) & (r["y_sam"] >= r["y_gd"])
        strict = (r["star_sam"] < r["star_gd"]) & (r["y_sam"] > r["y_gd"])
        cond = (r["p_star"] > 0) & (r["p_star"] < 1) & (r["p_y"] <= 0.5)
        strict_frac = float(strict[cond].mean()) if cond.any() else 1.0
        rows += [
            Row(f"Cor 3.6 ({signs}, ηρ>0): α_{{y*}}^SAM ≤ α_{{y*}}^GD, "
                f"α_{label}^SAM ≥ α_{label}^GD (fraction)", holds.mean(), "= 1",
                bool(holds.all())),
            Row(f"Cor 3.6 ({signs}, ηρ>0): strict where p_y* ∈ (0,1), p_y ≤ 1/2 (fraction)",
                strict_frac, "= 1", strict_frac == 1.0, f"{int(cond.sum())} instances"),
        ]
        f = ratios(sign_eta, -sign_eta)
        rev = (f["star_sam"] >= f["star_gd"]) & (f["y_sam"] <= f["y_gd"])
        rows.append(Row(f"Cor 3.6 flip side ({signs}, ηρ<0): inequalities reverse (fraction)",
                        rev.mean(), "informative", None))
    return rows


def run_checks(seed: int, instances: int, shapes=CONFIGS) -> list[Row]:
    """All checks on ``instances`` random examples per (V, d) in ``shapes``."""
    key = jax.random.PRNGKey(seed)
    data = {}
    for V, d in shapes:
        key, sub = jax.random.split(key)
        data[(V, d)] = sample_instances(sub, instances, V, d)
    return (check_prop31(data, key) + check_prop33(data) + check_remainders(data)
            + check_ratios(data))


# --- command line -------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, naming the flag; no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _shapes(text: str) -> tuple[tuple[int, int], ...]:
    """Distinct ``(V, d)`` pairs from ``"VxD,VxD,..."``; a repeat is refused, since the
    checks key their instances by shape and would run it once but list it twice."""
    shapes = []
    for item in text.split(","):
        V, sep, d = item.strip().lower().partition("x")
        if not (sep and V.isdigit() and d.isdigit() and int(V) >= 2 and int(d) >= 1):
            raise argparse.ArgumentTypeError(
                f"expected comma-separated VxD with V ≥ 2 and D ≥ 1 (e.g. 3x16), got {item!r}"
            )
        if (int(V), int(d)) in shapes:
            raise argparse.ArgumentTypeError(f"{item.strip()!r} is given twice")
        shapes.append((int(V), int(d)))
    return tuple(shapes)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _Parser(
        prog="python -m experiments.theory",
        description="Numerical checks of Prop 3.1/A.1, Prop 3.3, Thm 3.2/A.2, Cor 3.4, "
        "Lemma 3.5 and Cor 3.6/A.5 (float64). Exit status 1 if any check fails.",
    )
    parser.add_argument("--json", action="store_true", help="print machine-readable results")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed (default 0)")
    parser.add_argument("--instances", type=_positive_int, default=64,
                        help="random instances per (V, d) configuration (default 64)")
    parser.add_argument("--shapes", type=_shapes, default=CONFIGS, metavar="VxD[,VxD...]",
                        help="(classes, feature dim) configurations (default "
                        + ",".join(f"{V}x{d}" for V, d in CONFIGS) + ")")
    return parser.parse_args(argv)


def _table(rows: list[Row]) -> str:
    verdict = {True: "PASS", False: "FAIL", None: "info"}
    cells = [(r.check, f"{r.measured:.4g}", r.tolerance, verdict[r.passed]) for r in rows]
    widths = [max(len(c[i]) for c in cells + [("check", "measured", "tolerance", "pass")])
              for i in range(4)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format("check", "measured", "tolerance", "pass")]
    for r, c in zip(rows, cells):
        lines.append(fmt.format(*c) + (f"  {r.detail}" if r.detail else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    jax.config.update("jax_enable_x64", True)
    rows = run_checks(args.seed, args.instances, args.shapes)
    ok = all(r.passed is not False for r in rows)
    if args.json:
        doc = {
            "seed": args.seed,
            "instances_per_config": args.instances,
            "configs": [{"V": V, "d": d} for V, d in args.shapes],
            "step_grid": STEP_GRID.tolist(),
            "small_step": SMALL_STEP,
            "kappa": KAPPA,
            "passed": ok,
            "rows": [
                {"check": r.check, "measured": float(r.measured), "tolerance": r.tolerance,
                 "pass": r.passed, "detail": r.detail}
                for r in rows
            ],
        }
        print(json.dumps(doc, indent=2, ensure_ascii=False))
    else:
        print(_table(rows))
        print(f"\n{sum(r.passed is True for r in rows)} passed, "
              f"{sum(r.passed is False for r in rows)} failed, "
              f"{sum(r.passed is None for r in rows)} informative")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
