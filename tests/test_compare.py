"""`fedcmd compare` on small hand-made run folders: table numbers, plots, and clear errors."""

import csv
import json

import pytest

from fedcmd.cli import main
from fedcmd.compare import CompareError, compare


def fake_run(folder, *, strategy, seed, floats, bytes_up, bytes_down, accuracy, fraction=None, paper=None, bits=None):
    """A run folder as `fedcmd run` writes it: 3 rounds, volume split evenly over the rounds."""
    folder.mkdir(parents=True)
    summary = dict(
        strategy=strategy,
        seed=seed,
        model="lenet5",
        dataset="synthetic",
        num_clients=2,
        fraction_train=1.0,
        rounds=3,
        final_accuracy=accuracy[-1],
        best_accuracy=max(accuracy),
    )
    if paper is not None:
        summary["paper_volume_ratio"] = paper
    if bits is not None:  # a run with a wire codec: payload bits per value, up and down
        summary["bits_per_value_up"], summary["bits_per_value_down"] = bits
    (folder / "summary.json").write_text(json.dumps(summary))
    with open(folder / "volume.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["round", "client", "direction", "category", "values", "floats", "raw_bytes", "wire_bytes"])
        for rnd in (1, 2, 3):
            writer.writerow([rnd, 0, "up", "weights", 0, floats / 6, 0, bytes_up / 3])
            writer.writerow([rnd, 0, "down", "weights", 0, floats / 6, 0, bytes_down / 3])
            writer.writerow([rnd, 0, "down", "metadata", 0, 0.0, 0, 0])
    with open(folder / "metrics.csv", "w", newline="") as fh:
        columns = ["round", "accuracy", "mb_cumulative"] + (["frozen_fraction"] if fraction else [])
        writer = csv.writer(fh)
        writer.writerow(columns)
        for rnd in range(4):
            mb = (bytes_up + bytes_down) * rnd / 3 / 1e6
            writer.writerow([rnd, accuracy[rnd], mb] + ([fraction[rnd] if rnd else ""] if fraction else []))


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "table"
    for seed, acc in ((0, [0.1, 0.5, 0.7, 0.8]), (1, [0.1, 0.5, 0.9, 0.6])):
        fake_run(
            root / f"fedavg-seed{seed}",
            strategy="fedavg",
            seed=seed,
            floats=1000,
            bytes_up=2e6,
            bytes_down=2e6,
            accuracy=acc,
        )
    fake_run(
        root / "apf-seed0",
        strategy="apf",
        seed=0,
        floats=500,
        bytes_up=1e6,
        bytes_down=1.4e6,
        accuracy=[0.1, 0.4, 0.6, 0.7],
        fraction=[0, 0.0, 0.2, 0.5],
        paper=0.45,
        bits=(8.0, 16.0),
    )
    fake_run(
        root / "apf-seed1",
        strategy="apf",
        seed=1,
        floats=700,
        bytes_up=1.2e6,
        bytes_down=1.6e6,
        accuracy=[0.1, 0.4, 0.6, 0.9],
        fraction=[0, 0.0, 0.1, 0.3],
        paper=0.65,
        bits=(8.5, 16.0),
    )
    return root


def table_lines(text):
    """The rows of the first table (volume and accuracy), by method."""
    text = text.split("Traffic to first reach")[0]
    return {
        line.split(" | ")[0].strip("| "): [cell.strip() for cell in line.strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("| ") and "---" not in line
    }


def test_table_numbers_and_plots(runs, capsys):
    assert main(["compare", str(runs)]) == 0
    text = capsys.readouterr().out
    assert (runs / "comparison.md").read_text() in text
    rows = table_lines(text)
    assert rows["method"][2:5] == ["volume % (floats)", "volume % (bytes)", "volume % (paper-style)"]
    # fedavg: 100% by definition; MB 2 up, 2 down; final 80/60 -> 70 ± 14.14; best 80/90 -> 85 ± 7.07.
    # bits per value: – for runs whose summary predates the codecs.
    assert rows["fedavg"] == [
        "fedavg",
        "0, 1",
        "100.0 ± 0.0",
        "100.0 ± 0.0",
        "100.0 ± 0.0",
        "2.00 ± 0.00",
        "2.00 ± 0.00",
        "–",
        "–",
        "70.00 ± 14.14",
        "85.00 ± 7.07",
    ]
    # apf: floats 500/1000, 700/1000 -> 60 ± 14.1; bytes 2.4/4, 2.8/4 -> 65 ± 7.1; paper 45, 65 -> 55 ± 14.1.
    assert rows["apf"] == [
        "apf",
        "0, 1",
        "60.0 ± 14.1",
        "65.0 ± 7.1",
        "55.0 ± 14.1",
        "1.10 ± 0.14",
        "1.50 ± 0.14",
        "8.25 ± 0.35",
        "16.00 ± 0.00",
        "80.00 ± 14.14",
        "80.00 ± 14.14",
    ]
    assert list(rows)[1:] == ["fedavg", "apf"]  # baseline first
    for name in ("accuracy_vs_round.png", "mb_vs_round.png", "accuracy_vs_mb.png", "fraction_vs_round.png"):
        assert (runs / name).stat().st_size > 10_000, name
        assert f"]({name})" in text


def test_single_seed_and_explicit_run_folders(runs, tmp_path):
    out = tmp_path / "out"
    text = compare([runs / "fedavg-seed0", runs / "apf-seed0"], out=out)
    rows = table_lines(text)
    assert rows["apf"][2:5] == ["50.0", "60.0", "45.0"]  # one seed: no ± column noise
    assert (out / "comparison.md").is_file() and (out / "accuracy_vs_mb.png").is_file()


def test_missing_file_is_a_clear_error(runs, capsys):
    (runs / "apf-seed1" / "volume.csv").unlink()
    assert main(["compare", str(runs)]) == 2
    err = capsys.readouterr().err
    assert "apf-seed1" in err and "lacks volume.csv" in err


def test_missing_baseline_is_a_clear_error(runs):
    with pytest.raises(CompareError, match="no run of the baseline method 'fedavg'.*methods: apf"):
        compare([runs / "apf-seed0", runs / "apf-seed1"])
    (runs / "fedavg-seed1").rename(runs.parent / "elsewhere")
    with pytest.raises(CompareError, match="baseline 'fedavg' has no run with seed 1, needed by apf"):
        compare([runs])
    with pytest.raises(CompareError, match="neither a run folder"):
        compare([runs.parent])


def test_traffic_to_target_accuracy(runs, capsys):
    # Default target: fedavg's mean final accuracy (80%, 60%) minus 0.5 point = 69.5%.
    text = compare([runs])
    assert "first reach 69.50% test accuracy (fedavg's mean final accuracy minus 0.5 point)" in text
    target = {
        line.split(" | ")[0].strip("| "): [c.strip() for c in line.strip("|").split("|")]
        for line in text.split("Traffic to first reach")[1].splitlines()
        if line.startswith("| ")
    }
    # fedavg reaches 70% in round 2 with both seeds: 2/3 of 4 MB; apf in round 3: 2.4 and 2.8 MB,
    # i.e. 90% and 105% of fedavg's bytes of the same seed.
    assert target["fedavg"][1:5] == ["2 of 2", "2 ± 0", "2.7 ± 0.0", "100.0 ± 0.0"]
    assert target["apf"][1:5] == ["2 of 2", "3 ± 0", "2.6 ± 0.3", "97.5 ± 10.6"]
    # A target nobody reaches says so instead of a number.
    assert main(["compare", str(runs), "--target", "95"]) == 0
    out = capsys.readouterr().out
    assert "| apf | 0 of 2 | not reached |" in out and "first reach 95.00% test accuracy:" in out


def test_a_target_met_before_any_traffic_gives_no_ratio_rather_than_a_division_by_zero(runs):
    # Every run starts at 10%: a 5% target is met in round 0, with 0 bytes sent by anyone.
    text = compare([runs], target=0.05)
    rows = {
        line.split(" | ")[0].strip("| "): [c.strip() for c in line.strip("|").split("|")]
        for line in text.split("Traffic to first reach")[1].splitlines()
        if line.startswith("| ")
    }
    assert rows["fedavg"][1:5] == ["2 of 2", "0 ± 0", "0.0 ± 0.0", "–"]
