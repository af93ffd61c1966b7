"""The Ray Serve side of the server (cosyvoice.serve_ray builds the application from these).

`CosyVoiceReplica`: one replica = the FastAPI app of server.py (create_app) on its own model, its
own admission (workers) and response cache, behind Ray's HTTP proxy. Its constructor loads the
model and warms up, so Ray routes to a replica only once it can serve; `check_health` fails when
the model is not ready. Three things differ from a single server, all outside the routers:
- `ReplicaFront` (outermost middleware) names the replica in an `X-Replica` header on every
  response (and WebSocket accept), brings the voice cache up to date before a request, and shares
  the xtts settings a request changed (ray_voices.py says why and how).
- The voice store is a `ClusterVoiceStore` on the `VoiceRegistry` deployment (ray_voices.py).
- `/metrics` is an application of its own (`ClusterMetrics`, route prefix /metrics), so a scrape
  never waits at the proxy behind syntheses: it gathers every replica's metrics (a broadcast,
  which Ray does not hold back) and labels each series with `replica`, so one scrape of the
  proxy sees the whole deployment.
"""
from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

from .app import create_app
from .errors import ApiError
from .logs import configure_logging
from .middleware import ApiKey
from .ray_voices import ClusterVoiceStore, HandleClient, VoiceRegistry
from .service import build_service
from .settings import Settings

log = logging.getLogger("cosyvoice.server")

REPLICA_HEADER = b"x-replica"
XTTS_SETTINGS = "xtts_settings"      # app.state attribute of routers/xtts.py, shared across replicas
NO_REFRESH = frozenset({"/health", "/ready", "/metrics"})   # need no voices
METRICS_TIMEOUT_S = 10.0
HEAD_NODE = "node:__internal_head__"   # a resource only the head node has


class ReplicaFront:
    """Pure ASGI middleware around the app of one replica (see the module's doc)."""

    def __init__(self, app, name: str, voices: ClusterVoiceStore, state):
        self.app = app
        self.header = (REPLICA_HEADER, name.encode("latin-1"))
        self.voices = voices
        self.state = state             # the FastAPI app's state, where routers/xtts.py keeps its settings

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        if scope["path"] not in NO_REFRESH:
            await self.voices.refresh()
            shared = self.voices.shared.get(XTTS_SETTINGS)
            if shared is not None and getattr(self.state, XTTS_SETTINGS, None) != shared:
                setattr(self.state, XTTS_SETTINGS, dict(shared))

        async def send_named(message):
            if message["type"] in ("http.response.start", "websocket.accept"):
                await self._share_settings()
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)
        await self.app(scope, receive, send_named)

    async def _share_settings(self) -> None:
        """Sends the xtts settings to the registry when this request changed them, before its
        response starts (so the client's next request, on any replica, sees them)."""
        current = getattr(self.state, XTTS_SETTINGS, None)
        if current is not None and current != self.voices.shared.get(XTTS_SETTINGS):
            try:
                await asyncio.to_thread(self.voices.put_shared, XTTS_SETTINGS, dict(current))
            except ApiError as error:
                log.warning("xtts settings not shared with the other replicas: %s", error.message)


def merge_metrics(parts: list[tuple[str, bytes]]) -> bytes:
    """Prometheus text of several replicas as one exposition: each family once, each sample with
    a `replica` label naming where it came from."""
    families: dict[str, Metric] = {}
    for replica, text in parts:
        for family in text_string_to_metric_families(text.decode("utf-8")):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type,
                                                        family.unit)
            merged.samples.extend(sample._replace(labels={**sample.labels, "replica": replica})
                                  for sample in family.samples)

    class Gathered:
        def collect(self):
            return iter(families.values())
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Gathered())
    return generate_latest(registry)


@serve.ingress()
class CosyVoiceReplica:
    """One replica of the server (Ray Serve deployment; serve_ray.py sets its options)."""

    async def __init__(self, settings: Settings, registry):
        configure_logging(settings.log_level)
        context = serve.get_replica_context()
        self.name = f"{context.deployment}#{context.replica_tag}"
        self.voices = ClusterVoiceStore(HandleClient(registry), default_name=settings.default_voice)
        self.service = build_service(settings, voices=self.voices)
        failures: list[BaseException] = []
        self.service.start_loading(on_failure=failures.append)
        while self.service.state == "loading":     # the loader thread: model, voices, warm-up
            await asyncio.sleep(0.1)
        if self.service.state != "ready":
            for _ in range(20):   # the loader sets "failed", then passes the error on
                if failures:
                    break
                await asyncio.sleep(0.05)
            cause = failures[0] if failures else "see the log above"
            raise RuntimeError(f"replica {self.name}: the model could not be loaded: {cause}")
        log.info("replica %s ready", self.name)

    def __serve_build_asgi_app__(self):
        app = create_app(self.service.settings, self.service)
        app.add_middleware(ReplicaFront, name=self.name, voices=self.voices, state=app.state)
        return app

    def check_health(self) -> None:
        """Ray replaces a replica whose model is not ready (or that is stopping)."""
        if self.service.state != "ready" or self.service.stopping:
            raise RuntimeError(f"replica {self.name}: model {self.service.state}")

    def metrics_text(self) -> tuple[str, bytes]:
        """This replica's name and Prometheus text (ClusterMetrics asks every replica)."""
        return self.name, self.service.metrics.render()

    def __del__(self):
        if hasattr(self, "voices"):
            shutil.rmtree(self.voices.folder, ignore_errors=True)


@serve.ingress()
class ClusterMetrics:
    """GET /metrics for the whole deployment, behind the same API key as the server."""

    async def __init__(self, app_name: str, deployment: str, api_key: str = ""):
        self._target = (deployment, app_name)
        self._api_key = api_key
        self._replicas = None

    def __serve_build_asgi_app__(self):
        app = FastAPI(title="CosyVoice metrics", docs_url=None, redoc_url=None, openapi_url=None)
        for path in ("", "/"):   # the route prefix (/metrics) itself, with or without its slash
            app.add_api_route(path, self.gather, methods=["GET"], include_in_schema=False)
        if self._api_key:
            app.add_middleware(ApiKey, key=self._api_key)
        return app

    async def gather(self) -> Response:
        if self._replicas is None:
            self._replicas = serve.get_deployment_handle(*self._target)
        answers = await self._replicas.broadcast("metrics_text").results_async(
            timeout_s=METRICS_TIMEOUT_S, return_exceptions=True)
        parts = sorted(answer for answer in answers if not isinstance(answer, BaseException))
        return Response(merge_metrics(parts), media_type=CONTENT_TYPE_LATEST)


class VoiceRegistryDeployment(VoiceRegistry):
    """The registry as a deployment: one replica on the head node, whose disk keeps the voices."""

    def __init__(self, folder: str, log_level: str = "info"):
        configure_logging(log_level)
        super().__init__(Path(folder))


def metrics_deployment():
    return serve.deployment(ClusterMetrics, name="ClusterMetrics", num_replicas=1, max_ongoing_requests=100,
                            ray_actor_options={"num_cpus": 0})


def registry_deployment():
    return serve.deployment(VoiceRegistryDeployment, name="VoiceRegistry", num_replicas=1,
                            max_ongoing_requests=1000,
                            ray_actor_options={"num_cpus": 0, "resources": {HEAD_NODE: 0.001}})
