"""The Serve endpoint: answers equal to the batch job's on real images, every bad request
a 4xx with the server still answering, and a killed replica replaced by Serve.

One application serves the whole module, on the session's Ray, through a real HTTP
client on 127.0.0.1; Serve is shut down at the end. The checks without Ray come first."""

from __future__ import annotations

import csv
import io
import os
import signal
import socket
import threading
import time

import httpx
import pytest
import yaml
from PIL import Image

from fashion_vit.config import ConfigError, ServeConfig
from fashion_vit.serve import (
    RequestError,
    Upload,
    app_builder,
    content_kind,
    decode_upload,
    deployment_options,
    parse_top_k,
)
from tests.conftest import ROOT, Exploit

MAX_IMAGE_MB = 1  # small, so that the over-the-limit request is quick to send


def jpeg_bytes(shared_data, n: int) -> list[tuple[str, bytes]]:
    paths = sorted((shared_data / "images").iterdir())[:n]
    return [(p.name, p.read_bytes()) for p in paths]


# --- without Ray ----------------------------------------------------------------------


def test_request_checks_refuse_with_their_status(shared_data):
    (_, good), (_, other) = jpeg_bytes(shared_data, 2)
    assert parse_top_k(None, 6) == 0 and parse_top_k("6", 6) == 6
    for bad in ("7", "-1", "two", "1.5"):
        with pytest.raises(RequestError) as e:
            parse_top_k(bad, 6)
        assert e.value.status == 400
    assert content_kind("image/jpeg") == content_kind("application/octet-stream") == content_kind(None) == "raw"
    assert content_kind("multipart/form-data; boundary=x") == "multipart"
    for media in ("text/plain", "application/json", "application/x-www-form-urlencoded"):
        with pytest.raises(RequestError) as e:
            content_kind(media)
        assert e.value.status == 415
    assert decode_upload(Upload("", good), (32, 24), 50_000_000).shape == (32, 24, 3)
    bomb = io.BytesIO()
    Image.new("1", (10_000, 6_000)).save(bomb, "PNG")  # 60 megapixels in a few kB
    cases = {
        b"": 400,
        b"not an image at all": 422,
        other[: len(other) // 2]: 422,
        bomb.getvalue(): 413,
    }
    for data, status in cases.items():
        with pytest.raises(RequestError) as e:
            decode_upload(Upload("x.jpg", data), (32, 24), 50_000_000)
        assert e.value.status == status and "x.jpg" in e.value.message and "\n" not in e.value.message


def test_deployment_options_follow_the_flags():
    cfg = ServeConfig(model="m.pth", num_replicas=3, cpus_per_replica=2, max_batch_size=8)
    options = deployment_options(cfg, gpus=True)
    assert options["num_replicas"] == 3 and "autoscaling_config" not in options
    assert options["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 1}
    assert options["max_ongoing_requests"] >= 8  # else Serve never fills a batch
    auto = deployment_options(ServeConfig(model="m.pth", max_replicas=4, min_replicas=0), gpus=False)
    assert "num_replicas" not in auto and auto["ray_actor_options"] == {"num_cpus": 1}
    assert auto["autoscaling_config"]["min_replicas"] == 0 and auto["autoscaling_config"]["max_replicas"] == 4


def test_serve_config_file_is_a_valid_serve_config(tmp_path):
    """serve_config.yaml parses as Serve's own schema, and its args build the app."""
    from ray.serve.schema import ServeDeploySchema

    with open(ROOT / "serve_config.yaml") as f:
        config = yaml.safe_load(f)
    schema = ServeDeploySchema.model_validate(config)
    assert schema.http_options.host == "127.0.0.1"
    (app,) = config["applications"]
    assert app["import_path"] == "fashion_vit.serve:app_builder"
    model = tmp_path / "vit_model.pth"
    model.write_bytes(b"")  # the builder checks that it exists; the replicas load it
    args = {**app["args"], "model": str(model)}
    from ray.serve import Application

    assert isinstance(app_builder(args), Application)
    # `serve run fashion_vit.serve:app_builder key=value` passes strings: converted as the flags are.
    assert isinstance(app_builder({"model": str(model), "max_batch_size": "32", "use_gpu": "false"}), Application)
    with pytest.raises(ConfigError, match="invalid application args"):
        app_builder({"model": str(model), "max_batch_size": "many"})
    with pytest.raises(ConfigError, match="unknown argument"):
        app_builder({**args, "modle": "x"})


def test_cli_refuses_bad_flags_before_starting_anything(tmp_path, capsys):
    from jobs import serve as serve_job

    assert serve_job.main(["--model", str(tmp_path / "missing.pth")]) == 2
    model = tmp_path / "m.pth"
    model.write_bytes(b"")
    assert serve_job.main(["--model", str(model), "--num-replicas", "2", "--max-replicas", "3"]) == 2
    assert serve_job.main(["--model", str(model), "--max-replicas", "2", "--min-replicas", "3"]) == 2
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert serve_job.main(["--model", str(model), "--port", str(taken.getsockname()[1])]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 4 and "does not exist" in err[0] and "not both" in err[1] and "--min-replicas" in err[2]
    assert "cannot listen" in err[3]


def test_cli_refuses_a_hostile_model_file_in_one_line(tmp_path, capsys):
    from jobs import serve as serve_job

    evil, marker = tmp_path / "evil.pth", tmp_path / "pwned"
    import torch

    torch.save({"format": "fashion-vit/1", "x": Exploit(marker)}, evil)  # a hostile .pth, as torch.save writes one
    assert serve_job.main(["--model", str(evil)]) == 1  # refused before Ray starts
    (line,) = capsys.readouterr().err.splitlines()
    assert "refused" in line and not marker.exists()


# --- one application for the rest ----------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def batch_answers(trained, samples, ray_session, tmp_path_factory):
    """The batch job's rows for 16 holdout images, made before the server starts: the
    job and a replica would share the session's 2 CPUs."""
    from jobs import batch_predict

    names = sorted(os.listdir(samples["holdout"] / "images"))[:16]
    folder = tmp_path_factory.mktemp("serve-in")
    for name in names:
        os.symlink(samples["holdout"] / "images" / name, folder / name)
    out = tmp_path_factory.mktemp("serve-out") / "pred.csv"
    argv = ["--input", str(folder), "--model", str(trained / "vit_model.pth"), "--output", str(out), "--top-k", "3"]
    assert batch_predict.main([*argv, "--quiet"]) == 0
    with open(out, newline="") as f:
        return folder, names, {os.path.basename(r["path"]): r for r in csv.DictReader(f)}


@pytest.fixture(scope="module")
def server(trained, batch_answers, ray_session):
    from ray import serve

    from fashion_vit import serve as serving

    cfg = ServeConfig(model=str(trained / "vit_model.pth"), port=free_port(), max_image_mb=MAX_IMAGE_MB, max_files=4)
    url = serving.run(cfg.validate(), log=lambda *a: None)
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            yield client
    finally:
        # As the server's Ctrl-C stops it: the application, waiting until its replicas
        # are gone. serve.shutdown() alone stops waiting after 30 s, and can leave a
        # replica holding its CPU (likely on CI at ed245c0: the next four trainings on
        # the session's Ray waited 900 s each).
        try:
            serving.stop()
        finally:
            serve.shutdown()


@pytest.mark.slow
def test_answers_equal_the_batch_job_on_real_images(server, batch_answers):
    folder, names, expected = batch_answers
    # 12 one by one, concurrently (so that they meet in batches), 4 in one multipart request.
    raw, multi = names[:12], names[12:16]
    answers = {}

    def post_raw(name):
        r = server.post(
            "/predict?top_k=3", content=(folder / name).read_bytes(), headers={"content-type": "image/jpeg"}
        )
        assert r.status_code == 200, r.text
        answers[name] = r.json()

    threads = [threading.Thread(target=post_raw, args=(n,)) for n in raw]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60  # one wait for all of them: each request has 30 s
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "requests still unanswered after 60 s"
    files = [("files", (n, (folder / n).read_bytes(), "image/jpeg")) for n in multi]
    r = server.post("/predict", params={"top_k": 3}, files=files)
    assert r.status_code == 200, r.text
    predictions = r.json()["predictions"]
    assert [p["file"] for p in predictions] == multi
    answers.update({p.pop("file"): p for p in predictions})

    assert sorted(answers) == sorted(raw + multi)
    for name, got in answers.items():
        want = expected[name]
        assert set(got) == {
            "predicted_category",
            "confidence",
            "label_1",
            "prob_1",
            "label_2",
            "prob_2",
            "label_3",
            "prob_3",
        }
        assert got["predicted_category"] == want["predicted_category"] == got["label_1"]
        assert got["confidence"] == pytest.approx(float(want["confidence"]), abs=1e-5)
        for j in (2, 3):
            assert got[f"label_{j}"] == want[f"label_{j}"]
            assert got[f"prob_{j}"] == pytest.approx(float(want[f"prob_{j}"]), abs=1e-5)
    # Without top_k: the batch job's default columns.
    r = server.post("/predict", content=(folder / raw[0]).read_bytes(), headers={"content-type": "image/png"})
    assert set(r.json()) == {"predicted_category", "confidence"}


@pytest.mark.slow
def test_model_description_and_health(server, trained):
    import json

    from fashion_vit.model import load_checkpoint

    saved = load_checkpoint(str(trained / "vit_model.pth"))
    assert server.get("/healthz").json() == {"status": "ok"}
    info = server.get("/").json()
    assert info["labels"] == saved.labels and info["input_size"] == saved.preprocessing.image_size
    assert info["recipe"] == "scratch" and info["trained_with"]["vit_size"] == "tiny"
    summary = json.loads((trained / "summary.json").read_text())
    assert info["test_metrics"]["accuracy"] == pytest.approx(summary["best"]["test"]["accuracy"])
    assert str(trained) not in json.dumps(info)  # no server paths


def bad_requests(shared_data) -> list[tuple[str, dict, int, str]]:
    """(name, httpx.post kwargs, expected status, a word the error must hold)."""
    (_, good), (_, other) = jpeg_bytes(shared_data, 2)
    jpeg = {"content-type": "image/jpeg"}
    bomb = io.BytesIO()
    Image.new("1", (10_000, 6_000)).save(bomb, "PNG")
    big = good + os.urandom(MAX_IMAGE_MB * 1024**2)

    def chunked():  # no Content-Length: only the bytes read can tell
        for i in range(0, len(big), 64 * 1024):
            yield big[i : i + 64 * 1024]

    return [
        ("empty body", {"content": b"", "headers": jpeg}, 400, "empty"),
        ("not an image", {"content": b"hello, world\n" * 10, "headers": jpeg}, 422, "not an image"),
        ("truncated JPEG", {"content": other[: len(other) // 2], "headers": jpeg}, 422, "truncated"),
        ("over the size limit", {"content": big, "headers": jpeg}, 413, "limit"),
        ("over the size limit, chunked", {"content": chunked(), "headers": jpeg}, 413, "limit"),
        (
            "decompression bomb",
            {"content": bomb.getvalue(), "headers": {"content-type": "image/png"}},
            413,
            "megapixels",
        ),
        ("wrong content type", {"content": good, "headers": {"content-type": "text/plain"}}, 415, "Content-Type"),
        ("curl's default content type", {"data": {"a": "b"}}, 415, "curl"),
        ("top_k too large", {"content": good, "headers": jpeg, "params": {"top_k": 7}}, 400, "top_k"),
        ("top_k negative", {"content": good, "headers": jpeg, "params": {"top_k": -1}}, 400, "top_k"),
        ("top_k not a number", {"content": good, "headers": jpeg, "params": {"top_k": "all"}}, 400, "top_k"),
        ("a bad file among good ones", {"files": [("f", ("a.jpg", good)), ("f", ("b.jpg", b"junk"))]}, 422, "b.jpg"),
        ("multipart without files", {"files": {"note": (None, "x")}}, 400, "without files"),
        ("too many files", {"files": [("f", (f"{i}.jpg", good)) for i in range(5)]}, 400, "multipart"),
    ]


@pytest.mark.slow
def test_each_bad_request_gets_its_4xx_and_the_server_keeps_serving(server, shared_data):
    (_, good), _ = jpeg_bytes(shared_data, 2)
    for name, kwargs, status, word in bad_requests(shared_data):
        r = server.post("/predict", **kwargs)
        assert r.status_code == status, (name, r.status_code, r.text)
        body = r.json()
        assert list(body) == ["error"] and word in body["error"] and "\n" not in body["error"], (name, body)
        after = server.post("/predict", content=good, headers={"content-type": "image/jpeg"})
        assert after.status_code == 200 and after.json()["predicted_category"], (name, after.text)
    assert server.get("/predict").status_code == 405
    assert server.get("/nowhere").status_code == 404


@pytest.mark.slow
def test_a_killed_replica_is_replaced_and_later_requests_answered(server, shared_data):
    """Last in the module: SIGKILL the replica's process while requests flow."""
    import ray
    from ray.util.state import list_actors

    from fashion_vit.serve import APP_NAME, DEPLOYMENT_NAME

    def replica_pids() -> list[int]:
        filters = [("class_name", "=", f"ServeReplica:{APP_NAME}:{DEPLOYMENT_NAME}"), ("state", "=", "ALIVE")]
        # The session's Ray by its address: the machine may run others.
        address = ray.get_runtime_context().gcs_address
        return [a.pid for a in list_actors(address=address, filters=filters, detail=True)]

    (_, good), _ = jpeg_bytes(shared_data, 2)
    (pid,) = replica_pids()
    statuses: list[tuple[float, int]] = []
    stop = threading.Event()

    def load():  # bounded: until told to stop or 120 s
        t0 = time.monotonic()
        while not stop.is_set() and time.monotonic() - t0 < 120:
            try:
                r = server.post("/predict", content=good, headers={"content-type": "image/jpeg"}, timeout=30)
                statuses.append((time.monotonic(), r.status_code))
            except httpx.HTTPError:
                statuses.append((time.monotonic(), 0))

    thread = threading.Thread(target=load)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while len(statuses) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert statuses and all(s == 200 for _, s in statuses), statuses
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        deadline = killed_at + 90
        while time.monotonic() < deadline:
            answered = [s for t, s in statuses if t > killed_at + 1]
            if len(answered) >= 20 and all(s == 200 for s in answered[-20:]):
                break
            time.sleep(0.2)
    finally:
        stop.set()
        thread.join(timeout=60)
    answered = [s for t, s in statuses if t > killed_at + 1]
    assert len(answered) >= 20 and all(s == 200 for s in answered[-20:]), statuses[-30:]
    (new_pid,) = replica_pids()
    assert new_pid != pid
