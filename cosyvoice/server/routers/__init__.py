"""One router per API family; `service_of` and `ready_service` are the dependencies they share."""
from fastapi import Request

from ..service import SpeechService


def service_of(request: Request) -> SpeechService:
    return request.app.state.service


def ready_service(request: Request) -> SpeechService:
    """The speech service, once it can serve requests (else 503 with Retry-After)."""
    service = service_of(request)
    service.check_ready()
    return service
