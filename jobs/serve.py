"""Serve a trained model over HTTP with Ray Serve, until Ctrl-C.

    python jobs/serve.py --model results/vit_model.pth [--port 8000] [--num-replicas 2 | --max-replicas 4]
    curl -H 'Content-Type: image/jpeg' --data-binary @photo.jpg 'http://127.0.0.1:8000/predict?top_k=3'

Runs on a local Ray, or on the cluster at --address / RAY_ADDRESS (also under
`ray job submit`). Listens on 127.0.0.1 unless --host says otherwise. Endpoints,
limits and scaling: docs/serving.md.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fashion_vit import serve as serving
from fashion_vit.cli import parse_config, run_job
from fashion_vit.config import ServeConfig


def parse_args(argv=None) -> ServeConfig:
    return ServeConfig(**parse_config(ServeConfig, argv, "serve.py", __doc__))


def main(argv=None) -> int:
    """Serves until Ctrl-C, or SIGTERM (what `ray job stop` sends)."""

    def job():
        cfg = parse_args(argv).validate()
        url = serving.run(cfg)
        try:
            print(f"POST {url}/predict, GET {url}/healthz, GET {url}/ (Ctrl-C to stop)", flush=True)
            _wait_for_stop()
        finally:
            serving.stop()
            print("stopped", flush=True)

    return run_job("serve.py", job)


def _wait_for_stop() -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
