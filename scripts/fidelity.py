#!/usr/bin/env python3
"""Export each hard fixture (int8 + int4) and print the export's own parity figures.

    python scripts/fidelity.py --work /tmp/fid                  # the four narrow fixtures
    python scripts/fidelity.py --work /tmp/fid --fixture normal --int8-scheme smoothquant
    python scripts/fidelity.py --work /tmp/fid --real-shape     # deep-high-variance, 0.6B shape

Prints one JSON line per fixture: min cosine per precision (the validator's probes), the
calibration fidelity and escalations the exporter recorded, the export time and sizes.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path


def main() -> int:
    from qwen3emb.convert.hard_checkpoints import FIXTURES, build_hard_checkpoint

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--fixture", action="append", choices=FIXTURES)
    parser.add_argument("--int8-scheme", default=None)
    parser.add_argument("--real-shape", action="store_true",
                        help="deep-high-variance in the 0.6B shape (N(0, 0.05), 28 layers)")
    parser.add_argument("--precision", action="append", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from qwen3emb.pipeline import export_bundle

    args.work.mkdir(parents=True, exist_ok=True)
    jobs = ["deep-high-variance-0.6B"] if args.real_shape else (args.fixture or list(FIXTURES))
    for kind in jobs:
        ckpt = args.work / f"ckpt-{kind}"
        if not (ckpt / "config.json").exists():
            shutil.rmtree(ckpt, ignore_errors=True)
            if kind.endswith("0.6B"):
                from qwen3emb.convert.random_checkpoint import write_random_shards

                write_random_shards(ckpt, preset="0.6B", initializer_range=0.05)
            else:
                build_hard_checkpoint(ckpt, kind)
        start = time.perf_counter()
        row: dict = {"fixture": kind, "int8_scheme": args.int8_scheme}
        try:
            result = export_bundle(ckpt, args.work / f"bundle-{kind}", force=True,
                                   precisions=args.precision or ["int8", "int4"],
                                   int8_scheme=args.int8_scheme)
        except Exception as error:  # report and go on with the next fixture
            row["error"] = f"{type(error).__name__}: {error}"
            print(json.dumps(row), flush=True)
            continue
        row["export_s"] = round(time.perf_counter() - start, 1)
        row["min_cosine"] = {a.precision: round(a.min_cosine, 5) for a in result.report.artifacts}
        for entry in result.manifest["artifacts"]:
            if entry.get("role") == "model":
                settings = entry.get("settings", {})
                row[entry["precision"]] = {
                    "MB": round(entry["size"] / 1e6, 2),
                    **{k: settings[k] for k in ("calibration_fidelity", "escalated", "rounds",
                                                "embedding_outlier_columns") if k in settings}}
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
