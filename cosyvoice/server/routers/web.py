"""The web page at / (and at /static/, where the server this project replaces kept its page):
pick or upload a voice, type text, hear it as it streams (static, no key needed; the page sends
the API key the user types). GET / with a `text` parameter asks for speech instead (see
routers/sillytavern.py)."""
from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse

from .sillytavern import speak_query

PAGE = Path(__file__).resolve().parent.parent / "web" / "index.html"

router = APIRouter(tags=["web page"])


@router.get("/", include_in_schema=False)
async def page(request: Request) -> Response:
    if "text" in request.query_params:
        return await speak_query(request)
    return FileResponse(PAGE, media_type="text/html")


@router.get("/static/", include_in_schema=False)
@router.get("/static/index.html", include_in_schema=False)
def static_page() -> FileResponse:
    return FileResponse(PAGE, media_type="text/html")
