"""The server on Ray Serve: the same app as server.py on many GPUs and many boxes, one endpoint.

    python -m cosyvoice.serve_ray --model-dir DIR [--replicas N | --min-replicas A --max-replicas B]
        [--gpus-per-replica 1] [--address auto] [--host 127.0.0.1] [--port 6006] [server.py's flags]

Each replica loads the model on its own GPU (or CPU) and serves every API family as server.py
does; Ray's proxy listens on --host:--port of every node that runs a replica and spreads requests
over the replicas. Every response names its replica in `X-Replica`.
- No --address: a local Ray on this machine (loopback only), stopped with the server.
  --address auto (or HOST:6379): joins a running cluster (`ray start --head` on one box, `ray start
  --address HEAD:6379` on the others); Ctrl+C removes the app again, --detach leaves it running.
- Admission: a replica takes --max-ongoing-requests at once (default --workers: what it
  synthesises together), so waiting happens at the proxy, which answers 503 with Retry-After, as
  server.py does, once more wait than it may hold (proxy_queue_limit). A replica that dies loses
  only what it was generating; requests waiting at the proxy go to the others.
- Autoscaling (--min-replicas/--max-replicas): on ongoing requests per replica, aiming at
  --target-ongoing-requests (default --workers).
- Voices are cluster-wide (server/ray_voices.py): the registry runs on the head node and keeps
  them in --voices-dir there; the model directory must exist at the same path on every node.
- /metrics answers for every replica (series labelled `replica`); /ready is 200 as soon as one
  replica serves (a replica takes requests only once its model is warm; while none runs, Ray's
  proxy holds requests until one does, so give health checks a timeout).
- Not here: --grpc-port (Ray Serve has its own gRPC proxy; use server.py for gRPC). A WebSocket
  session holds one of its replica's --max-ongoing-requests for as long as it is open.

For KubeRay (RayService) or `serve run`, `app_builder` builds the application from a dict of the
same flags: `import_path: cosyvoice.serve_ray:app_builder` with `args: {model-dir: ..., replicas: 2}`,
and `metrics_builder` the /metrics application (route prefix /metrics) from the same args.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, replace

from .server.settings import ENV_PREFIX, Settings

APP_NAME = "cosyvoice"
REPLICA_DEPLOYMENT = "CosyVoice"
METRICS_APP, METRICS_ROUTE = "cosyvoice-metrics", "/metrics"   # an app of its own: see ray_replica.py
PROGRAM = "python -m cosyvoice.serve_ray"


@dataclass(frozen=True)
class Scale:
    """How the deployment is laid out on the cluster (the Ray flags)."""
    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0
    max_ongoing_requests: int = 2
    target_ongoing_requests: float = 2.0
    address: str | None = None
    detach: bool = False

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None


def ray_flags() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("Ray Serve (every other flag is server.py's)")
    group.add_argument("--replicas", type=int, default=None,
                       help="fixed number of replicas (default 1; not with --min/--max-replicas)")
    group.add_argument("--min-replicas", type=int, default=None, help="autoscaling: fewest replicas (default 1)")
    group.add_argument("--max-replicas", type=int, default=None,
                       help="autoscaling: most replicas (default: --min-replicas, at least 1)")
    group.add_argument("--gpus-per-replica", type=float, default=None,
                       help="GPUs each replica reserves (0.5: two replicas share a GPU); default 1 with "
                            "--device cuda, else 0")
    group.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs each replica reserves (default 1)")
    group.add_argument("--max-ongoing-requests", type=int, default=None,
                       help="requests one replica takes at once (default --workers); the rest wait at the "
                            "proxy, which answers 503 beyond --max-queue plus what the replicas take at once")
    group.add_argument("--target-ongoing-requests", type=float, default=None,
                       help="autoscaling aims at this many ongoing requests per replica (default --workers)")
    group.add_argument("--address", default=None,
                       help="Ray cluster to join: auto (the one on this machine, started with `ray start`) "
                            "or HEAD_IP:6379; default: start a local Ray for this server alone")
    group.add_argument("--detach", action="store_true",
                       help="with --address: deploy, print the URL and exit, leaving the app on the cluster "
                            "(remove it with `serve shutdown`)")
    return parser


def parse_args(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> tuple[Settings, Scale]:
    """server.py's settings and the Ray layout, from flags (and COSYVOICE_* variables)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = ray_flags()
    if "-h" in argv or "--help" in argv:
        print(f"usage: {PROGRAM} --model-dir DIR [Ray Serve flags] [server.py flags]\n")
        text = parser.format_help()
        print(text[text.index("Ray Serve ("):].strip() + "\n\nserver.py's flags:")
        Settings.from_args(["--help"], environ)   # prints them and exits
    ray_args, rest = parser.parse_known_args(argv)
    settings = Settings.from_args(rest, environ)
    # paths as this machine means them (Ray runs replicas elsewhere, in another working folder)
    settings = replace(settings, model_dir=settings.model_dir.resolve(), voices_dir=settings.voices_dir.resolve())

    def fail(message: str):
        print(f"{PROGRAM}: error: {message}", file=sys.stderr)
        raise SystemExit(2)
    if settings.grpc_port:
        fail("--grpc-port is served by server.py only (Ray Serve runs its own gRPC proxy); leave it 0")
    if ray_args.replicas is not None and (ray_args.min_replicas is not None or ray_args.max_replicas is not None):
        fail("give --replicas, or --min-replicas/--max-replicas for autoscaling, not both")
    gpus = ray_args.gpus_per_replica
    if gpus is None:
        gpus = 0.0 if settings.device == "cpu" else 1.0
    if gpus < 0 or ray_args.cpus_per_replica < 0:
        fail("--gpus-per-replica and --cpus-per-replica must not be negative")
    if gpus > 0:   # a replica sees only its own GPU(s): it always runs on "cuda"
        environ = os.environ if environ is None else environ
        workers_given = any(arg == "--workers" or arg.startswith("--workers=") for arg in rest) \
            or ENV_PREFIX + "WORKERS" in environ
        # workers 0: the GPU default again, unless they were given
        settings = replace(settings, device="cuda", workers=settings.workers if workers_given else 0)
    elif settings.device != "cpu":
        fail("--device cuda needs --gpus-per-replica above 0 (Ray gives each replica its GPU)")
    low, high = ray_args.min_replicas, ray_args.max_replicas
    if low is not None or high is not None:
        low = 1 if low is None else low
        high = max(low, 1) if high is None else high
        if low < 0 or high < 1 or low > high:
            fail("need 0 <= --min-replicas <= --max-replicas and --max-replicas >= 1")
    replicas = 1 if ray_args.replicas is None else ray_args.replicas
    if replicas < 1:
        fail("--replicas must be at least 1")
    ongoing = ray_args.max_ongoing_requests or settings.workers
    target = ray_args.target_ongoing_requests or float(settings.workers)
    if ongoing < 1 or target <= 0:
        fail("--max-ongoing-requests and --target-ongoing-requests must be positive")
    if ray_args.detach and not ray_args.address:
        fail("--detach needs --address (a local Ray stops with this process)")
    return settings, Scale(replicas, low, high, gpus, ray_args.cpus_per_replica, ongoing, target,
                           ray_args.address, ray_args.detach)


def proxy_queue_limit(settings: Settings, scale: Scale) -> int:
    """Requests a proxy holds before it answers 503. Ray counts a request as queued until a
    replica takes it, and a burst is counted before any is handed over, so the limit is --max-queue
    plus what the replicas take at once: a burst the replicas and the queue could hold is never
    refused (under lasting overload up to that many wait at each proxy)."""
    replicas = scale.max_replicas if scale.autoscaling else scale.replicas
    return settings.max_queue + scale.max_ongoing_requests * replicas


def build_application(settings: Settings, scale: Scale):
    """The Serve application: the voice registry and the replicas of the server."""
    from ray import serve

    from .server.ray_replica import CosyVoiceReplica, registry_deployment

    registry = registry_deployment().bind(str(settings.voices_dir), settings.log_level)
    options = dict(
        name=REPLICA_DEPLOYMENT,
        ray_actor_options={"num_cpus": scale.cpus_per_replica, "num_gpus": scale.gpus_per_replica},
        max_ongoing_requests=scale.max_ongoing_requests,
        max_queued_requests=proxy_queue_limit(settings, scale),
        backpressure_config={"status_code": 503, "retry_after_s": settings.retry_after_s},
        graceful_shutdown_timeout_s=30,
        health_check_period_s=5,
        max_constructor_retry_count=3,   # a model that does not load fails the deployment soon
    )
    if scale.autoscaling:
        options["autoscaling_config"] = {"min_replicas": scale.min_replicas, "max_replicas": scale.max_replicas,
                                         "target_ongoing_requests": scale.target_ongoing_requests}
    else:
        options["num_replicas"] = scale.replicas
    return serve.deployment(CosyVoiceReplica).options(**options).bind(settings, registry)


def build_metrics_application(settings: Settings):
    """The /metrics application: every replica's metrics, whatever queues at the proxy."""
    from .server.ray_replica import metrics_deployment

    return metrics_deployment().bind(APP_NAME, REPLICA_DEPLOYMENT, settings.api_key)


def metrics_builder(args: dict):
    """A Serve application builder for /metrics (route_prefix /metrics), from app_builder's args."""
    settings, _ = parse_args(flags_of(args))
    return build_metrics_application(settings)


def app_builder(args: dict):
    """A Serve application builder (RayService's serveConfigV2, `serve run`): `args` holds the
    command line's flags without dashes, e.g. {"model-dir": "/models/CosyVoice2-0.5B", "replicas": 2,
    "device": "cuda"}. The proxy's host and port come from the Serve config there, not from here."""
    settings, scale = parse_args(flags_of(args))
    return build_application(settings, scale)


def flags_of(args: dict) -> list[str]:
    """{"model-dir": "/m", "replicas": 2, "detach": True} -> ["--model-dir", "/m", "--replicas", "2", "--detach"]"""
    argv = []
    for key, value in args.items():
        flag = "--" + str(key).lstrip("-").replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value not in (False, None):
            argv += [flag, str(value)]
    return argv


def start_ray(scale: Scale, settings: Settings):
    """Joins the cluster at --address, or starts a local Ray bound to loopback."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")   # rented boxes have no internet anyway
    if scale.address is None:
        # a local Ray for this server alone: its services listen on 127.0.0.1 only
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    elif "RAY_AUTH_MODE" not in os.environ and (os.environ.get("RAY_AUTH_TOKEN") or os.path.isfile(
            os.path.expanduser("~/.ray/auth_token"))):
        # Ray turns token authentication on by itself only for a cluster it finds on this machine
        os.environ["RAY_AUTH_MODE"] = "token"
    import ray

    if scale.address is None:
        return ray.init(include_dashboard=False, logging_level=settings.log_level.upper(),
                        log_to_driver=True)
    return ray.init(address=scale.address, logging_level=settings.log_level.upper(), log_to_driver=True)


def main(argv: list[str] | None = None) -> int:
    settings, scale = parse_args(argv)
    try:
        context = start_ray(scale, settings)
    except ImportError:
        print(f"{PROGRAM}: error: Ray is not installed; install it with `pip install "
              "'cosyvoice-deploy[ray]'` (or `pip install 'ray[serve]'`)", file=sys.stderr)
        return 1
    from ray import serve

    layout = (f"{scale.min_replicas}..{scale.max_replicas} replicas (autoscaling)" if scale.autoscaling
              else f"{scale.replicas} replica{'s' if scale.replicas != 1 else ''}")
    where = f"{scale.gpus_per_replica:g} GPU" if scale.gpus_per_replica else f"{scale.cpus_per_replica:g} CPU"
    print(f"Ray cluster at {context.address_info.get('gcs_address')}; deploying {layout}, {where} each, "
          f"model {settings.model_dir}; every replica loads the model and warms up first", flush=True)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    started = time.monotonic()
    try:
        serve.run(build_application(settings, scale), name=APP_NAME, route_prefix="/")
        serve.run(build_metrics_application(settings), name=METRICS_APP, route_prefix=METRICS_ROUTE)
    except Exception as error:   # Ray's RuntimeError after the replicas failed to start, and the like
        print(f"error: the deployment failed: {error}", file=sys.stderr, flush=True)
        _stop(scale, serve)
        return 1
    shown_host = "127.0.0.1" if settings.host == "0.0.0.0" else settings.host
    print(f"CosyVoice on Ray Serve at http://{shown_host}:{settings.port} (proxy bound to {settings.host} on "
          f"every node with a replica); ready after {time.monotonic() - started:.0f} s; "
          f"`serve status` shows the replicas", flush=True)
    if scale.detach:
        print("detached: the app keeps running on the cluster; `serve shutdown` removes it", flush=True)
        return 0
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    print("stopping: running streams get up to 30 s to finish", flush=True)
    _stop(scale, serve)
    return 0


def _stop(scale: Scale, serve) -> None:
    import ray

    if scale.address is None:
        serve.shutdown()
        ray.shutdown()
    else:
        serve.delete(METRICS_APP)
        serve.delete(APP_NAME)


if __name__ == "__main__":
    sys.exit(main())
