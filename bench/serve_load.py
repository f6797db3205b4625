"""Load on the Serve endpoint (jobs/serve.py's application) with a real HTTP client.

    python bench/serve_load.py                                  # starts the app itself, scratch model
    python bench/serve_load.py --requests 3000 --mixed 2000 --batch-images 20000   # the table in docs/serving.md
    python bench/serve_load.py --url http://127.0.0.1:8000 --model results/vit_model.pth   # an app already running

1. Latency (p50/p95/p99) and throughput of single-image requests (raw JPEG bytes) at
   each --concurrency, --requests per level or --duration seconds, whichever ends first.
2. The same at the highest concurrency with batching off (max_batch_size 1), to show
   what batching buys (only when this script starts the app).
3. --mixed N requests mixing every bad kind (empty, not an image, truncated JPEG, over
   the size limit, a decompression bomb, wrong content type, top_k out of range) with
   good ones (raw and multipart): every good answer must equal the model run locally
   through the batch job's Predictor, every bad one get its 4xx, and no replica may
   restart (checked through Ray's state API when this script can reach the cluster).
4. --batch-images N: the batch job's steady per-image rate on N images, measured in the
   same run (bench/predict_throughput.py's job), and the ratio to the served throughput.

The scratch model is the scratch recipe's shape with random weights (ViT-tiny at 32 px,
images decoded at 32x24): speed does not depend on the weights. Every loop is bounded in
count and time; the script stops the app it started. Needs ../shared/data/fashion-small.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import httpx  # noqa: E402
import numpy as np  # noqa: E402

from fashion_vit.config import ENGINES  # noqa: E402

SCRATCH = {"vit_size": "tiny", "image_size": 32, "source_size": (32, 24)}


@dataclass
class Level:
    concurrency: int
    latencies_ms: list[float]
    seconds: float
    errors: int

    def row(self, label: str) -> str:
        q = np.percentile(self.latencies_ms, [50, 95, 99]) if self.latencies_ms else [float("nan")] * 3
        rate = len(self.latencies_ms) / self.seconds if self.seconds else 0.0
        return (
            f"| {label} | {self.concurrency} | {len(self.latencies_ms)} | {q[0]:.1f} | {q[1]:.1f} | {q[2]:.1f} "
            f"| {rate:.0f} | {self.errors} |"
        )

    @property
    def rate(self) -> float:
        return len(self.latencies_ms) / self.seconds if self.seconds else 0.0


def scratch_model(path: Path) -> Path:
    """The scratch recipe's model shape with random weights, saved once."""
    import torch

    from fashion_vit.config import MASTER_CATEGORIES, TrainConfig
    from fashion_vit.model import create_model, save_checkpoint
    from fashion_vit.transforms import Preprocessing

    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        cfg = TrainConfig(from_scratch=True, vit_size=SCRATCH["vit_size"], image_size=SCRATCH["image_size"])
        model, (mean, std) = create_model(cfg, list(MASTER_CATEGORIES))
        prep = Preprocessing(SCRATCH["image_size"], SCRATCH["source_size"], mean, std)
        save_checkpoint(str(path), model, prep, {"recipe": "scratch"}, {})
    return path


def load_images(data: Path, n: int) -> list[bytes]:
    paths = sorted((data / "images").iterdir())[:n]
    if len(paths) < n:
        sys.exit(f"only {len(paths)} images in {data}")
    return [p.read_bytes() for p in paths]


async def load_level(
    url: str, images: list[bytes], concurrency: int, requests: int, duration: float, health: bool = False
) -> Level:
    """`concurrency` clients posting single images back to back until `requests` were
    sent or `duration` seconds passed; with `health`, GET /healthz instead (the HTTP path
    through Serve without decoding or the model)."""
    sent = 0
    latencies: list[float] = []
    errors = 0
    # aiohttp, not httpx: on 2 shared cores the client's own CPU per request counts against
    # the server's, and httpx's is several times aiohttp's (the client alone took a whole
    # core at ~230 requests/s).
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as client:
        deadline = time.perf_counter() + duration

        async def worker() -> None:
            nonlocal sent, errors
            while sent < requests and time.perf_counter() < deadline:
                body = images[sent % len(images)]
                sent += 1
                t = time.perf_counter()
                if health:
                    request = client.get(url + "/healthz")
                else:
                    request = client.post(url + "/predict", data=body, headers={"content-type": "image/jpeg"})
                async with request as r:
                    await r.read()
                    ok = r.status == 200
                if ok:
                    latencies.append((time.perf_counter() - t) * 1000)
                else:
                    errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return Level(concurrency, latencies, time.perf_counter() - t0, errors)


# --- the mixed run ------------------------------------------------------------------


def bad_requests(images: list[bytes], max_image_mb: float, num_labels: int) -> dict[str, tuple]:
    """kind -> (content, headers, query, expected status)."""
    from PIL import Image

    jpeg = {"content-type": "image/jpeg"}
    bomb = io.BytesIO()
    Image.new("1", (10_000, 6_000)).save(bomb, "PNG")  # 60 megapixels in a few kB
    big = images[0] + os.urandom(int(max_image_mb * 1024**2))
    return {
        "empty": (b"", jpeg, "", 400),
        "not an image": (b"this is not an image\n" * 20, jpeg, "", 422),
        "truncated JPEG": (images[1][: len(images[1]) // 2], jpeg, "", 422),
        "over the size limit": (big, jpeg, "", 413),
        "decompression bomb": (bomb.getvalue(), {"content-type": "image/png"}, "", 413),
        "wrong content type": (images[2], {"content-type": "text/plain"}, "", 415),
        "top_k out of range": (images[3], jpeg, f"?top_k={num_labels + 1}", 400),
        "top_k not a number": (images[3], jpeg, "?top_k=three", 400),
    }


def expected_answers(model: str, images: list[bytes]) -> list[tuple[str, float]]:
    """(category, confidence) for each image, through the batch job's own Predictor."""
    from fashion_vit.model import load_checkpoint
    from fashion_vit.predict import Predictor
    from fashion_vit.transforms import decode_images

    saved = load_checkpoint(model)
    decoded, errors = decode_images(images, saved.preprocessing.source_size)
    assert not any(errors), errors
    out = Predictor(saved)({"image": decoded})
    return list(zip(out["predicted_category"], out["confidence"].tolist(), strict=True))


async def mixed_run(url: str, images: list[bytes], expected: list, total: int, concurrency: int, duration: float):
    """`total` requests, one in four bad (each kind in turn), the rest good (one in four
    of those multipart with two files): returns counts per outcome and the failures."""
    info = httpx.get(url + "/", timeout=30).json()
    bad = bad_requests(images, info["limits"]["max_image_mb"], len(info["labels"]))
    kinds = list(bad)
    tally: dict[str, int] = {}
    failures: list[str] = []
    next_i = 0

    def check_good(r: httpx.Response, picks: list[int], multipart: bool) -> str | None:
        if r.status_code != 200:
            return f"status {r.status_code}: {r.text[:200]}"
        body = r.json()
        answers = body["predictions"] if multipart else [body]
        for a, i in zip(answers, picks, strict=True):
            category, confidence = expected[i]
            if a["predicted_category"] != category or abs(a["confidence"] - confidence) > 1e-5:
                return f"image {i}: got {a['predicted_category']} {a['confidence']}, expected {category} {confidence}"
        return None

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency), timeout=60) as client:
        deadline = time.perf_counter() + duration

        async def worker() -> None:
            nonlocal next_i
            while next_i < total and time.perf_counter() < deadline:
                i = next_i
                next_i += 1
                if i % 4 == 3:
                    kind = kinds[(i // 4) % len(kinds)]
                    content, headers, query, status = bad[kind]
                    r = await client.post(url + "/predict" + query, content=content, headers=headers)
                    ok = r.status_code == status and set(r.json()) == {"error"}
                    problem = None if ok else f"{kind}: status {r.status_code} (expected {status}): {r.text[:200]}"
                elif i % 16 == 1:
                    kind = "good (multipart, 2 files)"
                    picks = [i % len(images), (i + 7) % len(images)]
                    files = [("file", (f"{p}.jpg", images[p], "image/jpeg")) for p in picks]
                    r = await client.post(url + "/predict", files=files)
                    problem = check_good(r, picks, multipart=True)
                else:
                    kind = "good (raw)"
                    pick = i % len(images)
                    r = await client.post(
                        url + "/predict", content=images[pick], headers={"content-type": "image/jpeg"}
                    )
                    problem = check_good(r, [pick], multipart=False)
                tally[kind] = tally.get(kind, 0) + 1
                if problem:
                    failures.append(problem)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return tally, failures, time.perf_counter() - t0


def replicas() -> dict | None:
    """{actor id: (pid, restarts)} of the app's live replicas, or None without a cluster to ask."""
    import ray

    if not ray.is_initialized():
        return None
    from ray.util.state import list_actors

    from fashion_vit.serve import APP_NAME, DEPLOYMENT_NAME

    name = f"ServeReplica:{APP_NAME}:{DEPLOYMENT_NAME}"
    filters = [("class_name", "=", name), ("state", "=", "ALIVE")]
    # This process's Ray by its address: the machine may run others.
    actors = list_actors(address=ray.get_runtime_context().gcs_address, filters=filters, detail=True)
    return {a.actor_id: (a.pid, a.num_restarts) for a in actors}


# --- main ---------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="an app already running (default: start one on a local Ray)")
    p.add_argument("--model", help="vit_model.pth (default: the scratch model with random weights)")
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "fashion-small")
    p.add_argument("--images", type=int, default=500, help="distinct real images to send")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=2000, help="requests per concurrency level, after --warmup")
    p.add_argument("--duration", type=float, default=60, help="seconds per level at most")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--no-unbatched", action="store_true", help="skip the batching-off run")
    p.add_argument("--mixed", type=int, default=2000, help="requests in the mixed good/bad run (0: skip)")
    p.add_argument("--batch-images", type=int, default=0, help="also measure the batch job on this many images")
    p.add_argument("--max-batch-size", type=int, help="for the app this script starts (default: ServeConfig's)")
    p.add_argument("--batch-wait-ms", type=float, help="for the app this script starts (default: ServeConfig's)")
    p.add_argument(
        "--sweep",
        nargs="+",
        metavar="SIZE:WAIT_MS",
        help="instead of the report: each max_batch_size:batch_wait_ms in turn, --rounds times interleaved",
    )
    p.add_argument("--rounds", type=int, default=2, help="rounds of --sweep")
    p.add_argument(
        "--engine", choices=ENGINES, help="for the app and the batch job (default: ServeConfig's, the job's)"
    )
    p.add_argument("--access-log", action="store_true", help="the app this script starts logs every request")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--work", type=Path, default=ROOT / "bench" / "out")
    args = p.parse_args()

    model = args.model or str(scratch_model(args.work / "serve-scratch-vit-tiny-32.pth"))
    images = load_images(args.data, args.images)
    started = None
    if args.url is None:
        started, url = start_app(args, model)
    else:
        url = args.url.rstrip("/")
    if args.sweep and started is None:
        sys.exit("--sweep redeploys the app: it needs the app this script starts (no --url)")
    try:
        if args.sweep:
            print(sweep(args, url, images, started))
            return
        report, served_rate = measure(args, url, model, images, started)
    finally:
        if started is not None:
            import ray

            from fashion_vit import serve as serving

            serving.stop()
            ray.shutdown()
    if args.batch_images:  # after the app is gone: the batch job gets the machine to itself
        rate = batch_job_rate(args, model)
        report += (
            f"\nbatch job steady rate: {rate:.0f} images/s; served at concurrency {max(args.concurrency)}: "
            f"{served_rate:.0f} requests/s, ratio {served_rate / rate:.2f}"
        )
    print(report)


def start_app(args, model: str):
    from fashion_vit import serve as serving
    from fashion_vit.config import ServeConfig

    cfg = ServeConfig(model=model, port=args.port, access_log=args.access_log)
    if args.max_batch_size is not None:
        cfg = replace(cfg, max_batch_size=args.max_batch_size)
    if args.batch_wait_ms is not None:
        cfg = replace(cfg, batch_wait_ms=args.batch_wait_ms)
    if args.engine is not None:
        cfg = replace(cfg, engine=args.engine)
    url = serving.run(cfg.validate(), log=lambda *a: print(*a, file=sys.stderr))
    return cfg, url


def redeploy(cfg) -> None:
    from ray import serve

    from fashion_vit import serve as serving

    serve.run(serving.build_app(cfg), name=serving.APP_NAME, route_prefix="/")


def measure(args, url: str, model: str, images: list[bytes], started) -> tuple[str, float]:
    t_start = time.perf_counter()
    out = ["| run | concurrency | requests | p50 ms | p95 ms | p99 ms | requests/s | non-200 |", "| --- " * 8 + "|"]
    asyncio.run(load_level(url, images, max(args.concurrency), args.warmup, args.duration))
    levels = {}
    for c in args.concurrency:
        levels[c] = asyncio.run(load_level(url, images, c, args.requests, args.duration))
        out.append(levels[c].row("batched"))
        print(out[-1], file=sys.stderr, flush=True)
    top = max(args.concurrency)
    # Where the time goes that a batch job does not spend: the HTTP path alone.
    health = asyncio.run(load_level(url, images, top, args.requests, args.duration, health=True))
    out.append(health.row("GET /healthz (no decode, no model)"))
    if started is not None and not args.no_unbatched:
        redeploy(replace(started, max_batch_size=1, batch_wait_ms=0))
        asyncio.run(load_level(url, images, top, args.warmup, args.duration))
        off = asyncio.run(load_level(url, images, top, args.requests, args.duration))
        out.append(off.row("batching off"))
        out.append(f"\nbatching buys x{levels[top].rate / off.rate:.2f} throughput at concurrency {top}")
        redeploy(started)
    info = httpx.get(url + "/", timeout=30).json()
    out.append(f"batching: {json.dumps(info['batching'])}, model {info['model']} ({info['input_size']} px)")
    if args.mixed:
        before = replicas()
        expected = expected_answers(model, images)
        tally, failures, seconds = asyncio.run(mixed_run(url, images, expected, args.mixed, 16, args.duration * 3))
        after = replicas()
        out.append(f"\nmixed run: {sum(tally.values())} requests in {seconds:.1f}s: {json.dumps(tally)}")
        out.append(f"mixed run failures: {len(failures)}" + "".join(f"\n  {f}" for f in failures[:10]))
        if before is None:
            out.append("replica restarts: not checked (no Ray connection in this process)")
        else:
            out.append(f"replicas before {before}, after {after}: {'no restart' if before == after else 'CHANGED'}")
    out.append(
        f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; bench {time.perf_counter() - t_start:.0f}s"
    )
    return "\n".join(out), levels[top].rate


def sweep(args, url: str, images: list[bytes], started) -> str:
    """Latency at the lowest concurrency and throughput at the highest for each batch setting."""
    low, top = min(args.concurrency), max(args.concurrency)
    settings = [tuple(float(v) for v in text.split(":")) for text in args.sweep]
    results: dict[tuple, list[tuple[float, float, float]]] = {s: [] for s in settings}
    for r in range(args.rounds):
        for size, wait in settings:
            redeploy(replace(started, max_batch_size=int(size), batch_wait_ms=wait))
            asyncio.run(load_level(url, images, top, args.warmup, args.duration))
            one = asyncio.run(load_level(url, images, low, args.requests // 4, args.duration))
            many = asyncio.run(load_level(url, images, top, args.requests, args.duration))
            p50, p99 = np.percentile(one.latencies_ms, [50, 99])
            results[(size, wait)].append((p50, p99, many.rate))
            print(f"round {r + 1}: batch {int(size)}, wait {wait:g} ms: c={low} p50 {p50:.1f} ms p99 {p99:.1f} ms; "
                  f"c={top} {many.rate:.0f}/s (load average {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)  # fmt: skip
    out = [f"| max_batch_size | batch_wait_ms | p50 ms at {low} | p99 ms at {low} | requests/s at {top} |"]
    out.append("| --- " * 5 + "|")
    for (size, wait), runs in results.items():
        p50, p99, rate = (statistics.median(v) for v in zip(*runs, strict=True))
        out.append(f"| {int(size)} | {wait:g} | {p50:.1f} | {p99:.1f} | {rate:.0f} |")
    out.append(f"medians of {args.rounds} rounds; machine: {os.cpu_count()} CPUs")
    return "\n".join(out)


def batch_job_rate(args, model: str) -> float:
    """The batch job's steady rate (first prediction to last) on --batch-images files, on the served engine."""
    sys.path.insert(0, str(ROOT / "bench"))
    from predict_throughput import job, make_folder

    folder = make_folder(args.data, args.batch_images, args.work / f"images-{args.batch_images}")
    report = job(folder, Path(model), args.work / "serve-batch-pred.csv", 64, ROOT, engine=args.engine)
    return report.get("steady_rate", report["rate"])


if __name__ == "__main__":
    main()
