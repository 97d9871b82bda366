"""Design properties 23 and 26: version routing and rollback, on the real app (in-process)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving_helpers import make_biased_package, random_png, ready_client, upload

from dlpipe.routing import ABTestConfig
from dlpipe.serving import ServeSettings, create_app
from dlpipe.serving.sources import LocalSource

PROPERTY = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
# Version v always predicts class WINNER[v]: the answer itself shows which version computed it.
WINNER = {"1": 3, "2": 5, "3": 7}
VERSIONS = sorted(WINNER)


@pytest.fixture(scope="module")
def routed(serving_root: Path, base_onnx: Path) -> Iterator[tuple[TestClient, LocalSource]]:
    root = serving_root / "routing"
    packages = {v: make_biased_package(root, base_onnx, v, w) for v, w in WINNER.items()}
    source = LocalSource("fashion", packages, default_version="1")
    cfg = ServeSettings(
        model_name="fashion",
        max_batch_size=8,
        max_wait_ms=1.0,
        registry_refresh_s=3600,  # the tests switch routing themselves, deterministically
        access_log=False,
    )
    with ready_client(create_app(cfg, source=source)) as client:
        yield client, source


def _apply(client: TestClient, source: LocalSource, champion: str, ab: ABTestConfig | None) -> None:
    """What the registry follower does after a promote / A/B change / rollback."""
    source.set_plan(champion, ab)
    app: FastAPI = client.app  # type: ignore[assignment]
    assert client.portal is not None
    client.portal.call(app.state.manager.refresh)


def _answer(client: TestClient, **kw: object) -> tuple[str, int]:
    r = client.post("/predict", files=upload(random_png(np.random.default_rng(0))), **kw)  # type: ignore[arg-type]
    assert r.status_code == 200, r.text
    body = r.json()
    return body["model_version"], body["predictions"][0]["class_index"]


ab_configs = st.none() | st.tuples(
    st.permutations(VERSIONS).map(lambda p: p[:2]), st.floats(0.0, 1.0)
).map(lambda t: ABTestConfig(t[0][0], t[0][1], t[1]))


# Feature: deep-learning-pipeline, Property 23: Version-specific routing
@PROPERTY
@given(
    champion=st.sampled_from(VERSIONS),
    ab=ab_configs,
    wanted=st.sampled_from(VERSIONS),
    via=st.sampled_from(["header", "query"]),
    request_key=st.none() | st.text(min_size=1, max_size=8).filter(str.isprintable),
)
def test_a_request_naming_a_version_is_answered_by_that_version(
    routed: tuple[TestClient, LocalSource],
    champion: str,
    ab: ABTestConfig | None,
    wanted: str,
    via: str,
    request_key: str | None,
) -> None:
    client, source = routed
    _apply(client, source, champion, ab)
    served = set(client.get("/models").json()["routing"]["serving_versions"])
    headers = {"X-Request-Key": request_key.encode().hex()} if request_key else {}
    params = {}
    if via == "header":
        headers["X-Model-Version"] = wanted
    else:
        params["version"] = wanted
    r = client.post(
        "/predict",
        files=upload(random_png(np.random.default_rng(1))),
        headers=headers,
        params=params,
    )
    if wanted not in served:
        assert r.status_code == 404
        assert r.json()["error"]["type"] == "version_not_found"
        return
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == wanted
    assert body["predictions"][0]["class_index"] == WINNER[wanted]


# Feature: deep-learning-pipeline, Property 26: Rollback traffic switching
@PROPERTY
@given(
    versions=st.permutations(VERSIONS).map(lambda p: (p[0], p[1], p[2])),
    with_ab=st.booleans(),
    split=st.floats(0.05, 0.95),
    keys=st.lists(st.integers(0, 10**6), min_size=1, max_size=12),
)
def test_after_rollback_no_request_reaches_the_rolled_back_version(
    routed: tuple[TestClient, LocalSource],
    versions: tuple[str, str, str],
    with_ab: bool,
    split: float,
    keys: list[int],
) -> None:
    client, source = routed
    good, bad, other = versions
    # Before: the version about to be rolled back from takes traffic (alone, or in an A/B test).
    ab = ABTestConfig(bad, other, split) if with_ab else None
    _apply(client, source, bad, ab)
    assert bad in client.get("/models").json()["routing"]["serving_versions"]
    # Rollback: all traffic to `good`, any A/B test that involved `bad` ends.
    _apply(client, source, good, None)
    for key in keys:
        version, winner = _answer(client, headers={"X-Request-Key": str(key)})
        assert (version, winner) == (good, WINNER[good])
    version, winner = _answer(client)
    assert (version, winner) == (good, WINNER[good])
    models = client.get("/models").json()
    assert models["routing"]["serving_versions"] == [good]


def test_unknown_version_is_404_and_names_the_served_ones(
    routed: tuple[TestClient, LocalSource],
) -> None:
    client, source = routed
    _apply(client, source, "1", None)
    r = client.post(
        "/predict", files=upload(random_png(np.random.default_rng(0))), params={"version": "9"}
    )
    assert r.status_code == 404
    assert "served versions: ['1']" in r.json()["error"]["message"]


def test_a_version_that_fails_to_load_leaves_the_previous_one_serving(
    routed: tuple[TestClient, LocalSource], tmp_path: Path
) -> None:
    client, source = routed
    _apply(client, source, "2", None)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.onnx").write_bytes(b"garbage")
    source.add_package("4", broken)
    _apply(client, source, "4", None)
    assert _answer(client) == ("2", WINNER["2"])
    models = client.get("/models").json()
    assert models["failed_versions"]["4"]["reason"] == "load failed (ModelLoadError)"
    assert str(broken) not in str(models)  # paths stay in the log
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json()["unavailable"] == {
        "4": models["failed_versions"]["4"]["reason"]
    }


def test_sticky_request_keys_agree_with_the_registry_rule(
    routed: tuple[TestClient, LocalSource],
) -> None:
    from dlpipe.routing import RoutingState, choose_version

    client, source = routed
    ab = ABTestConfig("1", "2", 0.5)
    _apply(client, source, "3", ab)
    for key in ("alice", "bob", "carol", "dave"):
        expected, _ = choose_version(RoutingState(ab=ab), "fashion", key)
        answers = {_answer(client, headers={"X-Request-Key": key})[0] for _ in range(3)}
        assert answers == {expected}
