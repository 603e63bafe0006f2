"""The web page (one HTML file that uses the API) and its icon."""

from __future__ import annotations

import functools
import io
from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response
from PIL import Image, ImageDraw

router = APIRouter()


@router.get("/")
def page():
    return HTMLResponse(_page_html())


@router.get("/favicon.ico")
def icon():
    return Response(_favicon(), media_type="image/x-icon", headers={"Cache-Control": "max-age=86400"})


@functools.cache
def _page_html() -> str:
    return files("wan_i2v.server").joinpath("page.html").read_text(encoding="utf-8")


@functools.cache
def _favicon() -> bytes:
    """A plain blue square with a white play triangle, drawn once (browsers ask for it on every page)."""
    picture = Image.new("RGBA", (32, 32), (53, 83, 209, 255))
    ImageDraw.Draw(picture).polygon([(11, 8), (11, 24), (24, 16)], fill="white")
    buffer = io.BytesIO()
    picture.save(buffer, format="ICO", sizes=[(32, 32)])
    return buffer.getvalue()
