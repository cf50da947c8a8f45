"""The `seedling` console script and `python -m app`: start uvicorn with graceful SIGTERM drain.

    python -m app --port 8000                         # settings from SEEDLING_* env vars
    SEEDLING_CHECKPOINT=ckpt/ SEEDLING_API_KEYS=k1,k2 seedling --host 0.0.0.0

On SIGTERM/SIGINT: /ready turns 503 and new requests get 503 at once (stop admitting), requests in
flight get up to SEEDLING_DRAIN_TIMEOUT_S to finish; what still runs then ends with an error (an SSE
error event and [DONE], or a 503), the engine stops and the process exits.
Exit status: 2 for a bad setting, 1 when the engine thread fails or hangs (so Docker's
`--restart unless-stopped`, systemd or Kubernetes start a fresh process), else uvicorn's.
"""

from __future__ import annotations

import argparse
import logging
import socket
from collections.abc import Sequence
from types import FrameType

import uvicorn

from .main import DRAIN_GRACE_S, AppState, create_app
from .settings import ServerSettings, SettingsError

log = logging.getLogger("seedling.app")


class DrainingServer(uvicorn.Server):
    """uvicorn.Server that drains the app before uvicorn's own graceful shutdown, and shuts down
    (exit status 1) when the engine fails or stalls."""

    def __init__(self, config: uvicorn.Config, app_state: AppState) -> None:
        super().__init__(config)
        self.app_state = app_state
        self.engine_failed = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        client = self.app_state.client
        if client is not None:
            client.begin_drain()  # a signal handler: only flip the flag; the timer starts in shutdown()
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.app_state.begin_drain()
        await super().shutdown(sockets)

    async def on_tick(self, counter: int) -> bool:
        problem = self.app_state.engine_problem()
        if problem is not None and not self.engine_failed:
            log.critical("%s; shutting down (exit status 1) so the supervisor restarts the server", problem[1])
            self.engine_failed = True
            self.should_exit = True
        return await super().on_tick(counter)


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
    try:
        settings = ServerSettings(**overrides)
    except SettingsError as exc:
        parser.exit(2, f"seedling: bad setting: {exc}\n")
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            access_log=False, timeout_graceful_shutdown=settings.drain_timeout_s + DRAIN_GRACE_S,
                            lifespan="on")
    server = DrainingServer(config, app.state.seedling)
    server.run()
    return 1 if server.engine_failed else 0
