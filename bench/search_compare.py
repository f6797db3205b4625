"""Random search against Optuna's TPE, both under ASHA, on a fixed budget.

    python bench/search_compare.py                       # 2 searchers x 3 seeds, 12 trials each
    python bench/search_compare.py --limit 600 --epochs 1 --num-samples 2 --seeds 0   # check the script

Each run is jobs/tune.py with the scratch recipe on a stratified --limit sample of
--data-dir, with --search asha or optuna, --num-samples trials after the baseline and
--seed. The seed draws the sample, the split, the initialisation and the searcher's
sampling, and both searchers run every seed: each seed is a paired comparison on the
same data. Everything after `--` is passed to jobs/tune.py as well.

Each run has its own folder under --work (summary.json, vit_model.pth, search.png,
report.md); a run whose folder already holds a summary.json is read, not rerun, so an
interrupted comparison continues where it stopped. Prints a markdown table, one row per
run and the mean per searcher: the best validation accuracy, the test accuracy of the
exported model, the trial number (in order of creation, 1 = the baseline) at which the
best was found, how many trials ASHA stopped, and the job's minutes.

All runs share one local Ray, started by the first (fashion_vit.cluster.start_ray names
its dashboard for the workers, so another Ray on the machine does not stall a search).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fashion_vit import tune  # noqa: E402
from fashion_vit.report import stop_reason  # noqa: E402
from jobs.tune import parse_args  # noqa: E402

SEARCHERS = ("asha", "optuna")
LABELS = {"asha": "random + ASHA", "optuna": "TPE + ASHA"}  # --search asha samples at random


def run_one(searcher: str, seed: int, args, extra: list[str]) -> dict:
    """One jobs/tune.py run (or the summary.json of an earlier one), reduced to a row."""
    out = args.work / f"{searcher}-seed{seed}"
    summary_path = out / "summary.json"
    if summary_path.is_file():
        print(f"{searcher} seed {seed}: reading {summary_path} (delete it to rerun)", flush=True)
    else:
        flags = [
            "--data-dir",
            str(args.data_dir),
            "--from-scratch",
            "--limit",
            str(args.limit),
            "--search",
            searcher,
            "--num-samples",
            str(args.num_samples),
            "--seed",
            str(seed),
            "--output-dir",
            str(out),
            "--name",
            f"fashion-vit-compare-{searcher}-seed{seed}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}",
            *(["--epochs", str(args.epochs)] if args.epochs else []),
            *extra,
        ]
        print(f"{searcher} seed {seed}: jobs/tune.py {' '.join(flags)}", flush=True)
        tune.run(parse_args(flags).validate(), log=lambda *_: None)
    summary = json.loads(summary_path.read_text())
    best, trials = summary["best"], summary["trials"]
    epochs = summary["train_config"]["epochs"]
    row = {
        "searcher": searcher,
        "seed": seed,
        "best_val_accuracy": best["val"]["val_accuracy"],
        "test_accuracy": best["test"]["accuracy"],
        "best_trial_number": best["trial_number"],
        "trials": len(trials),
        "stopped_by_asha": sum(stop_reason(t, epochs).startswith("stopped") for t in trials),
        "errors": sum(t["error"] is not None for t in trials),
        "minutes": sum(summary["timings"].values()) / 60,
    }
    print(
        f"{searcher} seed {seed}: val {row['best_val_accuracy']:.4f} test {row['test_accuracy']:.4f} "
        f"best at trial {row['best_trial_number']} of {row['trials']}, {row['minutes']:.1f} min",
        flush=True,
    )
    return row


def table(rows: list[dict]) -> str:
    lines = [
        "| searcher | seed | best val accuracy | test accuracy | best found at trial | stopped by ASHA | minutes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {LABELS[r['searcher']]} | {r['seed']} | {r['best_val_accuracy']:.4f} | {r['test_accuracy']:.4f} | "
            f"{r['best_trial_number']} of {r['trials']} | {r['stopped_by_asha']} | {r['minutes']:.1f} |"
        )
    for searcher in dict.fromkeys(r["searcher"] for r in rows):
        mine = [r for r in rows if r["searcher"] == searcher]
        mean = lambda key, mine=mine: statistics.mean(r[key] for r in mine)
        lines.append(
            f"| **{LABELS[searcher]}, mean of {len(mine)}** | | {mean('best_val_accuracy'):.4f} | "
            f"{mean('test_accuracy'):.4f} | {mean('best_trial_number'):.1f} | {mean('stopped_by_asha'):.1f} | "
            f"{mean('minutes'):.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data" / "fashion-small")
    p.add_argument("--limit", type=int, default=6000, help="stratified sample of this many images")
    p.add_argument("--num-samples", type=int, default=11, help="trials after the baseline (11: 12 trials)")
    p.add_argument("--epochs", type=int, default=None, help="default: the scratch recipe's")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--searchers", nargs="+", choices=SEARCHERS, default=list(SEARCHERS))
    p.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "search-compare")
    p.add_argument("tune_flags", nargs=argparse.REMAINDER, help="-- then more jobs/tune.py flags")
    args = p.parse_args()
    extra = args.tune_flags[1:] if args.tune_flags[:1] == ["--"] else args.tune_flags

    rows = [run_one(searcher, seed, args, extra) for seed in args.seeds for searcher in args.searchers]
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "results.json").write_text(json.dumps(rows, indent=2))
    print(
        f"\n{os.cpu_count()} CPUs; scratch recipe, --limit {args.limit}, {1 + args.num_samples} trials per run"
        + (f", --epochs {args.epochs}" if args.epochs else "")
        + (f", {' '.join(extra)}" if extra else "")
        + "\n"
    )
    print(table(rows))


if __name__ == "__main__":
    main()
