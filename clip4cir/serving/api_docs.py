"""The JSON API's documentation, offline: its OpenAPI schema (its own paths only, under its own title and version)
at ``/api/openapi.json`` and Swagger UI at ``/api/docs``, whose scripts and styles come from the installed
``swagger-ui-bundle`` package (Gradio's server would otherwise point the page at a CDN: blank offline)."""
from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

from clip4cir import __version__

TITLE = "clip4cir search API"
PATHS = ("/api/search",)  # what the schema documents (Gradio's own routes are its business)
ASSETS = "/api/docs/assets"


def add_api_docs(app: FastAPI, description: str) -> None:
    """Serve the schema and Swagger UI of the routes in PATHS on ``app``."""
    routes = [r for r in app.routes if getattr(r, "path", None) in PATHS]
    schema = get_openapi(title=TITLE, version=__version__, description=description, routes=routes,
                         openapi_version="3.0.3")  # what the bundled Swagger UI 4 renders

    @app.get("/api/openapi.json", include_in_schema=False)
    def openapi() -> dict:
        return schema

    @app.get("/api/docs", include_in_schema=False)
    def docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(openapi_url=f"{root}/api/openapi.json", title=TITLE,
                                   swagger_js_url=f"{root}{ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{root}{ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{root}{ASSETS}/favicon-32x32.png")

    app.mount(ASSETS, StaticFiles(directory=swagger_ui_path), name="api-docs-assets")
