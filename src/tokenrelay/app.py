"""ASGI application factory: ``tokenrelay.app:create_app`` is what granian's workers import.

The CLI resolves the configuration once (file, environment, flags) and hands it to every worker as JSON
in ``TOKENRELAY_CONFIG_JSON``; without it, the worker loads the configuration itself.
"""

from __future__ import annotations

import os

from tokenrelay.config import Config, config_from_json, load_config
from tokenrelay.gateway import Gateway
from tokenrelay.logs import setup_logging
from tokenrelay.transport.http import HttpApp


def build_app(config: Config) -> HttpApp:
    setup_logging(config.server.log_level)
    return HttpApp(Gateway(config))


def create_app() -> HttpApp:
    raw = os.environ.get("TOKENRELAY_CONFIG_JSON")
    return build_app(config_from_json(raw) if raw else load_config())
