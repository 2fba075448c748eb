"""diffuse serve's API through FastAPI's TestClient: results equal `diffuse sample`'s, batching keeps
each image its seed's, every invalid field is a 422 naming it, limits, queue, cancel, progress
events, and the Host/Origin/token/body-size guard."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from diffuse.cli import main as cli_main  # noqa: E402
from diffuse.generate import cycle_labels, generate, load  # noqa: E402
from diffuse.serve import model_names  # noqa: E402
from diffuse.serve.app import Limits, Served, create_app  # noqa: E402
from diffuse.serve.guard import allowed_hosts  # noqa: E402
from diffuse.serve.jobs import Job, Settings, Worker, new_job_id  # noqa: E402

BASE = "http://127.0.0.1:8000"
HOSTS = allowed_hosts("127.0.0.1", 8000)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def loaded(served_runs):
    return {name: load(path, CPU) for name, path in served_runs.items()}


def make_client(loaded, *, limits: Limits | None = None, token: str | None = None, start: bool = True):
    limits = limits or Limits(max_images=8, max_steps=2000, queue=4)
    worker = Worker(CPU, loaded, max_queue=limits.queue, max_batch=limits.max_images)
    if start:
        worker.start()
    served = {name: Served(name, ld, worker) for name, ld in loaded.items()}
    app = create_app(served, limits, hosts=HOSTS, token=token)
    return TestClient(app, base_url=BASE), worker


@pytest.fixture(scope="module")
def client(loaded):
    c, worker = make_client(loaded)
    yield c
    worker.stop()


def wait_state(client, job_id, states, timeout=60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        st = client.get(f"/api/jobs/{job_id}").json()
        if st["state"] in states:
            return st
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} never reached {states}: {st}")


def test_models_lists_config_classes_samplers_and_limits(client):
    info = client.get("/api/models").json()
    by = {m["name"]: m for m in info["models"]}
    assert by["cond"]["class_cond"] and by["cond"]["classes"] == [str(k) for k in range(10)]
    assert by["uncond"]["classes"] is None and by["uncond"]["image_size"] == 16 and by["uncond"]["channels"] == 1
    assert by["cond"]["timesteps"] == 1000 and by["cond"]["max_steps"] == 1000     # min(--max-steps 2000, T)
    assert by["cond"]["config"]["model"]["base_channels"] == 8
    assert {s["name"] for s in info["samplers"]} == {"ddpm", "ddim", "euler", "heun", "dpmpp-2m", "dpmpp-2m-sde",
                                                    "consistency"}     # the last for distilled runs only
    assert info["limits"] == {"max_images": 8, "max_steps": 2000, "queue": 4, "max_body_bytes": 16384,
                              "max_guidance": 50.0, "auth": False}
    schema = client.get("/openapi.json").json()
    body = schema["components"]["schemas"]["GenerateRequest"]["properties"]
    assert body["n"]["maximum"] == 8 and body["steps"]["maximum"] == 2000


def test_images_equal_diffuse_sample_grid_and_single_pngs(client, served_runs, tmp_path):
    """The PNG grid is byte-identical to `diffuse sample --out grid.png`, and each JSON image to the
    PNG `diffuse sample --out DIR` writes, for a deterministic and a stochastic sampler."""
    run = served_runs["uncond"]
    assert cli_main(["sample", str(run), "--n", "5", "--steps", "3", "--seed", "7", "--sampler", "ddpm",
                     "--precision", "fp32", "--out", str(tmp_path / "grid.png"), "--no-progress"]) == 0
    r = client.post("/api/generate", json={"model": "uncond", "n": 5, "steps": 3, "seed": 7, "sampler": "ddpm"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content == (tmp_path / "grid.png").read_bytes()
    w = (3 * (16 + 2) + 2) * 4                                  # 3 columns of 16 px + padding, upscaled 4x
    assert Image.open(io.BytesIO(r.content)).size == (w, (2 * 18 + 2) * 4)

    cond = served_runs["cond"]
    assert cli_main(["sample", str(cond), "--n", "4", "--steps", "3", "--seed", "11", "--class", "3,5",
                     "--precision", "fp32", "--out", str(tmp_path / "dir"), "--no-progress"]) == 0
    r = client.post("/api/generate", json={"model": "cond", "n": 4, "steps": 3, "seed": 11, "classes": [3, "5"]},
                    headers={"Accept": "application/json"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [im["class"] for im in body["images"]] == [3, 5, 3, 5]
    assert [(im["seed"], im["index"]) for im in body["images"]] == [(11, i) for i in range(4)]
    assert body["guidance"] == 1.0 and body["sampler"] == "dpmpp-2m-sde" and body["nfe"] == 3
    files = sorted((tmp_path / "dir").glob("*.png"))
    assert [f.name for f in files] == [f"{i:06d}_class{k}.png" for i, k in enumerate([3, 5, 3, 5])]
    for im, f in zip(body["images"], files):
        assert base64.b64decode(im["png"]) == f.read_bytes()


def test_eta_reaches_the_sde_sampler_and_the_record(client):
    from diffuse.samplers import DPMPP_SDE_ETA
    req = {"model": "uncond", "n": 2, "steps": 3, "seed": 5, "format": "json"}
    default = client.post("/api/generate", json=req).json()
    assert default["sampler"] == "dpmpp-2m-sde" and default["eta"] == DPMPP_SDE_ETA
    given = client.post("/api/generate", json={**req, "eta": 1}).json()
    assert given["eta"] == 1 and [im["png"] for im in given["images"]] != [im["png"] for im in default["images"]]
    again = client.post("/api/generate", json={**req, "eta": DPMPP_SDE_ETA}).json()
    assert [im["png"] for im in again["images"]] == [im["png"] for im in default["images"]]


def test_same_request_same_bytes_and_first_index(client):
    req = {"model": "uncond", "n": 3, "steps": 2, "seed": 123, "sampler": "euler"}
    a = client.post("/api/generate", json=req).content
    b = client.post("/api/generate", json=req).content
    c = client.post("/api/generate", json={**req, "seed": 124}).content
    assert a == b and a != c
    full = client.post("/api/generate", json={**req, "format": "json"}).json()["images"]
    # image 2 of seed 123 alone: first_index 2, n 1
    one = client.post("/api/generate", json={**req, "n": 1, "first_index": 2, "format": "json"}).json()["images"]
    assert one[0]["index"] == 2 and one[0]["png"] == full[2]["png"]


def test_waiting_jobs_with_the_same_settings_run_as_one_batch_and_keep_their_images(loaded):
    """Three requests queued together run as one sampling batch of 6 images; each job's images
    equal what generate (= diffuse sample) gives for its seed alone."""
    worker = Worker(CPU, loaded, max_queue=8, max_batch=8)
    s = Settings("cond", "dpmpp-2m-sde", 3, "karras", None, 2.0, True, True)
    specs = [(5, 2, [1]), (6, 3, [2, 7]), (9, 1, [4])]       # seed, n, classes
    jobs = [Job(new_job_id(), s, n, seed, 0, cycle_labels(cls, n)) for seed, n, cls in specs]
    other = Job(new_job_id(), Settings("cond", "ddim", 2, "trailing", None, 2.0, True, True), 1, 0, 0,
                cycle_labels([0], 1))
    for job in (jobs[0], other, jobs[1], jobs[2]):
        worker.submit(job)
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while not all(j.state == "done" for j in (*jobs, other)) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        worker.stop()
    assert [j.state for j in jobs] == ["done"] * 3
    assert [j.batch_images for j in jobs] == [6, 6, 6] and other.batch_images == 1
    assert [e for e in jobs[1].events if e["event"] == "started"][0]["batch_jobs"] == 3
    for (seed, n, cls), job in zip(specs, jobs):
        alone, _ = generate(loaded["cond"], n=n, seed=seed, sampler="dpmpp-2m-sde", steps=3,
                            labels=cycle_labels(cls, n), guidance=2.0)
        assert torch.equal(job.images, alone), (seed, n)


INVALID = [
    ({"model": "nope"}, ["model"]),
    ({"sampler": "plms"}, ["sampler"]),
    ({"steps": 0}, ["steps"]),
    ({"steps": 2001}, ["steps"]),            # over --max-steps
    ({"steps": 1500}, ["steps"]),            # under --max-steps, over the model's T
    ({"steps": "many"}, ["steps"]),
    ({"steps": 2.5}, ["steps"]),
    ({"n": 0}, ["n"]),
    ({"n": 9}, ["n"]),
    ({"seed": -1}, ["seed"]),
    ({"seed": 2**63}, ["seed"]),
    ({"first_index": -1}, ["first_index"]),
    ({"spacing": "log"}, ["spacing"]),
    ({"sampler": "ddpm", "spacing": "karras"}, ["spacing"]),
    ({"sampler": "dpmpp-2m", "eta": 0.5}, ["eta"]),      # a sampler that takes no eta
    ({"eta": 10.5}, ["eta"]),                # the default dpmpp-2m-sde's range is 0..10
    ({"sampler": "ddim", "eta": 1.5}, ["eta"]),
    ({"model": "cond", "class": "eleven"}, ["class"]),
    ({"model": "cond", "class": 10}, ["class"]),
    ({"model": "cond", "class": "\u00b2"}, ["class"]),               # a digit to str.isdigit, not to int()
    ({"model": "cond", "class": -1}, ["class"]),
    ({"model": "cond", "classes": []}, ["classes"]),
    ({"model": "cond", "classes": [1, "x"]}, ["classes", 1]),
    ({"model": "cond", "class": 1, "classes": [2]}, ["classes"]),
    ({"model": "uncond", "class": 1}, ["class"]),
    ({"model": "uncond", "guidance": 2}, ["guidance"]),
    ({"model": "cond", "guidance": 2}, ["guidance"]),                 # guidance without a class
    ({"model": "cond", "class": 1, "guidance": -1}, ["guidance"]),
    ({"model": "cond", "class": 1, "guidance": 51}, ["guidance"]),
    ({"format": "gif"}, ["format"]),
    ({"colour": "blue"}, ["colour"]),
    ({"clip": "sometimes"}, ["clip"]),
]


@pytest.mark.parametrize("body,loc", INVALID, ids=[json.dumps(b) for b, _ in INVALID])
def test_every_invalid_field_is_a_422_naming_it(client, body, loc):
    for path in ("/api/generate", "/api/jobs"):
        r = client.post(path, json={"steps": 2, "n": 1, **body})
        assert r.status_code == 422, r.text
        assert ["body", *loc] in [d["loc"] for d in r.json()["detail"]], r.json()


def test_malformed_bodies_are_422_not_500(client):
    for raw in (b"{", b"[1, 2]", b'"text"', b'{"guidance": NaN, "class": 1, "model": "cond"}', b"\xff\xfe"):
        r = client.post("/api/generate", content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 422, (raw, r.status_code, r.text)
    assert client.get("/api/jobs/nonexistent").status_code == 404
    assert client.delete("/api/jobs/nonexistent").status_code == 404
    assert client.get("/api/jobs/nonexistent/events").status_code == 404


def test_body_size_cap(client):
    r = client.post("/api/generate", content=b'{"n": 1, "pad": "' + b"x" * 20000 + b'"}',
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "16384" in r.json()["detail"]


def test_full_queue_is_429_with_retry_after_and_cancel_of_a_queued_job(loaded):
    c, worker = make_client(loaded, limits=Limits(max_images=8, max_steps=100, queue=2), start=False)
    try:
        req = {"model": "uncond", "n": 1, "steps": 2}
        ids = [c.post("/api/jobs", json={**req, "seed": k}) for k in range(2)]
        assert [r.status_code for r in ids] == [202, 202]
        assert [r.json()["position"] for r in ids] == [1, 2]
        full = c.post("/api/jobs", json=req)
        assert full.status_code == 429 and int(full.headers["Retry-After"]) >= 1
        assert "queue is full" in full.json()["detail"]
        first = ids[0].json()["id"]
        assert c.delete(f"/api/jobs/{first}").json()["state"] == "cancelled"
        assert c.get(f"/api/jobs/{ids[1].json()['id']}").json()["position"] == 1
        assert c.post("/api/jobs", json=req).status_code == 202            # the freed place
        with c.stream("GET", f"/api/jobs/{first}/events") as s:
            events = [json.loads(line[6:])["event"] for line in s.iter_lines() if line.startswith("data: ")]
        assert events == ["queued", "cancelled"]
        r = c.get(f"/api/jobs/{first}/result")
        assert r.status_code == 410 and r.json()["state"] == "cancelled"
    finally:
        worker.stop()


def test_progress_events_in_order_with_previews(client):
    job = client.post("/api/jobs", json={"model": "cond", "n": 2, "steps": 4, "class": "all"})
    assert job.status_code == 202
    jid = job.json()["id"]
    with client.stream("GET", f"/api/jobs/{jid}/events") as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "queued" and kinds[-1] == "done" and "started" in kinds
    progress = [e for e in events if e["event"] == "progress"]
    assert [(e["step"], e["total"]) for e in progress] == [(i, 4) for i in range(1, 5)]
    assert kinds.index("started") < kinds.index("progress")
    preview = progress[0]["preview"]
    assert preview.startswith("data:image/png;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(preview.split(",", 1)[1]))).size == (2 * 17 + 1, 17 + 1)
    st = client.get(f"/api/jobs/{jid}").json()
    assert st["state"] == "done" and st["step"] == st["total"] == 4 and st["result"] == f"/api/jobs/{jid}/result"
    grid = client.get(f"/api/jobs/{jid}/result")                 # default PNG; JSON by Accept
    assert grid.headers["content-type"] == "image/png"
    assert len(client.get(f"/api/jobs/{jid}/result", headers={"Accept": "application/json"}).json()["images"]) == 2


def test_healthz_answers_during_a_long_job_which_cancel_stops(client):
    """A 1000-step job runs on the worker thread: /healthz answers while it runs (the event loop is
    not blocked), cancel stops it within a step, and the worker goes on to the next job."""
    jid = client.post("/api/jobs", json={"model": "uncond", "n": 1, "steps": 1000, "sampler": "ddim"}).json()["id"]
    st = wait_state(client, jid, ("running",))
    while client.get(f"/api/jobs/{jid}").json()["step"] < 2:
        time.sleep(0.01)
    for _ in range(3):
        h = client.get("/healthz")
        assert h.status_code == 200 and h.json()["running"] == {"cpu": True}
    st = client.get(f"/api/jobs/{jid}").json()
    assert st["state"] == "running" and st["step"] < 1000       # answered while the job was still running
    assert client.delete(f"/api/jobs/{jid}").json()["state"] == "cancelled"
    step_at_cancel = client.get(f"/api/jobs/{jid}").json()["step"]
    r = client.post("/api/generate", json={"model": "uncond", "n": 1, "steps": 2})   # the worker is free again
    assert r.status_code == 200
    st = client.get(f"/api/jobs/{jid}").json()
    assert st["state"] == "cancelled" and st["step"] <= step_at_cancel + 1
    assert client.get(f"/api/jobs/{jid}/result").status_code == 410


def test_foreign_origin_host_and_cross_site_are_refused(client):
    body = {"model": "uncond", "n": 1, "steps": 1}
    r = client.post("/api/generate", json=body, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403 and "evil.example" in r.json()["detail"]
    assert client.post("/api/jobs", json=body, headers={"Origin": "null"}).status_code == 403
    assert client.get("/api/models", headers={"Origin": "http://127.0.0.1:9999"}).status_code == 403
    assert client.get("/api/models", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
    assert client.get("/api/models", headers={"Host": "evil.example:8000"}).status_code == 403    # DNS rebinding
    assert client.get("/", headers={"Host": "evil.example:8000"}).status_code == 403
    ok = client.post("/api/generate", json=body, headers={"Origin": BASE, "Sec-Fetch-Site": "same-origin"})
    assert ok.status_code == 200
    assert client.get("/api/models", headers={"Host": "localhost:8000"}).status_code == 200
    assert allowed_hosts("0.0.0.0", 8000) is None
    assert allowed_hosts("127.0.0.1", 80) >= {"127.0.0.1", "localhost", "[::1]:80"}
    assert allowed_hosts("192.168.1.5", 8000) == {"192.168.1.5:8000"}


def test_token_is_required_on_every_api_call(loaded):
    c, worker = make_client(loaded, token="s3cret")
    try:
        assert c.get("/api/models").status_code == 401
        assert c.get("/api/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.post("/api/generate", json={"n": 1, "steps": 1}).status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        assert c.get("/api/models", headers=auth).json()["limits"]["auth"] is True
        assert c.post("/api/generate", json={"model": "uncond", "n": 1, "steps": 1}, headers=auth).status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/").status_code == 200
    finally:
        worker.stop()


@pytest.mark.parametrize("token", ("s3cret", "s\u00e9same-\u5bc6\u94a5"), ids=("ascii", "non-ascii"))
def test_the_token_matches_as_the_utf8_bytes_the_client_sends(loaded, token):
    """A client sends the header's bytes; a non-ASCII token once never matched (the header was read
    as latin-1, then compared as UTF-8): every request got 401."""
    c, worker = make_client(loaded, token=token)
    try:
        good = {"Authorization": b"Bearer " + token.encode("utf-8")}
        assert c.get("/api/models", headers=good).status_code == 200
        sent = b"Bearer " + token.encode("utf-8")
        for bad in (sent[:-1], sent + b"x", token.encode("utf-8"), b"Bearer wrong",
                    *([sent.decode("latin-1").encode("utf-8")] if not token.isascii() else [])):    # mojibake
            assert c.get("/api/models", headers={"Authorization": bad}).status_code == 401, bad
    finally:
        worker.stop()


@pytest.fixture(scope="module")
def zero_snr_run(tmp_path_factory):
    """A tiny v-prediction run with zero terminal SNR on the linear schedule, T = 1000 (2 steps)."""
    from diffuse.config import resolve
    from diffuse.train import train

    from .conftest import TINY_MODEL
    out = tmp_path_factory.mktemp("zero-snr") / "run"
    cfg = resolve("digits", None, None, {"model": dict(TINY_MODEL), "diffusion": {"prediction": "v", "zero_terminal_snr": True,
                                                                                   "schedule": "linear", "timesteps": 1000},
                                         "train": {"steps": 2, "batch_size": 8, "sample_n": 2, "sample_steps": 1,
                                                   "out": str(out), "warmup_steps": 0}})
    return load(train(cfg, progress=False), CPU)


@pytest.mark.parametrize("sampler", ("dpmpp-2m", "dpmpp-2m-sde"))
def test_zero_snr_model_samples_500_steps_with_multistep_solvers(zero_snr_run, sampler):
    """Once a 500 (a server error: t = 996..999 shared one sigma, a zero-length step divided by zero)."""
    c, worker = make_client({"zero": zero_snr_run})
    try:
        for spacing in ("trailing", "uniform"):
            r = c.post("/api/generate", json={"model": "zero", "n": 1, "steps": 500, "sampler": sampler,
                                              "spacing": spacing, "format": "json"})
            assert r.status_code == 200, r.text
            assert r.json()["nfe"] == 500
    finally:
        worker.stop()


def test_page_and_static_files_load_nothing_from_elsewhere(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for path in ("/static/app.js", "/static/style.css"):
        assert client.get(path).status_code == 200
    for text in (page.text, client.get("/static/app.js").text, client.get("/static/style.css").text):
        assert "http://" not in text and "https://" not in text and "//cdn" not in text


def test_model_names():
    assert model_names(["runs/digits", "x=runs/a/", "runs/b/checkpoints/step_0000010", "m.safetensors",
                        "runs/digits"]) == [
        ("digits", "runs/digits"), ("x", "runs/a/"), ("b-step_0000010", "runs/b/checkpoints/step_0000010"),
        ("m", "m.safetensors"), ("digits-2", "runs/digits")]


def test_serve_without_fastapi_is_a_one_line_error(tmp_path, served_runs):
    stub = tmp_path / "stub" / "fastapi"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('No module named fastapi')\n")
    env = {**__import__("os").environ}
    env["PYTHONPATH"] = f"{stub.parent}:{env.get('PYTHONPATH', '')}"
    r = subprocess.run([sys.executable, "-m", "diffuse", "serve", str(served_runs["uncond"])],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip() == "error: diffuse serve needs FastAPI and uvicorn: pip install 'diffuse[serve]'"


def test_host_0000_warns_and_bad_port_is_one_line(served_runs, monkeypatch, capsys):
    import uvicorn

    from diffuse.serve import serve

    started = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: started.append(sockets[0].getsockname()))
    assert serve([str(served_runs["uncond"])], host="0.0.0.0", port=0) == 0
    err = capsys.readouterr()
    assert "warning: --host 0.0.0.0 serves every network" in err.err and started and started[0][1] > 0
    assert f"http://127.0.0.1:{started[0][1]}/" in err.out
    assert cli_main(["serve", str(served_runs["uncond"]), "--port", "70000"]) == 1
    assert capsys.readouterr().err.strip() == "error: --port must be between 0 and 65535, got 70000"


def test_a_failing_batch_fails_its_jobs_in_one_line_and_the_worker_goes_on(loaded):
    worker = Worker(CPU, loaded, max_queue=4, max_batch=8)
    # ddpm on karras sigmas is refused by samplers.sampler_sigmas (the API checks it first; here it is not)
    bad = Job(new_job_id(), Settings("uncond", "ddpm", 2, "karras", None, 0.0, False, True), 1, 0)
    good = Job(new_job_id(), Settings("uncond", "ddim", 2, "trailing", None, 0.0, False, True), 1, 0)
    worker.submit(bad)
    worker.submit(good)
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while good.state != "done" and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        worker.stop()
    assert bad.state == "failed" and bad.error.startswith("ValueError: --spacing karras does not apply")
    assert "\n" not in bad.error and bad.events[-1]["event"] == "failed"
    assert good.state == "done" and good.images.shape == (1, 1, 16, 16)


def test_progress_counts_every_network_evaluation_for_every_sampler(loaded):
    """'step i of N': N is the sampler's NFE for the step budget (heun spends 3 of 4), and the
    progress events count exactly the denoiser calls the run makes."""
    from diffuse.samplers import SAMPLERS

    worker = Worker(CPU, loaded, max_queue=8, max_batch=8, preview=False)
    jobs = {s: Job(new_job_id(), Settings("uncond", s, 4, SAMPLERS[s][2], None, 0.0, False, True), 1, 0)
            for s in SAMPLERS}
    for job in jobs.values():
        worker.submit(job)
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while any(j.state != "done" for j in jobs.values()) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        worker.stop()
    for s, job in jobs.items():
        steps = [e["step"] for e in job.events if e["event"] == "progress"]
        assert job.total == (3 if s == "heun" else 4) == job.record["nfe"], s
        assert steps == list(range(1, job.total + 1)), (s, steps)


def test_no_page_that_needs_a_cdn(client):
    """FastAPI's /docs and /redoc load Swagger UI / ReDoc from a CDN: off, so nothing served needs
    the internet; the schema itself is served."""
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404
    assert client.get("/openapi.json").json()["info"]["title"] == "diffuse serve"


def test_a_run_with_an_output_size_serves_its_images_at_that_size(loaded):
    import copy

    import numpy as np
    up = copy.deepcopy(loaded["uncond"])
    up.config.train.output_size = 2 * up.config.model.image_size              # 16 px model, 32 px images
    c, worker = make_client({"up": up})
    try:
        assert c.get("/api/models").json()["models"][0]["image_size"] == 32
        r = c.post("/api/generate", json={"model": "up", "n": 2, "steps": 3, "seed": 7, "sampler": "ddpm"},
                   headers={"Accept": "application/json"})
        assert r.status_code == 200, r.text
        served = [np.asarray(Image.open(io.BytesIO(base64.b64decode(im["png"])))) for im in r.json()["images"]]
        want, _ = generate(up, n=2, seed=7, sampler="ddpm", steps=3)                  # uint8 [2, 1, 32, 32]
        assert [s.shape[:2] for s in served] == [(32, 32)] * 2
        assert all(np.array_equal(s.reshape(32, 32), w[0].numpy()) for s, w in zip(served, want))
    finally:
        worker.stop()
