"""The latent explorer's static files (``ray_galaxy/serve/explorer/``: one page, a script and a
style sheet; no build step, no CDN), as the ingress serves them."""

from __future__ import annotations

import html
from importlib.resources import files

EXPLORER_FILES = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}


def explorer_file(name: str) -> bytes:
    """A file of the explorer, shipped in the package."""
    return (files("ray_galaxy.serve") / "explorer" / name).read_bytes()


def explorer_page(root_path: str) -> str:
    """index.html with its ``<base href>`` set to the application's route prefix, so the
    page's relative URLs resolve under it."""
    return explorer_file("index.html").decode().replace("{{BASE}}", html.escape(root_path + "/"))
