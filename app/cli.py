"""The `seedling` console script and `python -m app`: start uvicorn with graceful SIGTERM drain.

    python -m app --port 8000                         # settings from SEEDLING_* env vars
    SEEDLING_CHECKPOINT=ckpt/ SEEDLING_API_KEYS=k1,k2 seedling --host 0.0.0.0

On SIGTERM/SIGINT: /ready turns 503 and new requests get 503 at once (stop admitting), requests in
flight get up to SEEDLING_DRAIN_TIMEOUT_S to finish, then the engine stops and the process exits.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import uvicorn

from .main import create_app
from .settings import ServerSettings


class DrainingServer(uvicorn.Server):
    """uvicorn.Server that flips the app into draining before uvicorn's own graceful shutdown."""

    def __init__(self, config: uvicorn.Config, app_state: Any) -> None:
        super().__init__(config)
        self.app_state = app_state

    def handle_exit(self, sig: int, frame: Any) -> None:
        client = self.app_state.client
        if client is not None:
            client.begin_drain()
        super().handle_exit(sig, frame)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="seedling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", help="bind address (SEEDLING_HOST)")
    parser.add_argument("--port", type=int, help="bind port (SEEDLING_PORT)")
    parser.add_argument("--checkpoint", help="checkpoint directory (SEEDLING_CHECKPOINT)")
    parser.add_argument("--device", help="auto | cpu | cuda (SEEDLING_DEVICE)")
    parser.add_argument("--log-level", help="SEEDLING_LOG_LEVEL")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    settings = ServerSettings.from_env(**overrides)
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            access_log=False, timeout_graceful_shutdown=int(settings.drain_timeout_s) or None,
                            lifespan="on")
    DrainingServer(config, app.state.seedling).run()
    return 0
