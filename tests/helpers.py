"""What several test files share (pytest puts tests/ on sys.path: `from helpers import ...`)."""

import csv


def read_csv(path):
    """A run's table (metrics.csv, volume.csv, rejections.csv, ...) as a list of dicts of strings."""
    with open(path) as fh:
        return list(csv.DictReader(fh))
