"""Centralised CMD on LeNet-5 / Fashion-MNIST: SGD, online CMD, EMA, SWA, embedded CMD (paper Tables 1-2).

One SGD run per seed is observed by online CMD (our default PAM clustering; the authors'
complete-linkage rule; PAM with snapshot 0 taken after epoch 1 instead of at initialisation, so
fitted one epoch later), EMA and SWA; embedded CMD changes the weights, so it has its own run from
the same initial model and batch order. Writes results.json and results.md to --out.

    .venv/bin/python experiments/centralised_cmd.py            # ~25 min on one shared core
    .venv/bin/python experiments/centralised_cmd.py --epochs 3 --warmup 1 --seeds 0 --train-size 2000  # smoke
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from fedcmd.centralised import CMDCallback, EMACallback, SWACallback, train_with_callbacks
from fedcmd.cmd import EmbeddingSchedule, fit_cmd
from fedcmd.data import load_dataset
from fedcmd.models import build_model
from fedcmd.training import evaluate

METHODS = {
    "sgd": "SGD (momentum)",
    "online_cmd": "online CMD",
    "online_cmd_authors": "online CMD, authors' clustering",
    "online_cmd_from_epoch1": "online CMD, snapshots from epoch 1",
    "ema": "EMA",
    "swa": "SWA",
    "embedded_cmd": "embedded CMD",
}


def train_run(model, data, args, seed: int, callbacks) -> None:
    """One centralised training run of the experiment's settings, with its epoch callbacks."""
    train_with_callbacks(
        model,
        data.train_x,
        data.train_y,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        momentum=args.momentum,
        seed=seed,
        callbacks=callbacks,
    )


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=18)
    p.add_argument("--warmup", type=int, default=8, help="F: CMD is fitted on snapshots 0..F (epochs)")
    p.add_argument("--modes", type=int, default=10)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--ema-decay", type=float, default=0.998, help="per optimiser step")
    p.add_argument("--swa-start", type=int, default=None, help="first epoch averaged (default: warmup)")
    p.add_argument("--embed-fraction", type=float, default=0.1, help="P, of all weights")
    p.add_argument("--embed-every", type=int, default=2, help="L, epochs")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--train-size", type=int, default=None, help="use the first n training images (smoke tests)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "centralised")
    return p.parse_args()


def accuracy(model: torch.nn.Module, data) -> float:
    return evaluate(model, data.test_x, data.test_y)[1]


def sgd_run(data, seed: int, args) -> dict:
    """One SGD run watched by online CMD (two clusterings), EMA and SWA."""
    model = build_model("lenet5", data.in_shape, data.num_classes, seed=seed)
    cmd = CMDCallback(model, args.modes, args.warmup, n_samples=args.samples, seed=seed)
    cmd_authors = CMDCallback(
        model, args.modes, args.warmup, n_samples=args.samples, seed=seed, clustering="hierarchical"
    )
    cmd_from_epoch1 = CMDCallback(
        model, args.modes, args.warmup, n_samples=args.samples, seed=seed, observe_initial=False
    )
    ema = EMACallback(model, args.ema_decay)
    swa = SWACallback(model, args.swa_start or args.warmup)
    layout = cmd.layout
    snapshots = [layout.flatten(model)]  # LeNet-5: 62k weights x 19 snapshots, 5 MB
    curve = []

    def record(epoch: int) -> None:
        if epoch < args.warmup:  # evaluations cost ~1/5 epoch on one core; curves start at F
            return
        row = {"epoch": epoch, "sgd": accuracy(model, data)}
        with cmd.cmd_model():
            row["online_cmd"] = accuracy(model, data)
        curve.append(row)
        print(f"  seed {seed} sgd run, epoch {epoch}: {row}", flush=True)

    train_run(
        model,
        data,
        args,
        seed,
        [
            SimpleNamespace(on_epoch_end=lambda _: snapshots.append(layout.flatten(model))),
            cmd,
            cmd_authors,
            cmd_from_epoch1,
            ema,
            swa,
            SimpleNamespace(on_epoch_end=record),
        ],
    )
    with cmd_authors.cmd_model():
        authors = accuracy(model, data)
    with cmd_from_epoch1.cmd_model():
        from_epoch1 = accuracy(model, data)
    posthoc = posthoc_cmd(model, layout, np.stack(snapshots, axis=1), data, seed, args)
    return {
        "sgd": curve[-1]["sgd"],
        "online_cmd": curve[-1]["online_cmd"],
        "online_cmd_authors": authors,
        "online_cmd_from_epoch1": from_epoch1,
        "posthoc": posthoc,
        "ema": accuracy(ema.averaged.module, data),
        "swa": accuracy(swa.averaged.module, data),
        "modes_found": {"pam": cmd.online.n_modes, "authors": cmd_authors.online.n_modes},
        "curve": curve,
    }


def posthoc_cmd(model, layout, trajectory: np.ndarray, data, seed: int, args) -> dict:
    """Post-hoc CMD of the whole run (snapshots 0..E) with both clusterings: the fraction of the
    weights' motion it leaves unexplained, ||W_cmd - W|| / ||W - mean_t W|| (Frobenius), and the
    test accuracy of its last snapshot."""
    final = layout.flatten(model)
    motion = np.linalg.norm(trajectory - trajectory.mean(axis=1, keepdims=True))
    out = {}
    for name, options in (("pam", {}), ("authors", {"clustering": "hierarchical"})):
        fitted = fit_cmd(trajectory, args.modes, args.samples, seed, layout.tensor_sizes, **options)
        reconstruction = fitted.reconstruct(trajectory[fitted.reference_index])
        layout.load(model, reconstruction[:, -1])
        out[name] = {
            "unexplained_motion": float(np.linalg.norm(reconstruction - trajectory) / motion),
            "accuracy": accuracy(model, data),
        }
    layout.load(model, final)
    return out


def embedded_run(data, seed: int, args) -> dict:
    """Embedded CMD: same initial model and batch order as the SGD run of this seed."""
    model = build_model("lenet5", data.in_shape, data.num_classes, seed=seed)
    schedule = EmbeddingSchedule(args.embed_fraction, args.embed_every)
    cmd = CMDCallback(model, args.modes, args.warmup, embed=schedule, n_samples=args.samples, seed=seed)
    curve = []

    def record(epoch: int) -> None:
        if epoch < args.warmup:  # until F the run is the SGD run of the same seed
            return
        row = {"epoch": epoch, "accuracy": accuracy(model, data), "embedded_fraction": cmd.embedded_fraction}
        curve.append(row)
        print(f"  seed {seed} embedded run, epoch {epoch}: {row}", flush=True)

    train_run(
        model,
        data,
        args,
        seed,
        [cmd, SimpleNamespace(on_epoch_end=record)],
    )
    return {"embedded_cmd": curve[-1]["accuracy"], "curve": curve}


def mean_std(values: list[float]) -> str:
    values = 100 * np.asarray(values)
    std = values.std(ddof=1) if values.size > 1 else 0.0
    return f"{values.mean():.2f} +- {std:.2f}"


def write_markdown(path: Path, args, runs: list[dict], seconds: float) -> str:
    lines = [
        "# Centralised CMD: LeNet-5 on Fashion-MNIST",
        "",
        f"Test accuracy (%) after {args.epochs} epochs, mean +- std (ddof=1) over seeds {args.seeds}. "
        f"SGD lr {args.lr}, momentum {args.momentum}, batch {args.batch_size}, no schedule, no weight decay. "
        f"CMD: M = {args.modes}, K = {args.samples}, F = {args.warmup} (snapshot 0 = initial model). "
        f"EMA decay {args.ema_decay} per step; SWA from epoch {args.swa_start or args.warmup}. "
        f"Embedded CMD: P = {args.embed_fraction:.0%} of all weights every L = {args.embed_every} epochs.",
        "",
        "| method | accuracy (%) |",
        "|---|---|",
    ]
    for key, label in METHODS.items():
        lines.append(f"| {label} | {mean_std([r[key] for r in runs])} |")
    lines += [
        "",
        "Per epoch from F on (mean over seeds): embedded CMD's fraction of embedded weights and network "
        "accuracy (%); the SGD run's accuracy and its online CMD model's accuracy (%).",
        "",
        "| epoch | embedded fraction | accuracy (%) | SGD run accuracy (%) | online CMD (%) |",
        "|---|---|---|---|---|",
    ]
    for e in range(len(runs[0]["curve"])):
        embedded = [r["embedded_curve"][e] for r in runs]
        sgd = [r["curve"][e] for r in runs]
        lines.append(
            f"| {sgd[0]['epoch']} | {np.mean([row['embedded_fraction'] for row in embedded]):.3f} | "
            f"{100 * np.mean([row['accuracy'] for row in embedded]):.2f} | "
            f"{100 * np.mean([row['sgd'] for row in sgd]):.2f} | "
            f"{100 * np.mean([row['online_cmd'] for row in sgd]):.2f} |"
        )
    lines += [
        "",
        "Post-hoc CMD of each whole SGD run (snapshots 0..E), mean +- std over seeds: fraction of the "
        "weights' motion left unexplained, ||W_cmd - W|| / ||W - mean_t W|| (Frobenius), and test accuracy "
        "(%) of the modelled last snapshot.",
        "",
        "| clustering | unexplained motion | accuracy (%) |",
        "|---|---|---|",
    ]
    for key, label in (("pam", "PAM (default)"), ("authors", "authors' complete linkage")):
        unexplained = np.array([r["posthoc"][key]["unexplained_motion"] for r in runs])
        lines.append(
            f"| {label} | {unexplained.mean():.4f} +- {unexplained.std(ddof=1) if len(runs) > 1 else 0:.4f} | "
            f"{mean_std([r['posthoc'][key]['accuracy'] for r in runs])} |"
        )
    modes = {k: sorted({r["modes_found"][k] for r in runs}) for k in ("pam", "authors")}
    lines += [
        "",
        f"Modes found: {modes}. Wall time {seconds / 60:.1f} min with {args.threads} thread(s).",
        "Reproduce: `.venv/bin/python experiments/centralised_cmd.py`",
        "",
    ]
    text = "\n".join(lines)
    path.write_text(text)
    return text


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset("fashion-mnist", args.data_dir)
    if args.train_size:
        data.train_x, data.train_y = data.train_x[: args.train_size], data.train_y[: args.train_size]
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    runs = []
    for seed in args.seeds:
        run = sgd_run(data, seed, args)
        embedded = embedded_run(data, seed, args)
        runs.append(
            {**run, "embedded_cmd": embedded["embedded_cmd"], "embedded_curve": embedded["curve"], "seed": seed}
        )
        (args.out / "results.json").write_text(
            json.dumps(
                {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "runs": runs},
                indent=1,
            )
        )
    print(write_markdown(args.out / "results.md", args, runs, time.time() - start))


if __name__ == "__main__":
    main()
