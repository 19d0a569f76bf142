"""Configuration: the documented YAML shape, environment overrides and errors that say where."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tokenrelay.config import ConfigError, load_config

DOC_EXAMPLE = """
models:
  - name: tiny                 # the embedded model
    provider: llamacpp
  - name: demo
    provider: mock
    options: {first_token_ms: 20, tokens_per_second: 50}
  - name: gpt
    provider: openai
    base_url: http://127.0.0.1:9100/v1
    api_key_env: UPSTREAM_API_KEY   # optional
    upstream_model: gpt-4o-mini     # optional, defaults to name
"""


def test_documented_shape(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(DOC_EXAMPLE)
    cfg = load_config(path, env={})
    assert [m.name for m in cfg.models] == ["tiny", "demo", "gpt"]
    assert cfg.models[1].options == {"first_token_ms": 20, "tokens_per_second": 50}
    assert cfg.models[2].upstream_model == "gpt-4o-mini"
    assert cfg.server.port == 8080 and cfg.server.keepalive_seconds == 15


def test_no_config_serves_the_embedded_model() -> None:
    cfg = load_config(None, env={})
    assert [(m.name, m.provider) for m in cfg.models] == [("tiny", "llamacpp")]


def test_environment_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("server: {port: 9000}\n" + DOC_EXAMPLE)
    env = {
        "TOKENRELAY_PORT": "9001",
        "TOKENRELAY_KEEPALIVE_SECONDS": "2.5",
        "TOKENRELAY_MODEL_PATH": "/m.gguf",
    }
    cfg = load_config(path, env=env)
    assert cfg.server.port == 9001 and cfg.server.keepalive_seconds == 2.5
    assert cfg.models[0].model_path == "/m.gguf"


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("models: [{name: a, provider: nope}]", "models[0].provider"),
        ("models: [{name: a, provider: mock, colour: red}]", "colour"),
        ("models: [{name: a, provider: openai}]", "base_url"),
        ("models: [{name: a, provider: openai, base_url: 'localhost:8000/v1'}]", "models[0].base_url"),
        ("models: [{name: a, provider: mock}, {name: a, provider: mock}]", "unique"),
        ("server: {port: lots}", "server.port"),
        ("- just a list", "top level"),
        ("models: [", "YAML"),
    ],
)
def test_errors_say_where(tmp_path: Path, text: str, where: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert where in str(info.value)


def test_serve_refuses_a_bad_config(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("models: [{name: a, provider: nope}]")
    run = subprocess.run(
        [sys.executable, "-m", "tokenrelay", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert "models[0].provider" in run.stderr
    assert "Traceback" not in run.stderr
