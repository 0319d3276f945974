"""Users who err (issue 13): every user error exits 2 with one line naming the problem; a refused run
changes nothing in its output folder; the run's tables are written round by round."""

import csv
import math

import pytest

from fedcmd.cli import main
from fedcmd.client_app import app as client_app
from fedcmd.engine import LocalGrid, run_inprocess
from fedcmd.report import RunTables, read_rows

SMALL = [
    "--set",
    'dataset="synthetic"',
    "--set",
    "synthetic-train-size=200",
    "--set",
    "synthetic-test-size=50",
    "--set",
    "num-server-rounds=2",
    "--set",
    "num-clients=2",
    "--set",
    'model="mlp"',
    "--engine",
    "inprocess",
]


def read_csv(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def folder_state(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "overrides, says",
    [
        (['dataset="imagenet"'], "unknown dataset 'imagenet'"),
        (['model="vgg"'], "unknown model 'vgg'"),
        (["num-clients=500"], "num_partitions must be in [1, 200], got 500"),
        (['partition="dirichlet"', "dirichlet-alpha=0.0001", "num-clients=20"], "max number of attempts"),
        (['partition="pathological"', "classes-per-client=11"], "num_classes_per_partition`=11"),
        (['synthetic-shape="1x0x28"'], "synthetic shape must be three positive sizes"),
        (['synthetic-shape="abc"'], "image shape must look like CxHxW"),
        (['synthetic-shape="1x4x4"', 'model="lenet5"'], "Kernel size can't be greater than actual input size"),
        (["lr=inf"], "'lr': inf is not a finite number"),
        (["round-timeout=inf"], "'round-timeout': inf is not a finite number"),
        (["max-update-norm=nan"], "'max-update-norm': nan is not a finite number"),
        (['partition-binding="/nonexistent/binding.json"'], "cannot read a binding from /nonexistent/binding.json"),
    ],
)
def test_user_errors_exit_2_with_one_line(tmp_path, capsys, overrides, says):
    args = ["run", *SMALL, "--out", str(tmp_path / "out")]
    for item in overrides:
        args += ["--set", item]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fedcmd: error: ") and says in err[-1], err[-1]
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_an_unwritable_output_folder_exits_2(tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    assert main(["run", *SMALL, "--out", str(tmp_path / "a-file" / "run")]) == 2
    assert "cannot write to output folder" in capsys.readouterr().err
    assert main(["run", *SMALL, "--out", str(tmp_path / "a-file")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_a_refused_run_leaves_its_folder_as_it_was(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", *SMALL, "--out", str(out)]) == 0
    before = folder_state(out)
    assert {"checkpoint.json", "checkpoint.round-2.npz", "summary.json", "config.toml"} <= {str(p) for p in before}
    # A resume with a changed key: refused, and config.toml still says what the run used.
    assert main(["run", *SMALL, "--out", str(out), "--resume", "--set", "lr=0.02"]) == 2
    assert "config key 'lr'" in capsys.readouterr().err
    # A new run into a finished run's folder: refused.
    assert main(["run", *SMALL, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds a checkpointed run" in err and "--overwrite" in err
    assert folder_state(out) == before
    with pytest.raises(SystemExit) as exit_:
        main(["run", *SMALL, "--out", str(out), "--resume", "--overwrite"])
    assert exit_.value.code == 2
    # --overwrite replaces it: a run with another learning rate, every table its own.
    assert main(["run", *SMALL, "--out", str(out), "--overwrite", "--set", "lr=0.02"]) == 0
    assert "lr = 0.02" in (out / "config.toml").read_text()
    assert [row["round"] for row in read_csv(out / "metrics.csv")] == ["0", "1", "2"]
    after = folder_state(out)
    assert after.keys() == before.keys()
    replaced = ("checkpoint.json", "checkpoint.round-2.npz", "metrics.csv", "summary.json")
    assert all(after[p] != before[p] for p in after if p.name in replaced)


def test_tables_are_written_round_by_round(small_config, tmp_path):
    config = dict(small_config, **{"num-server-rounds": 4, "local-epochs": 1, "model": "mlp"})
    grid = LocalGrid(client_app, 4, fail=lambda rnd, pid, kind: kind == "train" and (rnd, pid) == (2, 1))
    original = grid.replies

    def send(messages):
        messages = list(messages)
        if messages and messages[0].metadata.group_id == "3":
            raise KeyboardInterrupt  # as a user's Ctrl-C in round 3 would
        return original(messages)

    grid.replies = send
    with pytest.raises(KeyboardInterrupt):
        run_inprocess(config, tmp_path, progress=False, grid=grid)
    assert [row["round"] for row in read_csv(tmp_path / "metrics.csv")] == ["0", "1", "2"]
    assert {row["round"] for row in read_csv(tmp_path / "volume.csv")} == {"1", "2"}
    assert [(r["round"], r["client"]) for r in read_csv(tmp_path / "rejections.csv")] == [("2", "1")]
    assert "frozen_fraction" not in read_csv(tmp_path / "metrics.csv")[0]
    # Resumed: the rows of the rounds done are kept, the new ones appended, none twice.
    run_inprocess(config, tmp_path, progress=False, resume=True)
    assert [row["round"] for row in read_csv(tmp_path / "metrics.csv")] == ["0", "1", "2", "3", "4"]
    volume_rounds = [int(row["round"]) for row in read_csv(tmp_path / "volume.csv")]
    assert volume_rounds == sorted(volume_rounds) and set(volume_rounds) == {1, 2, 3, 4}
    assert [(r["round"], r["client"]) for r in read_csv(tmp_path / "rejections.csv")] == [("2", "1")]


def test_figures_not_measured_are_empty_cells(tmp_path):
    from fedcmd.accountant import VolumeAccountant
    from strategies.base import RoundLog

    class Strategy:
        accountant = VolumeAccountant()
        rounds = {1: RoundLog(), 2: RoundLog()}

    rows = [dict(round=0, accuracy=0.5, loss=1.0), dict(round=1, accuracy=None, loss=float("nan"))]
    tables = RunTables(tmp_path)
    tables.start(rows[:1], Strategy())
    tables.append_round(1, rows, Strategy())
    rows.append(dict(round=2, accuracy=0.7, loss=0.9, extra=3.0))  # a new column: the table is rewritten
    tables.append_round(2, rows, Strategy())
    assert [(r["accuracy"], r["loss"], r["extra"]) for r in read_csv(tmp_path / "metrics.csv")] == [
        ("0.5", "1.0", ""),
        ("", "", ""),
        ("0.7", "0.9", "3.0"),
    ]
    assert math.isnan(read_rows(tmp_path / "metrics.csv")[1]["accuracy"])
