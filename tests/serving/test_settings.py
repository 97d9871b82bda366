"""Property 27 (environment-based configuration) and the `dlpipe serve` argument checks."""

from __future__ import annotations

import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving_helpers import png_bytes

from dlpipe.serving import ServeSettings, create_app, get_settings
from dlpipe.serving.cli import main as serve_main

key_text = st.text(
    alphabet=st.characters(min_codepoint=48, max_codepoint=122), min_size=1, max_size=12
).filter(str.isalnum)
environment = st.fixed_dictionaries(
    {},
    optional={
        "model_name": key_text,
        "host": st.sampled_from(["0.0.0.0", "127.0.0.1", "::1"]),
        "port": st.integers(1, 65535),
        "max_batch_size": st.integers(1, 4096),
        "max_wait_ms": st.floats(0, 1000).map(lambda v: round(v, 3)),
        "queue_capacity": st.integers(1, 100_000),
        "request_timeout_ms": st.floats(1, 60_000).map(lambda v: round(v, 3)),
        "api_keys": st.lists(key_text, min_size=1, max_size=3),
        "rate_limit": st.sampled_from(["10/second", "100/minute", "5 per second"]),
        "max_upload_bytes": st.integers(1, 10**9),
        "registry_refresh_s": st.floats(0.1, 60).map(lambda v: round(v, 3)),
        "ort_intra_op_threads": st.integers(0, 16),
        "log_level": st.sampled_from(["debug", "info", "warning", "error"]),
        "resize_inputs": st.booleans(),
        "loop": st.sampled_from(["asyncio", "uvloop"]),
        "max_in_flight": st.integers(1, 10_000),
        "max_loop_lag_ms": st.floats(0.5, 10_000).map(lambda v: round(v, 3)),
    },
)


def _env_value(value: object) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# Feature: deep-learning-pipeline, Property 27: Environment-based configuration
@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(env=environment)
def test_environment_overrides_defaults(
    clean_env: pytest.MonkeyPatch, env: dict[str, object]
) -> None:
    defaults = ServeSettings().model_dump()
    with clean_env.context() as mp:
        for field, value in env.items():
            mp.setenv(f"DLPIPE_{field.upper()}", _env_value(value))
        get_settings.cache_clear()
        try:
            app = create_app()  # what `dlpipe serve` builds: settings from the environment
            configured = app.state.settings.model_dump()
        finally:
            get_settings.cache_clear()
    for field, default in defaults.items():
        expected = env.get(field, default)
        assert configured[field] == expected, field


def test_explicit_settings_win_over_the_environment(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("DLPIPE_TOP_K", "7")
    get_settings.cache_clear()
    try:
        assert create_app().state.settings.top_k == 7
        assert create_app(ServeSettings(package="/nonexistent", top_k=2)).state.settings.top_k == 2
    finally:
        get_settings.cache_clear()


def test_bad_environment_value_names_the_setting(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("DLPIPE_MAX_BATCH_SIZE", "zero")
    with pytest.raises(ValueError, match="max_batch_size"):
        ServeSettings()
    clean_env.setenv("DLPIPE_MAX_BATCH_SIZE", "4")
    clean_env.setenv("DLPIPE_RATE_LIMIT", "lots")
    with pytest.raises(ValueError, match="rate_limit"):
        ServeSettings()


def test_cli_rejects_bad_values_with_one_line(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert serve_main(["--port", "70000", "--package", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "port" in err[0]


def test_server_without_any_model_is_up_but_not_ready(
    clean_env: pytest.MonkeyPatch, tmp_path: object
) -> None:
    from pathlib import Path

    empty = Path(str(tmp_path)) / "empty"
    empty.mkdir()
    app = create_app(ServeSettings(package=str(empty), registry_refresh_s=3600))
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200
        deadline = time.monotonic() + 30
        while not app.state.manager.failures and time.monotonic() < deadline:
            time.sleep(0.02)
        ready = client.get("/ready")
        assert ready.status_code == 503 and "failed" in ready.json()["reason"]
        png = png_bytes(np.zeros((28, 28), np.uint8))
        r = client.post("/predict", files={"file": ("x.png", png, "image/png")})
        assert r.status_code == 503
        assert r.json()["error"]["type"] == "model_unavailable"


def test_every_setting_is_a_documented_flag(capsys: pytest.CaptureFixture[str]) -> None:
    from dlpipe.serving.cli import build_parser, settings_from_args

    parser = build_parser()
    flags = {a.dest: a for a in parser._actions if a.dest != "help"}
    assert set(flags) == set(ServeSettings.model_fields)
    for name, action in flags.items():
        assert action.help and "(env DLPIPE_" in action.help and len(action.help) > 30, name
    parsed = settings_from_args(
        ["--package", "p", "--no-warmup", "--image-formats", "png,webp", "--max-batch-size", "9"]
    )
    assert parsed.warmup is False and parsed.image_formats == ["PNG", "WEBP"]
    assert parsed.max_batch_size == 9
