"""Reading a CSV with a text label column: dpbp against ``np.loadtxt`` on the same numbers, in one run.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python scripts/bench/table.py   # 1,000,000 x 50, ~4 min

Two files with the same rows are written once (kept in ``--dir`` for later runs): ``numeric.csv``,
50 feature columns and an integer label, and ``text.csv``, the same with the label as a class name
(``setosa``, ``versicolor``, ``virginica``). Timed, interleaved round by round (medians):

* ``np.loadtxt`` of numeric.csv: the reference (the C reader, nothing else);
* dpbp ``load_source`` of text.csv (what ``dpbp train`` reads: the sniffing pass, the C reader with
  one converter call per row for the text column, the label array) and of numeric.csv;
* dpbp's reading plus the label encoding of a classification run (``Targets.fit`` + ``encode``);
* options measured for the text column: ``np.loadtxt`` with a structured dtype (50 float64 fields and
  one ``U16`` field), the converter alone, and two ``usecols`` passes (features, then labels as text).

SUMMARY: dpbp on text.csv / ``np.loadtxt`` on numeric.csv (target <= 1.5).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from _common import header, median, out_dir, print_table, write_csv

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's dpbp

from dpbp.data import load_source  # noqa: E402
from dpbp.targets import Targets  # noqa: E402

NAMES = np.array(["setosa", "versicolor", "virginica"])


def write_files(folder: Path, rows: int, cols: int) -> tuple[Path, Path]:
    """numeric.csv and text.csv with the same rows (reused when their first line says the same size)."""
    numeric, text = folder / "numeric.csv", folder / "text.csv"
    stamp = f"# {rows} x {cols}\n"
    if numeric.is_file() and text.is_file() and numeric.open().readline() == stamp == text.open().readline():
        return numeric, text
    rng = np.random.default_rng(0)
    with open(numeric, "w") as fn, open(text, "w") as ft:
        fn.write(stamp)
        ft.write(stamp)
        for start in range(0, rows, 100_000):
            n = min(100_000, rows - start)
            x = rng.standard_normal((n, cols))
            labels = rng.integers(0, 3, n)
            body = [",".join(r) for r in np.char.mod("%.6g", x)]
            fn.writelines(f"{b},{k}\n" for b, k in zip(body, labels))
            ft.writelines(f"{b},{name}\n" for b, name in zip(body, NAMES[labels]))
    return numeric, text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000, help="data rows (default 1,000,000)")
    p.add_argument("--cols", type=int, default=50, help="feature columns (default 50)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds, >= 1 (default 3)")
    p.add_argument("--options", action="store_true", help="also time the options not taken (structured dtype, ...)")
    p.add_argument("--dir", help="folder for the two CSV files (default: a temporary folder, removed)")
    p.add_argument("--out", help="folder for the CSV of results (default scripts/bench/results)")
    args = p.parse_args()
    cols = args.cols
    warnings.filterwarnings("ignore", message="Input line 1 contained no data")  # the size comment, for str reads
    with tempfile.TemporaryDirectory(prefix="dpbp-table-") as tmp:
        folder = Path(args.dir) if args.dir else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        numeric, text = write_files(folder, args.rows, cols)
        size = text.stat().st_size / 1e6
        header(f"table.py: {args.rows} rows x {cols} columns + a label ({size:.0f} MB), median of {args.repeats} "
               f"interleaved rounds (files ready in {time.perf_counter() - t0:.0f} s)")

        def labelled():
            ds = load_source(str(text), dtype=None)
            targets = Targets.fit("classification", ds.y)
            return targets.encode(ds.y)

        codes: dict[str, float] = {}

        def converter(cell: str) -> float:
            return codes.setdefault(cell, float(len(codes)))

        structured = np.dtype([(f"f{i}", "f8") for i in range(cols)] + [("label", "U16")])
        variants = {
            "np.loadtxt numeric.csv": lambda: np.loadtxt(numeric, delimiter=",", dtype=np.float64, ndmin=2),
            "dpbp load_source text.csv": lambda: load_source(str(text), dtype=None),
            "dpbp load_source numeric.csv": lambda: load_source(str(numeric), dtype=None),
            "dpbp text.csv + label encoding": labelled,
        }
        if args.options:
            variants.update({
                "np.loadtxt structured dtype text.csv": lambda: np.loadtxt(text, delimiter=",", dtype=structured),
                "np.loadtxt converter text.csv": lambda: np.loadtxt(text, delimiter=",", dtype=np.float64,
                                                                    converters={cols: converter}),
                "np.loadtxt 2 usecols passes text.csv": lambda: (
                    np.loadtxt(text, delimiter=",", dtype=np.float64, usecols=range(cols)),
                    np.loadtxt(text, delimiter=",", dtype=str, usecols=[cols])),
            })
        times: dict[str, list[float]] = {name: [] for name in variants}
        names = list(variants)
        for r in range(args.repeats):
            for name in names if r % 2 == 0 else names[::-1]:
                start = time.perf_counter()
                variants[name]()
                times[name].append(time.perf_counter() - start)
    ref = median(times[names[0]])
    rows = [{"variant": name, "seconds": median(t), "ratio": median(t) / ref, "min_s": min(t), "max_s": max(t)}
            for name, t in times.items()]
    print_table(rows, [("variant", "variant", ""), ("seconds", "median s", ".2f"), ("min_s", "min s", ".2f"),
                       ("max_s", "max s", ".2f"), ("ratio", "/ np.loadtxt", ".2f")])
    write_csv(out_dir(args.out) / "table.csv", rows)
    dpbp = median(times["dpbp load_source text.csv"]) / ref
    encoded = median(times["dpbp text.csv + label encoding"]) / ref
    print(f"SUMMARY table.py [{args.rows} x {cols}]: dpbp text.csv / np.loadtxt numeric.csv (target <= 1.5) "
          f"{dpbp:.2f}; with label encoding {encoded:.2f}; np.loadtxt {ref:.2f} s")


if __name__ == "__main__":
    main()
