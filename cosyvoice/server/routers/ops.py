"""Operations: liveness, readiness and Prometheus metrics."""
from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from ..service import SpeechService
from . import service_of

router = APIRouter(tags=["operations"])


@router.get("/health", summary="the process is alive (the model may still be loading)")
def health(service: SpeechService = Depends(service_of)) -> dict:
    """`generation`: the loaded model's generation (CosyVoice2, CosyVoice3); null until it is ready."""
    return {"status": "ok", "model": service.state, "generation": service.generation}


@router.get("/ready", summary="200 once the model is loaded and warmed, 503 before and while stopping")
def ready(service: SpeechService = Depends(service_of)) -> JSONResponse:
    if service.state == "ready" and not service.stopping:
        return JSONResponse({"status": "ready", "sample_rate": service.sample_rate,
                             "generation": service.generation})
    if service.stopping:
        status, detail = "stopping", "the server is shutting down"
    else:
        status = service.state
        detail = "the model failed to load; see the server log" if status == "failed" \
            else "the model is loading"
    return JSONResponse({"status": status, "detail": detail}, status_code=503,
                        headers={"Retry-After": str(service.settings.retry_after_s)})


@router.get("/metrics", summary="Prometheus metrics")
def metrics(service: SpeechService = Depends(service_of)) -> Response:
    return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)
