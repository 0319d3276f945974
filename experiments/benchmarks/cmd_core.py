"""CMD core benchmark: clustering robustness on planted modes, and speed/memory at ResNet-18 scale.

1. Robustness. Trajectories are affine copies of M = 10 training-like profiles plus white noise,
   N = 20,000, T = 21, K = 1000. "a ~ N(0,1)": a few percent of the weights move less than the
   noise (as in real networks); "|a| in [0.5, 2]": every weight moves. Mode agreement (best
   one-to-one relabelling) and reconstruction RMSE for each clustering, over 5 seeds; "oracle"
   assigns every weight to the true profile it correlates with most (the ceiling at that noise).
2. Scale. N = 11.2M (ResNet-18), T = 21, M = 10, K = 1000: fit_cmd wall time; peak extra memory
   during fit_cmd, as tracemalloc's peak of traced allocations (numpy reports its buffers) and as
   the rise of the process's peak RSS (VmHWM, reset through /proc/self/clear_refs); time of one
   OnlineCMD.observe after warm-up (median of 5, without and with 40% of the weights frozen);
   model_weights; one EmbeddingSchedule event; state bytes per weight. Then a fit on N = 2^24 + 3
   weights whose references lie beyond 2^24 (float32 indices would break there).

    .venv/bin/python experiments/benchmarks/cmd_core.py [--quick]
        [--out experiments/benchmarks/results/cmd_core.json]   (also writes the .md beside it)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import tracemalloc
from pathlib import Path

import numpy as np
import scipy
from scipy.optimize import linear_sum_assignment

from fedcmd.cmd import EmbeddingSchedule, OnlineCMD, fit_cmd

CLUSTERINGS = {
    "pam (default)": {},
    "authors: complete linkage, rows of |corr|": {"clustering": "hierarchical"},
    "average linkage, 1 - |corr|": {"clustering": "hierarchical", "linkage": "average", "features": "correlation"},
}


# ----------------------------------------------------------------------------------- planted data


def profiles(n_modes: int, n_snapshots: int, rng: np.random.Generator) -> np.ndarray:
    """Training-like time profiles: a decay, an oscillation and a random walk, standardised."""
    t = np.linspace(0.0, 1.0, n_snapshots)
    rows = []
    for _ in range(n_modes):
        p = (
            rng.normal() * np.exp(-t / rng.uniform(0.05, 1.0))
            + 0.5 * rng.normal() * np.sin(2 * np.pi * rng.uniform(0.3, 2.0) * t + rng.uniform(0, 6))
            + 0.3 * np.cumsum(rng.normal(size=n_snapshots)) / np.sqrt(n_snapshots)
        )
        rows.append((p - p.mean()) / p.std())
    return np.array(rows)


def plant(
    n_params: int, n_modes: int, n_snapshots: int, noise: float, seed: int, barely_moving: bool, block: int = 1 << 20
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float32 N x T planted trajectories (generated in blocks), true modes, true profiles."""
    rng = np.random.default_rng(seed)
    prof = profiles(n_modes, n_snapshots, rng)
    modes = rng.integers(0, n_modes, n_params)
    w = np.empty((n_params, n_snapshots), dtype=np.float32)
    for start in range(0, n_params, block):
        stop = min(start + block, n_params)
        n = stop - start
        a = rng.normal(size=n) if barely_moving else rng.choice([-1.0, 1.0], n) * rng.uniform(0.5, 2.0, n)
        w[start:stop] = (
            a[:, None] * prof[modes[start:stop]] + rng.normal(size=(n, 1)) + noise * rng.normal(size=(n, n_snapshots))
        )
    return w, modes, prof


def agreement(true_modes: np.ndarray, found_modes: np.ndarray) -> float:
    table = np.zeros((true_modes.max() + 1, found_modes.max() + 1))
    np.add.at(table, (true_modes, found_modes), 1)
    rows, cols = linear_sum_assignment(-table)
    return float(table[rows, cols].sum() / true_modes.size)


def oracle_modes(w: np.ndarray, prof: np.ndarray) -> np.ndarray:
    centred = w - w.mean(axis=1, keepdims=True)
    return np.argmax(np.abs(centred @ prof.T), axis=1)


def robustness(seeds: list[int], n_params: int) -> list[dict]:
    rows = []
    for barely_moving in (True, False):
        for noise in (0.05, 0.1):
            scores: dict[str, list] = {name: [] for name in ["oracle", *CLUSTERINGS]}
            errors: dict[str, list] = {name: [] for name in CLUSTERINGS}
            for seed in seeds:
                w, modes, prof = plant(n_params, 10, 21, noise, seed, barely_moving)
                scores["oracle"].append(agreement(modes, oracle_modes(w.astype(np.float64), prof)))
                for name, options in CLUSTERINGS.items():
                    model = fit_cmd(w, 10, seed=seed, **options)
                    scores[name].append(agreement(modes, model.modes))
                    rec = model.reconstruct(w[model.reference_index])
                    errors[name].append(float(np.sqrt(np.mean((rec - w) ** 2))))
            for name, values in scores.items():
                rows.append(
                    {
                        "a": "a ~ N(0,1)" if barely_moving else "|a| in [0.5, 2]",
                        "noise": noise,
                        "method": name,
                        "agreement_mean": float(np.mean(values)),
                        "agreement_min": float(np.min(values)),
                        "rmse_mean": float(np.mean(errors[name])) if name in errors else None,
                    }
                )
                print(rows[-1], flush=True)
    return rows


# ------------------------------------------------------------------------------------------ scale


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def current_rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as fh:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
        fh.write("5")


def scale(n_params: int, n_snapshots: int = 21, n_modes: int = 10) -> dict:
    out: dict = {"n_params": n_params, "n_snapshots": n_snapshots, "n_modes": n_modes, "n_samples": 1000}
    t0 = time.perf_counter()
    w, _, _ = plant(n_params, n_modes, n_snapshots, 0.05, seed=0, barely_moving=True)
    out["input_bytes"] = w.nbytes
    print(f"generated {w.shape} float32 ({w.nbytes / 1e6:.0f} MB) in {time.perf_counter() - t0:.1f} s", flush=True)

    start = time.perf_counter()
    fit_cmd(w, n_modes)
    out["fit_seconds"] = time.perf_counter() - start
    print(f"fit_cmd: {out['fit_seconds']:.2f} s", flush=True)

    rss_before = current_rss_bytes()
    reset_peak_rss()
    tracemalloc.start()
    model = fit_cmd(w, n_modes)
    traced_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    out["fit_peak_extra_traced_bytes"] = traced_peak
    out["fit_peak_extra_rss_bytes"] = peak_rss_bytes() - rss_before
    out["fit_peak_extra_traced_ratio"] = traced_peak / w.nbytes
    out["fit_peak_extra_rss_ratio"] = out["fit_peak_extra_rss_bytes"] / w.nbytes
    out["result_bytes"] = model.modes.nbytes + model.a.nbytes + model.b.nbytes
    print(
        f"fit_cmd peak extra memory: traced {traced_peak / 1e6:.0f} MB "
        f"({out['fit_peak_extra_traced_ratio']:.2f} x input), RSS {out['fit_peak_extra_rss_bytes'] / 1e6:.0f} MB "
        f"({out['fit_peak_extra_rss_ratio']:.2f} x input); the result itself is {out['result_bytes'] / 1e6:.0f} MB",
        flush=True,
    )
    del model

    warmup = n_snapshots - 1
    online = OnlineCMD(n_params, n_modes, warmup)
    snapshots = [np.ascontiguousarray(w[:, t]) for t in range(n_snapshots)]
    del w
    for theta in snapshots:
        online.observe(theta)
    timings = []
    for theta in snapshots[:5]:
        start = time.perf_counter()
        online.observe(theta)
        timings.append(time.perf_counter() - start)
    out["observe_seconds"] = timings
    out["observe_seconds_median"] = float(np.median(timings))
    out["state_bytes_per_param"] = online.nbytes / n_params

    schedule = EmbeddingSchedule(0.2, 1)
    schedule.step(online)
    online.observe(snapshots[5])
    start = time.perf_counter()
    new = schedule.step(online)
    out["embedding_event_seconds"] = time.perf_counter() - start
    online.observe(snapshots[6])
    schedule.step(online)  # 40% frozen
    timings = []
    for theta in snapshots[7:12]:
        start = time.perf_counter()
        online.observe(theta)
        timings.append(time.perf_counter() - start)
    out["observe_frozen_fraction"] = float(online.frozen_mask.mean())
    out["observe_frozen_seconds_median"] = float(np.median(timings))
    start = time.perf_counter()
    online.model_weights(snapshots[12])
    out["model_weights_seconds"] = time.perf_counter() - start
    print(
        f"observe: median {out['observe_seconds_median']:.3f} s, with {out['observe_frozen_fraction']:.0%} frozen "
        f"{out['observe_frozen_seconds_median']:.3f} s; embedding event ({new.size} weights) "
        f"{out['embedding_event_seconds']:.3f} s; model_weights {out['model_weights_seconds']:.3f} s; "
        f"state {out['state_bytes_per_param']:.2f} bytes/weight",
        flush=True,
    )
    return out


def beyond_2_24() -> dict:
    """References at indices 2^24 and 2^24 + 1 in a 2^24 + 3 weight model: exact indices and fit."""
    n = 2**24 + 3
    w = np.zeros((n, 3), dtype=np.float32)  # untouched zero pages cost no memory
    w[-3:] = [[1, 2, 4], [3, 1, 0], [2, 4, 8]]
    start = time.perf_counter()
    model = fit_cmd(w, 2, n_samples=50, tensor_sizes=[2**24, 3])
    seconds = time.perf_counter() - start
    exact = (
        model.reference_index.tolist() == [2**24, 2**24 + 1]
        and model.modes[-3:].tolist() == [0, 1, 0]
        and np.allclose(model.reconstruct(w[model.reference_index])[-3:], w[-3:], atol=1e-12)
    )
    print(f"N = 2^24 + 3: references {model.reference_index.tolist()}, exact: {exact}, {seconds:.1f} s", flush=True)
    return {"n_params": n, "reference_index": model.reference_index.tolist(), "exact": bool(exact), "seconds": seconds}


# ----------------------------------------------------------------------------------------- report


def markdown(result: dict) -> str:
    s = result["scale"]
    lines = [
        "# CMD core benchmark",
        "",
        f"Machine: {result['machine']['cpus']} cores (shared; load average {result['machine']['load_average']} at "
        f"start), numpy {result['machine']['numpy']}, scipy {result['machine']['scipy']}. "
        f"Command: `{result['command']}`.",
        "",
        f"## Clustering robustness (planted modes, N = 20,000, T = 21, M = 10, K = 1000, {len(result['seeds'])} seeds)",
        "",
        "| weights | noise | method | mode agreement mean | min | reconstruction RMSE |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["robustness"]:
        rmse = "-" if r["rmse_mean"] is None else f"{r['rmse_mean']:.4f}"
        method = r["method"].replace("|", "\\|")  # a bare | would split the Markdown cell
        lines.append(
            f"| {r['a']} | {r['noise']} | {method} | {r['agreement_mean']:.3f} | {r['agreement_min']:.3f} | {rmse} |"
        )
    lines += [
        "",
        f"## Scale (N = {s['n_params']:,}, T = {s['n_snapshots']}, M = {s['n_modes']}, K = {s['n_samples']}, "
        "float32 input)",
        "",
        "| measure | value | target |",
        "|---|---|---|",
        f"| fit_cmd wall time | {s['fit_seconds']:.2f} s | <= 20 s |",
        f"| fit_cmd peak extra memory, tracemalloc | {s['fit_peak_extra_traced_bytes'] / 1e6:.0f} MB = "
        f"{s['fit_peak_extra_traced_ratio']:.2f} x input | <= 2 x input |",
        f"| fit_cmd peak extra memory, peak RSS rise | {s['fit_peak_extra_rss_bytes'] / 1e6:.0f} MB = "
        f"{s['fit_peak_extra_rss_ratio']:.2f} x input | <= 2 x input |",
        f"| OnlineCMD.observe after warm-up (median of 5) | {s['observe_seconds_median']:.3f} s | <= 0.3 s |",
        f"| same, {s['observe_frozen_fraction']:.0%} of the weights frozen | "
        f"{s['observe_frozen_seconds_median']:.3f} s | <= 0.3 s |",
        f"| OnlineCMD state after warm-up | {s['state_bytes_per_param']:.2f} bytes/weight | <= 32 |",
        f"| OnlineCMD.model_weights (all N) | {s['model_weights_seconds']:.3f} s | - |",
        f"| EmbeddingSchedule event (20% of N) | {s['embedding_event_seconds']:.3f} s | - |",
        "",
        f"Indices beyond 2^24: N = {result['beyond_2_24']['n_params']:,}, references "
        f"{result['beyond_2_24']['reference_index']}, exact modes and reconstruction: "
        f"{result['beyond_2_24']['exact']} ({result['beyond_2_24']['seconds']:.1f} s).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 seed, N = 1M at scale (a smoke run)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cmd_core.json")
    args = parser.parse_args()
    seeds = [0] if args.quick else [0, 1, 2, 3, 4]
    result = {
        "command": "python experiments/benchmarks/cmd_core.py" + (" --quick" if args.quick else ""),
        "machine": {
            "cpus": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "platform": platform.platform(),
            "numpy": np.__version__,
            "scipy": scipy.__version__,
        },
        "seeds": seeds,
        "robustness": robustness(seeds, 20_000),
        "scale": scale(1_000_000 if args.quick else 11_200_000),
        "beyond_2_24": beyond_2_24(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    text = markdown(result)
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
