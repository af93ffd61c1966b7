"""The web page at /: pick or upload a voice, type text, hear it as it streams (static, no key
needed; the page sends the API key the user types)."""
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

PAGE = Path(__file__).resolve().parent.parent / "web" / "index.html"

router = APIRouter(tags=["web page"])


@router.get("/", include_in_schema=False)
def page() -> FileResponse:
    return FileResponse(PAGE, media_type="text/html")
