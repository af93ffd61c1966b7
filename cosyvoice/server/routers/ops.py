"""Operations: liveness, readiness and Prometheus metrics."""
from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from ..engine import Engine
from . import engine_of

router = APIRouter(tags=["operations"])


@router.get("/health", summary="the process is alive (the model may still be loading)")
def health(engine: Engine = Depends(engine_of)) -> dict:
    return {"status": "ok", "model": engine.state}


@router.get("/ready", summary="200 once the model is loaded and warmed, 503 before")
def ready(engine: Engine = Depends(engine_of)) -> JSONResponse:
    if engine.state == "ready":
        return JSONResponse({"status": "ready", "sample_rate": engine.sample_rate})
    detail = "the model failed to load; see the server log" if engine.state == "failed" \
        else "the model is loading"
    return JSONResponse({"status": engine.state, "detail": detail}, status_code=503,
                        headers={"Retry-After": str(engine.settings.retry_after_s)})


@router.get("/metrics", summary="Prometheus metrics")
def metrics(engine: Engine = Depends(engine_of)) -> Response:
    return Response(engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)
