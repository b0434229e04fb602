"""Serve that scales, shown (issue 20): the Decoder goes 1 -> 2 replicas under load and back.

A separate app (``galaxy-autoscale`` at ``/autoscale``) on the session's Serve instance, with
the Decoder's ``autoscaling_config`` set for the test (1..2 replicas, 1 ongoing request per
replica, upscale after 1 s, downscale after 5 s, a 2 s look-back and metrics every 0.5 s).
Client threads send ``GET /sample`` over real HTTP until ``serve.status()`` shows two RUNNING
Decoder replicas, keep going a little longer, then stop; the test waits for one replica
again. The timeline (t, replicas, requests answered) goes to
``test-artifacts/serve_autoscale.json`` and docs/serve.md ("Autoscaling, shown") shows one.

Run: ``python -m pytest -q -s tests/test_serve_autoscale.py`` (-s prints the timeline).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from typing import Any

import pytest
import requests

from conftest import REPO

pytestmark = [
    # Ray Serve's own models use a pydantic idiom deprecated in pydantic 2 (not ours to fix).
    pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`"),
    # metrics_interval_s is deprecated for environment variables that a replica reads when it
    # starts (shared by the whole session), but Ray 2.60 still pushes metrics at this interval.
    pytest.mark.filterwarnings("ignore:The `metrics_interval_s` field:DeprecationWarning"),
]

ARTIFACT = REPO / "test-artifacts" / "serve_autoscale.json"
APP, PREFIX = "galaxy-autoscale", "/autoscale"
# One ongoing request per replica as the target, so the clients below want two replicas for
# as long as the load runs.
AUTOSCALING = {"min_replicas": 1, "max_replicas": 2, "initial_replicas": 1, "target_ongoing_requests": 1,
               "upscale_delay_s": 1.0, "downscale_delay_s": 5.0, "look_back_period_s": 2.0,
               "metrics_interval_s": 0.5}
QUIET = {"enable_access_log": False}
OPTIONS = {"GalaxyAPI": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1}, "logging_config": QUIET},
           "Decoder": {"autoscaling_config": AUTOSCALING, "max_ongoing_requests": 32,
                       "ray_actor_options": {"num_cpus": 0.25}, "logging_config": QUIET}}
# Each request waits in the decoder's batch (up to 50 ms), so 4 clients keep ~2-4 ongoing there.
# More clients only starve the new replica's worker process of CPU while it starts (12 clients:
# 27 s from process start to the replica's constructor on 2 cores; the constructor takes 0.2 s).
CLIENTS = 4
# Generous: a new replica took 31-35 s to start with 12 clients while other jobs held the load
# average at 10-30.
UP_WITHIN_S, DOWN_WITHIN_S = 90.0, 60.0
LOAD_AFTER_UP_S = 2.0   # so the second replica answers some requests before the load stops
POLL_S = 0.25


class Load:
    """``CLIENTS`` threads sending ``GET /sample?seed=i`` until :meth:`stop`; counts outcomes."""

    def __init__(self, url: str) -> None:
        self.url, self.outcomes, self.lock = url, Counter(), threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(k,), daemon=True) for k in range(CLIENTS)]

    def _client(self, k: int) -> None:
        session, i = requests.Session(), k
        while not self.stopping.is_set():
            try:
                r = session.get(f"{self.url}/sample", params={"seed": i}, timeout=(10, 60))
                outcome = "ok" if r.status_code == 200 and r.content[:4] == b"\x89PNG" else f"{r.status_code}"
            except requests.RequestException as e:
                outcome = f"exception {type(e).__name__}"
            with self.lock:
                self.outcomes[outcome] += 1
            i += CLIENTS

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(90)

    @property
    def answered(self) -> int:
        with self.lock:
            return sum(self.outcomes.values())


def decoder_replicas() -> dict[str, int]:
    """Replica state -> count of the app's Decoder (``serve.status()``), e.g. {"RUNNING": 2}."""
    from ray import serve

    app = serve.status().applications.get(APP)
    if app is None or "Decoder" not in app.deployments:
        return {}
    return {str(k).split(".")[-1]: v for k, v in app.deployments["Decoder"].replica_states.items()}


class Timeline:
    """(t, running replicas, other replica states, requests answered) samples from t0."""

    def __init__(self, load: Load) -> None:
        self.load, self.t0, self.samples = load, time.monotonic(), []
        self.events: dict[str, float] = {}

    def sample(self) -> int:
        states = decoder_replicas()
        running = states.get("RUNNING", 0)
        self.samples.append({"t": round(time.monotonic() - self.t0, 2), "replicas": running,
                             "states": {k: v for k, v in states.items() if k != "RUNNING"},
                             "answered": self.load.answered})
        return running

    def wait_for(self, replicas: int, within_s: float, event: str) -> bool:
        """Sample every POLL_S until ``replicas`` are RUNNING (and nothing else), at most ``within_s``."""
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            if self.sample() == replicas and not self.samples[-1]["states"]:
                self.events[event] = self.samples[-1]["t"]
                return True
            time.sleep(POLL_S)
        return False

    def mark(self, event: str) -> None:
        self.events[event] = round(time.monotonic() - self.t0, 2)

    def table(self) -> str:
        """Only the samples where something changed, one line each."""
        lines, last = [], None
        for s in self.samples:
            key = (s["replicas"], tuple(sorted(s["states"].items())))
            if key != last:
                lines.append(f"  t={s['t']:6.2f} s  replicas={s['replicas']} {s['states'] or ''} "
                             f"answered={s['answered']}")
                last = key
        return "\n".join(lines)


def record(timeline: Timeline, load: Load) -> dict[str, Any]:
    data = {"measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "autoscaling_config": AUTOSCALING,
            "clients": CLIENTS, "events_s": timeline.events, "outcomes": dict(load.outcomes),
            "load_average": [round(x, 2) for x in os.getloadavg()], "cpu_count": os.cpu_count(),
            "samples": timeline.samples}
    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    ARTIFACT.write_text(json.dumps(data, indent=1) + "\n")
    return data


def test_decoder_scales_up_under_load_and_back_down(server):
    from ray import serve

    from ray_galaxy.serve.app import build_app

    serve.run(build_app(server.args, OPTIONS, token=None), name=APP, route_prefix=PREFIX)
    load = Load(server.base + PREFIX)
    timeline = Timeline(load)
    try:
        assert timeline.wait_for(1, 30, "ready"), f"not one Decoder replica at the start:\n{timeline.table()}"
        timeline.mark("load_start")
        load.start()
        up = timeline.wait_for(2, UP_WITHIN_S, "two_replicas")
        if up:
            until = time.monotonic() + LOAD_AFTER_UP_S
            while time.monotonic() < until:
                timeline.sample()
                time.sleep(POLL_S)
        load.stop()
        timeline.mark("load_stop")
        down = up and timeline.wait_for(1, DOWN_WITHIN_S, "one_replica")
    finally:
        load.stop()
        data = record(timeline, load)
        serve.delete(APP)
    print(f"\n[autoscale] events {timeline.events}; outcomes {data['outcomes']}\n{timeline.table()}")
    story = f"events {timeline.events}, outcomes {dict(load.outcomes)}:\n{timeline.table()}"
    assert up, f"the Decoder did not reach 2 replicas within {UP_WITHIN_S} s of load; {story}"
    assert down, f"the Decoder did not return to 1 replica within {DOWN_WITHIN_S} s of the load stopping; {story}"
    assert set(load.outcomes) == {"ok"}, f"failed requests during the run; {story}"
    at_two = [s["answered"] for s in timeline.samples if s["replicas"] == 2]
    assert at_two[-1] > at_two[0], f"no request answered while two replicas ran; {story}"
