"""`deltarun serve --ray` and `deltarun batch --ray` on a real multi-node Ray cluster on this machine.

One module-wide `ray.cluster_utils.Cluster` (a head and one worker node: real GCS and raylet processes), every
process on loopback (scale/loopback.py), the dashboard off, usage stats off, 100 MB object stores; the CPU
kernels are built before Ray starts, so replicas never race to build them. `deltarun serve --ray --address`
runs as a subprocess with 2 replicas, one per node, 4 ongoing requests each, health-checked every second.
"""
from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import ollama
import openai
import pytest
from server_helpers import live_server, shared_llm
from test_ray_batch_local import answer_text, read_output, request, run, write_input

pytest.importorskip("ray", reason="`pip install 'deltarun[ray]'` (CI installs it: these tests do not skip there)")

SYSTEM = " ".join(["You are a careful assistant for a shop that sells garden tools, seeds and soil. Answer briefly "
                   "and politely, and never invent prices."] * 8)  # > 128 tokens: the prefix cache keeps 64-token steps


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    from deltarun.ops import kernels
    from deltarun.scale.loopback import local_env

    kernels.available()  # built (or found) now, before any replica could start building them
    with pytest.MonkeyPatch.context() as mp:
        for k, v in local_env("127.0.0.1").items():
            mp.setenv(k, v)
        mp.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)  # what the variable means, if Ray was imported early
        node = dict(num_cpus=2, node_ip_address="127.0.0.1", object_store_memory=100 << 20)
        c = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
        c.add_node(**node)
        ray.init(address=c.address, log_to_driver=False)
        try:
            yield c
        finally:
            ray.shutdown()
            c.shutdown()


class Served:
    def __init__(self, proc: subprocess.Popen, url: str):
        self.proc, self.url = proc, url
        self.openai = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        self.ollama = ollama.Client(host=url, timeout=60)

    def replicas(self) -> dict[str, dict]:
        r = httpx.get(self.url + "/ray/replicas", timeout=30)
        r.raise_for_status()
        return {x["replica"]: x for x in r.json()["replicas"]}

    def chat(self, content: str, system: str | None = None, max_tokens: int = 4, **kw):
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
        return self.openai.chat.completions.create(model="tiny", messages=msgs, max_tokens=max_tokens,
                                                   temperature=0, **kw)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(cluster, chat_ckpt, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    cmd = [sys.executable, "-m", "deltarun", "serve", str(chat_ckpt), "--served-model-name", "tiny", "--ray",
           "--address", cluster.address, "--replicas", "2", "--max-replicas-per-node", "1", "--replica-threads", "1",
           "--max-ongoing-requests", "4", "--health-check-period", "1", "--port", str(port), "--dtype", "float32",
           "--device", "cpu", "--max-num-seqs", "4", "--drain-timeout", "5"]
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    srv = Served(proc, f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + 180
    while "deltarun: serving" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    try:
        yield srv
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def routed(before: dict[str, dict], after: dict[str, dict]) -> dict[str, int]:
    return {rid: r["routed"] - before.get(rid, {}).get("routed", 0) for rid, r in after.items()}


def test_clients_concurrently_equal_local_serve(served, chat_ckpt):
    """The official clients, concurrently, over both replicas: all succeed, greedy text == plain `deltarun serve`."""
    local = live_server(chat_ckpt)
    here = openai.OpenAI(base_url=local.url + "/v1", api_key="x", max_retries=0)
    here_ollama = ollama.Client(host=local.url)
    questions = [f"Question {i}: which seeds grow fastest in spring?" for i in range(6)]

    def via_openai(c, q):
        r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": q}], max_tokens=6,
                                      temperature=0)
        return r.choices[0].message.content

    def via_stream(c, q):
        s = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": q}], max_tokens=6,
                                      temperature=0, stream=True)
        return "".join(ch.choices[0].delta.content or "" for ch in s if ch.choices)

    def via_ollama(c, q):
        return c.chat(model="tiny", messages=[{"role": "user", "content": q}],
                      options={"num_predict": 6, "temperature": 0}).message.content

    calls = [(f, q) for q in questions for f in (via_openai, via_stream, via_ollama)]
    with cf.ThreadPoolExecutor(12) as ex:
        remote = list(ex.map(lambda fq: fq[0]({via_ollama: served.ollama}.get(fq[0], served.openai), fq[1]), calls))
    expected = [f({via_ollama: here_ollama}.get(f, here), q) for f, q in calls]
    assert remote == expected and all(remote)
    assert len(served.replicas()) == 2  # both answered some


def test_prefix_sticks_and_distinct_prefixes_spread(served):
    before = served.replicas()
    for i in range(6):  # one system prompt: every question goes where it is cached
        served.chat(f"question {i}", system=SYSTEM)
    mid = served.replicas()
    got = routed(before, mid)
    assert sorted(got.values()) == [0, 6], got
    sticky = max(got, key=lambda r: got[r])
    assert mid[sticky]["prefix_cache_hits"] > (before.get(sticky, {}).get("prefix_cache_hits") or 0)
    for i in range(16):  # 16 different openings: rendezvous hashing spreads them (all on one: p = 2^-15)
        served.chat(f"{i * 7919} is the number I start with; tell me about tomatoes and their soil")
    spread = routed(mid, served.replicas())
    assert all(n > 0 for n in spread.values()) and sum(spread.values()) == 16, spread


def test_saturated_replica_spills(served):
    """Same prefix, 12 at once: the preferred replica takes its 4 (max_ongoing_requests), the rest spill."""
    before = served.replicas()

    def one(i):
        return served.chat(f"spill {i}", system=SYSTEM + " Spill test.", max_tokens=96).choices[0].finish_reason

    with cf.ThreadPoolExecutor(12) as ex:
        assert list(ex.map(one, range(12))) == ["length"] * 12
    got = routed(before, served.replicas())
    assert sum(got.values()) == 12 and min(got.values()) > 0 and max(got.values()) >= 4, got


def test_same_rules_as_serve_and_no_store_changes(served):
    """The ingress is `deltarun serve`'s app: its Host rule, other models 404, /metrics; under --ray pull, copy
    and delete answer 400 (models are placed on the nodes beforehand)."""
    assert httpx.get(served.url + "/v1/models", headers={"Host": "attacker.example"}).status_code == 403
    for method, path, body in [("POST", "/api/pull", {"model": "qwen3.5:0.8b"}), ("DELETE", "/api/delete",
                               {"model": "tiny"}), ("POST", "/api/copy", {"source": "tiny", "destination": "t2"})]:
        r = httpx.request(method, served.url + path, json=body)
        assert r.status_code == 400 and "--ray" in r.json()["error"], (path, r.text)
    with pytest.raises(openai.NotFoundError):
        served.openai.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}])
    metrics = httpx.get(served.url + "/metrics").text
    assert 'deltarun_prefix_cache_hits_total{model="tiny"}' in metrics


def test_every_listener_is_loopback(served):
    """No process of the cluster, the server or this test listens beyond loopback (Serve's replica gRPC
    servers included: scale/loopback.py)."""
    import ipaddress

    import psutil

    me = psutil.Process()
    wide = []
    for p in [me, *me.children(recursive=True)]:
        try:
            conns = p.net_connections("inet")
        except psutil.Error:
            continue
        for c in conns:
            if c.status != psutil.CONN_LISTEN:
                continue
            ip = ipaddress.ip_address(c.laddr.ip.split("%")[0])
            mapped = getattr(ip, "ipv4_mapped", None)
            if not (ip.is_loopback or (mapped is not None and mapped.is_loopback)):
                wide.append((p.pid, " ".join(p.cmdline()[:2]), c.laddr))
    assert not wide


def test_killed_replica_fails_only_its_requests(served):
    """kill -9 one replica under load: its streams end within seconds with an error event (the openai client
    raises it), none hang; the other replica finishes its own and answers new requests; Serve replaces it."""
    from ray import serve

    def stream(i: int):
        try:
            s = served.openai.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": f"{i * 104729} starts a long story about soil"}],
                max_tokens=300, temperature=0, stream=True)
            for _ in s:
                pass
            return "ok", time.monotonic(), ""
        except openai.APIError as e:
            return "error", time.monotonic(), str(e)

    with cf.ThreadPoolExecutor(6) as ex:
        futures = [ex.submit(stream, i) for i in range(6)]
        deadline = time.monotonic() + 60
        while True:
            busy = [r for r in served.replicas().values() if r["running"] > 0]
            if busy or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert busy, "no request got running"
        victim = max(busy, key=lambda r: r["running"])
        os.kill(victim["pid"], signal.SIGKILL)
        killed = time.monotonic()
        outcomes = [f.result(timeout=90) for f in futures]
    errors = [o for o in outcomes if o[0] == "error"]
    assert errors, outcomes
    assert all(when - killed < 15 for _, when, _ in errors), outcomes
    assert all("replica" in why for *_, why in errors), errors
    for i in range(4):  # new requests: the live replica answers
        assert served.chat(f"after the kill {i}").choices[0].finish_reason == "length"
    deadline = time.monotonic() + 120
    while True:
        states = serve.status().applications["deltarun"].deployments["deltarun-engine"].replica_states
        if states.get("RUNNING") == 2:
            break
        assert time.monotonic() < deadline, f"Serve did not replace the replica: {states}"
        time.sleep(0.5)


def test_batch_on_ray_equals_local_and_resumes(cluster, chat_ckpt, tmp_path):
    """`deltarun batch --ray` over 200 lines (an actor pool of 2 engines) == local mode per custom_id, greedy;
    killed midway and started again, it finishes without redoing or losing a line."""
    src = write_input(tmp_path / "in.jsonl", [request(f"b{i}", i) for i in range(200)] + ["{broken"])
    local = tmp_path / "local.jsonl"
    run(shared_llm(chat_ckpt), src, local)
    out = tmp_path / "ray.jsonl"
    cmd = [sys.executable, "-m", "deltarun", "batch", str(chat_ckpt), str(src), str(out), "--served-model-name",
           "tiny", "--ray", "--address", cluster.address, "--actors", "2", "--batch-size", "8", "--dtype",
           "float32", "--device", "cpu", "--max-num-seqs", "4"]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while first.poll() is None and (not out.exists() or out.read_text().count("\n") < 24):
        assert time.monotonic() < deadline, "the first run wrote nothing"
        time.sleep(0.02)
    first.kill()
    first.wait(30)
    done_first = len(read_output(out)) if out.read_text().endswith("\n") else out.read_text().count("\n")
    assert 0 < done_first < 201, "the run was not interrupted midway"
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"{done_first} already done" in second.stderr, second.stderr[-2000:]
    got, want = read_output(out), read_output(local)  # read_output fails on a custom_id written twice
    assert set(got) == set(want) and len(got) == 201
    for cid, line in want.items():
        if line["error"] is not None:
            assert got[cid]["error"]["code"] == line["error"]["code"]
        else:
            assert answer_text(got[cid]) == answer_text(line), cid
