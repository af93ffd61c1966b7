"""One router per API family; `engine_of` is the dependency they share."""
from fastapi import Request

from ..engine import Engine


def engine_of(request: Request) -> Engine:
    return request.app.state.engine


def ready_engine(request: Request) -> Engine:
    """The engine, once it can serve requests (else 503 with Retry-After)."""
    engine = engine_of(request)
    engine.check_ready()
    return engine
