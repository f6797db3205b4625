"""The jobs as commands: `fashion-vit tune|predict|evaluate|export|serve` after pip install,
and `python jobs/<job>.py` in a checkout (what `ray job submit --working-dir .` runs).
Both call the functions here with the same flags; only the name in their help, error
lines and continue commands differs. The library is imported when a command runs, so
that `fashion-vit --version` and `--help` answer at once."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from fashion_vit.cli import parse_config, run_job

TUNE = """Fine-tune a ViT on fashion product images with Ray Train inside Ray Tune.

    {run}                                   # the baseline fine-tune
    {run} --search asha --num-samples 8     # + 8 sampled trials under ASHA
    {run} --search optuna --num-samples 8   # the same, chosen by Optuna's TPE
    {run} --data-dir DIR --from-scratch     # offline: the scratch recipe
    {run} --data-dir photos/                # class folders: photos/<label>/<image>
    {run} --labels labels.parquet --image-column path --label-column category
    {run} --model vit-folder/ --recipe pretrained-cpu --data-dir DIR   # pretrained, ~15 min on 2 cores

Data: --data-dir (Kaggle layout or class folders), --labels (a CSV or Parquet table) or
--dataset (a Hugging Face dataset); docs/data.md says what each reads and skips.

Training values not given on the command line come from a recipe: "pretrained" (the
seed's fine-tune) or, with --from-scratch, "scratch" (a tiny ViT at 32 px, 6 epochs), which
becomes "scratch-gpu" when the workers have GPUs (a small ViT at 64 px, 30 epochs);
"pretrained-cpu" only when asked for. docs/training.md has them all.

The best-accuracy model lands in results/vit_model.pth, a summary in results/summary.json.
"""

PREDICT = """Label image folders, or the images a table lists, with a trained model, using Ray Data.

    {run} --input photos/ [--input more/] [--model results/vit_model.pth]
    {run} --input-table catalogue.csv --path-column image --keep-columns product_id,sku
    {run} --input photos/ --model results/model.onnx   # ONNX Runtime (the export command)
    {run} --input photos/ --engine compile             # torch.compile

Writes one CSV ([kept columns,] path, predicted_category, confidence, error[, label_i,
prob_i]): one row per table row, in the table's order, then the folders' files sorted
by path. A file that is missing or cannot be decoded gets a row with the reason in `error`.
"""

EVALUATE = """Score a trained model on labelled images and write a report to look at.

    {run} --model results/vit_model.pth                 # its own test split
    {run} --model results/vit_model.pth --data-dir DIR  # a Kaggle-layout or class folder
    {run} --model results/vit_model.pth --labels labels.csv --label-column category

Writes metrics.json, per_class.csv, confusion_matrix.png and errors.png (the most
confident mistakes) to results/report/ (or --output).
"""

EXPORT = """Export a trained model as ONNX, checked against PyTorch on real images.

    {run} --model results/vit_model.pth                      # -> results/model.onnx + model.json
    {run} --model results/vit_model.pth --images photos/     # check on these images
    {run} --model results/vit_model.pth --quantize int8      # also results/model.int8.onnx

The ONNX file's metadata (and the JSON beside it) holds the labels, the input size,
mean/std and the resize the model expects. Run it with the batch job's
`--model results/model.onnx`, or any ONNX runtime. Needs pip install -e '.[onnx]'.
"""

SERVE = """Serve a trained model over HTTP with Ray Serve, until Ctrl-C.

    {run} --model results/vit_model.pth [--port 8000] [--num-replicas 2 | --max-replicas 4]
    curl -H 'Content-Type: image/jpeg' --data-binary @photo.jpg 'http://127.0.0.1:8000/predict?top_k=3'

Runs on a local Ray, or on the cluster at --address / RAY_ADDRESS (also under
`ray job submit`). Listens on 127.0.0.1 unless --host says otherwise. Endpoints,
limits and scaling: docs/serving.md.
"""


@dataclass(frozen=True)
class Invocation:
    """How a command was started: its name in help and error lines, and the words that
    start it again (the continue command a stopped job prints)."""

    prog: str
    again: list[str]

    @classmethod
    def script(cls, path: str) -> Invocation:
        """`python jobs/<job>.py`."""
        import os

        return cls(os.path.basename(path), [sys.executable, path])


def _usage(text: str, how: Invocation) -> str:
    import os
    import shlex

    words = [os.path.relpath(w) if w.endswith(".py") else w for w in how.again]
    run = shlex.join(["python", *words[1:]] if words[0] == sys.executable else words)
    return text.format(run=run)


def parse_tune(argv=None, how: Invocation | None = None):
    from fashion_vit.config import TrainConfig, with_recipe

    how = how or Invocation("tune.py", [sys.executable, "jobs/tune.py"])
    return with_recipe(parse_config(TrainConfig, argv, how.prog, _usage(TUNE, how)))


def tune(argv=None, how: Invocation | None = None) -> int:
    how = how or Invocation("fashion-vit tune", ["fashion-vit", "tune"])

    def job():
        from fashion_vit import tune as tuning

        print(tuning.run(parse_tune(argv, how).validate()).summary())

    return run_job(how.prog, job, argv, how.again)


def parse_predict(argv=None, how: Invocation | None = None):
    from fashion_vit.config import PredictConfig

    how = how or Invocation("batch_predict.py", [sys.executable, "jobs/batch_predict.py"])
    return PredictConfig(**parse_config(PredictConfig, argv, how.prog, _usage(PREDICT, how)))


def predict(argv=None, how: Invocation | None = None) -> int:
    how = how or Invocation("fashion-vit predict", ["fashion-vit", "predict"])

    def job():
        from fashion_vit import predict as prediction

        print(prediction.run(parse_predict(argv, how).validate()).summary())

    return run_job(how.prog, job, argv, how.again)


def parse_evaluate(argv=None, how: Invocation | None = None):
    from fashion_vit.config import EvalConfig

    how = how or Invocation("evaluate.py", [sys.executable, "jobs/evaluate.py"])
    return EvalConfig(**parse_config(EvalConfig, argv, how.prog, _usage(EVALUATE, how)))


def evaluate(argv=None, how: Invocation | None = None) -> int:
    how = how or Invocation("fashion-vit evaluate", ["fashion-vit", "evaluate"])

    def job():
        from fashion_vit import evaluate as evaluation

        cfg = parse_evaluate(argv, how).validate()
        evaluation.run(cfg)
        print(f"report: {cfg.output}")

    return run_job(how.prog, job, argv, how.again)


def parse_export(argv=None, how: Invocation | None = None):
    from fashion_vit.config import ExportConfig

    how = how or Invocation("export.py", [sys.executable, "jobs/export.py"])
    return ExportConfig(**parse_config(ExportConfig, argv, how.prog, _usage(EXPORT, how)))


def export(argv=None, how: Invocation | None = None) -> int:
    how = how or Invocation("fashion-vit export", ["fashion-vit", "export"])

    def job():
        from fashion_vit import export as exporting

        print(exporting.run(parse_export(argv, how).validate()).summary())

    return run_job(how.prog, job, argv, how.again)


def parse_serve(argv=None, how: Invocation | None = None):
    from fashion_vit.config import ServeConfig

    how = how or Invocation("serve.py", [sys.executable, "jobs/serve.py"])
    return ServeConfig(**parse_config(ServeConfig, argv, how.prog, _usage(SERVE, how)))


def serve(argv=None, how: Invocation | None = None) -> int:
    how = how or Invocation("fashion-vit serve", ["fashion-vit", "serve"])

    def job():
        from fashion_vit import serve as serving

        cfg = parse_serve(argv, how).validate()
        url = serving.run(cfg)
        try:
            print(f"POST {url}/predict, GET {url}/healthz, GET {url}/ (Ctrl-C to stop)", flush=True)
            _wait_for_stop()
        finally:
            serving.stop()
            print("stopped", flush=True)

    return run_job(how.prog, job, argv, how.again)


def _wait_for_stop() -> None:
    """Until Ctrl-C or SIGTERM: the one way a server is told to stop."""
    import signal
    import threading

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass


COMMANDS = {"tune": tune, "predict": predict, "evaluate": evaluate, "export": export, "serve": serve}
SUMMARY = {"tune": TUNE, "predict": PREDICT, "evaluate": EVALUATE, "export": EXPORT, "serve": SERVE}


def main(argv: list[str] | None = None) -> int:
    """`fashion-vit COMMAND [flags]`: the [project.scripts] entry point."""
    from fashion_vit import __version__

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["--version"], ["-V"]):
        print(f"fashion-vit {__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help", "help"):
        lines = [f"  {name:<9} {SUMMARY[name].splitlines()[0]}" for name in COMMANDS]
        print("usage: fashion-vit COMMAND [flags]   (fashion-vit COMMAND --help for its flags)\n")
        print("commands:\n" + "\n".join(lines) + "\n\nDocs: README.md and docs/ in the project's repository.")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"fashion-vit: error: no command {name!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return COMMANDS[name](rest, Invocation(f"fashion-vit {name}", ["fashion-vit", name]))
