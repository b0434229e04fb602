"""The latent explorer page (``GET /`` of the Serve app) in a real headless Chromium.

Playwright drives Debian's ``chromium`` (``.ci/run`` installs it where missing) against the
shared Serve instance on loopback. Every image the page shows is checked against the model
decoded in this process, byte for byte. A screenshot lands in ``test-artifacts/``.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from urllib.parse import parse_qsl, urlsplit

import numpy as np
import pytest
import requests

from conftest import REPO
from serving import CLASSES, SIZE, TOKEN, expected_images

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = REPO / "test-artifacts"
PAD = 2  # figures.grid padding

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium: apt-get install chromium "
                                                "(.ci/run installs it)"),
    pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`"),
]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


class Watched:
    """A page plus what it logged and how many /decode requests were in flight at once."""

    def __init__(self, page) -> None:
        self.page, self.errors, self.decodes = page, [], 0
        self._inflight, self.max_inflight = 0, 0
        self._lock = threading.Lock()
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("request", self._start)
        page.on("requestfinished", self._end)
        page.on("requestfailed", self._end)

    def _start(self, request) -> None:
        if request.url.endswith("/decode"):
            with self._lock:
                self.decodes += 1
                self._inflight += 1
                self.max_inflight = max(self.max_inflight, self._inflight)

    def _end(self, request) -> None:
        if request.url.endswith("/decode"):
            with self._lock:
                self._inflight -= 1


@pytest.fixture
def watched(browser):
    ctx = browser.new_context(viewport={"width": 1280, "height": 1100})
    yield Watched(ctx.new_page())
    ctx.close()


def open_explorer(w: Watched, url: str) -> None:
    w.page.goto(url)
    # Ready: the galaxy, the interpolation strip and the traversal grid are all drawn.
    w.page.wait_for_function(
        "['galaxy', 'interp', 'traverse'].every(id => document.getElementById(id).naturalWidth > 0)",
        timeout=60_000)
    idle(w)


def idle(w: Watched) -> None:
    w.page.wait_for_selector('#view[aria-busy="false"]', timeout=60_000)


def shown_png(w: Watched, selector: str = "#galaxy") -> bytes:
    """The bytes of the image an <img> currently shows (a blob: URL the page made)."""
    data = w.page.evaluate(
        "async (s) => Array.from(new Uint8Array(await (await fetch(document.querySelector(s).src)).arrayBuffer()))",
        selector)
    return bytes(data)


def code(w: Watched) -> list[float]:
    return json.loads(w.page.input_value("#zvec"))


def sliders(w: Watched) -> dict[int, float]:
    return {int(k): float(v) for k, v in w.page.eval_on_selector_all(
        "#sliders input[type=range]", "els => els.map(e => [e.dataset.dim, e.value])")}


def png_of(model, z: list[float]) -> bytes:
    import torch

    from ray_galaxy.images import png_bytes

    return png_bytes(expected_images(model, torch.tensor([z], dtype=torch.float32))[0])


def click_tile(w: Watched, selector: str, row: int, col: int) -> None:
    """Click the middle of grid tile (row, col) of a figures.grid image, as a person would."""
    box = w.page.locator(selector).bounding_box()
    natural = w.page.eval_on_selector(selector, "e => [e.naturalWidth, e.naturalHeight]")
    x = (PAD + col * (SIZE + PAD) + SIZE / 2) * box["width"] / natural[0]
    y = (PAD + row * (SIZE + PAD) + SIZE / 2) * box["height"] / natural[1]
    w.page.mouse.click(box["x"] + x, box["y"] + y)


def test_page_loads_clean_and_shows_the_decoded_code(watched, server, models):
    open_explorer(watched, server.url + "/")
    page = watched.page
    assert watched.errors == []
    info = requests.get(server.url + "/info", timeout=30).json()
    assert info["samplers"] == ["prior", "gmm"]
    # One slider per latent dimension (latent 4 < the 12 shown by default), most used first.
    assert list(sliders(watched)) == info["dims_by_activity"] and sorted(info["dims_by_activity"]) == [0, 1, 2, 3]
    panel = page.inner_text("#info")
    assert info["name"] in panel and info["version"] in panel and "latent dim" in panel
    assert page.input_value("#sampler") == "gmm"  # the better sampler is picked when there is one
    z = code(watched)
    assert len(z) == 4 and any(v != 0 for v in z)
    png = shown_png(watched)
    assert png == png_of(models.model_a, z)
    assert png == requests.post(server.url + "/decode", json={"z": z}, timeout=30).content
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "explorer.png"), full_page=True)
    assert (ARTIFACTS / "explorer.png").stat().st_size > 10_000


def test_dragging_a_slider_redraws_without_piling_up_requests(watched, server, models):
    open_explorer(watched, server.url + "/")
    before_png, before = shown_png(watched), code(watched)
    dim = next(iter(sliders(watched)))
    box = watched.page.locator(f"#z{dim}").bounding_box()
    y = box["y"] + box["height"] / 2
    watched.decodes = 0
    watched.page.mouse.move(box["x"] + box["width"] * 0.5, y)
    watched.page.mouse.down()
    watched.page.mouse.move(box["x"] + box["width"] * 0.95, y, steps=40)  # 40 input events
    watched.page.mouse.up()
    idle(watched)
    after = code(watched)
    assert after[dim] > 2.5 and after[dim] != before[dim]
    assert [v for i, v in enumerate(after) if i != dim] == [v for i, v in enumerate(before) if i != dim]
    assert sliders(watched)[dim] == pytest.approx(after[dim])
    png = shown_png(watched)
    assert png != before_png
    assert png == png_of(models.model_a, after)  # the image ends on the code the sliders show
    assert 1 <= watched.decodes < 40 and watched.max_inflight == 1
    assert watched.errors == []


def test_random_button_and_tile_clicks_load_codes(watched, server, models):
    from ray_galaxy.generation.latents import slerp
    from serving import seed_latents

    open_explorer(watched, server.url + "/")
    page = watched.page
    start_seed, start = page.input_value("#seed"), code(watched)
    page.click("#random")
    page.wait_for_function(f"document.getElementById('seed').value !== '{start_seed}'")
    idle(watched)
    seed = int(page.input_value("#seed"))
    z = code(watched)
    assert z != start
    latent = requests.get(server.url + "/latent", params={"seed": seed, "sampler": "gmm"}, timeout=30).json()
    assert z == latent["z"]
    assert sliders(watched) == {d: pytest.approx(z[d], abs=0.006) for d in range(4)}
    assert shown_png(watched) == png_of(models.model_a, z)

    # Traversal drawn around the current code: tile (row 1, col 5) sets the two swept dims.
    # The new traversal is held back, so its tiles could only be confused with the first
    # view's (centred on another code) if the page reported itself idle before it came.
    def slow(route):
        time.sleep(0.8)
        route.continue_()

    page.route("**/traverse?*", slow)
    page.click("#draw-trav")
    idle(watched)
    page.unroute("**/traverse?*")
    a, b = int(page.input_value("#dim-a")), int(page.input_value("#dim-b"))
    steps, span = int(page.input_value("#trav-steps")), float(page.input_value("#trav-range"))
    click_tile(watched, "#traverse", 1, 5)
    idle(watched)
    values = np.linspace(-span, span, steps)
    after = code(watched)
    assert after[a] == pytest.approx(values[1]) and after[b] == pytest.approx(values[5])
    assert [v for i, v in enumerate(after) if i not in (a, b)] == [v for i, v in enumerate(z) if i not in (a, b)]
    assert sliders(watched)[a] == pytest.approx(values[1], abs=0.006)
    assert shown_png(watched) == png_of(models.model_a, after)

    # Interpolation strip from A (the first code) to B (current): tile 3 loads slerp's 4th code.
    page.click("#set-b")
    idle(watched)
    click_tile(watched, "#interp", 0, 3)
    idle(watched)
    first = requests.get(server.url + "/latent", params={"seed": 0, "sampler": "gmm"}, timeout=30).json()["z"]
    want = slerp(np.array(first), np.array(after), int(page.input_value("#interp-steps")))[3].numpy()
    np.testing.assert_allclose(code(watched), want, atol=1e-5)

    # Switching to the prior redraws the seed's prior code.
    page.select_option("#sampler", "prior")
    page.wait_for_function("JSON.parse(document.getElementById('zvec').value)[0] !== %r" % code(watched)[0])
    idle(watched)
    np.testing.assert_allclose(code(watched), seed_latents(models, 1, seed, "prior")[0].numpy(), atol=1e-6)
    assert watched.errors == []


def test_page_with_a_token(browser, server, models):
    plain = requests.get(server.auth + "/", headers={"Accept": "text/html"}, timeout=30)
    assert plain.status_code == 401 and "<form" in plain.text  # a page that asks for the token
    bad = requests.get(server.auth + "/", params={"token": "wrong"}, timeout=30, allow_redirects=False)
    assert bad.status_code == 401
    for path in ("/explorer/app.js", "/info", "/latent"):
        assert requests.get(server.auth + path, timeout=30).status_code == 401

    ctx = browser.new_context()
    try:
        w = Watched(ctx.new_page())
        open_explorer(w, server.auth + f"/?token={TOKEN}")
        assert w.page.url == server.auth + "/"  # the token left the address bar
        cookie = next(c for c in ctx.cookies() if c["name"] == "ray_galaxy_token")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert shown_png(w) == png_of(models.model_a, code(w))
        assert w.errors == []
    finally:
        ctx.close()


def latent_queries(w: Watched) -> list[dict[str, str]]:
    """The query of every GET /latent the page makes from now on (filled in as it requests)."""
    seen: list[dict[str, str]] = []
    w.page.on("request", lambda r: seen.append(dict(parse_qsl(urlsplit(r.url).query)))
              if urlsplit(r.url).path.endswith("/latent") else None)
    return seen


def test_class_selector_draws_the_chosen_class(watched, labelled_server):
    """A model fitted with labels: the selector lists its classes, and choosing one redraws the
    seed's code from that class (``label=`` on /latent), as the Generator draws it."""
    gen, page = labelled_server["gen"], watched.page
    seen = latent_queries(watched)
    open_explorer(watched, labelled_server["url"] + "/")
    assert page.eval_on_selector_all("#label option", "els => els.map(e => e.value)") == ["", *CLASSES]
    assert not page.is_disabled("#label") and page.inner_text("#label-note") == ""
    assert "spiral" in page.inner_text("#info")  # the classes row of the model panel
    assert seen and all("label" not in q for q in seen)  # "any class" sends none
    seed, unconditional = int(page.input_value("#seed")), code(watched)
    np.testing.assert_allclose(unconditional, gen.latents(1, seed, "gmm")[0].numpy(), atol=1e-6)
    before = shown_png(watched)

    seen.clear()
    page.select_option("#label", "spiral")
    page.wait_for_function("JSON.parse(document.getElementById('zvec').value)[0] !== %r" % unconditional[0])
    idle(watched)
    assert seen == [{"seed": str(seed), "temperature": "1", "sampler": "gmm", "label": "spiral"}]
    z = code(watched)
    np.testing.assert_allclose(z, gen.latents(1, seed, "gmm", label="spiral")[0].numpy(), atol=1e-6)
    png = shown_png(watched)
    assert png == png_of(gen.model, z) != before

    # The prior has no classes: the selector is switched off and the redraw sends no label.
    seen.clear()
    page.select_option("#sampler", "prior")
    page.wait_for_function("JSON.parse(document.getElementById('zvec').value)[0] !== %r" % z[0])
    idle(watched)
    assert page.is_disabled("#label") and page.inner_text("#label-note") == "classes need the GMM sampler"
    assert seen and all(q["sampler"] == "prior" and "label" not in q for q in seen)
    assert watched.errors == []


def test_class_selector_is_off_for_a_model_without_labels(watched, server):
    seen = latent_queries(watched)
    open_explorer(watched, server.url + "/")
    page = watched.page
    assert page.is_disabled("#label") and page.inner_text("#label-note") == "this model was trained without labels"
    assert page.eval_on_selector_all("#label option", "els => els.map(e => e.value)") == [""]
    assert seen and all("label" not in q for q in seen)
    assert watched.errors == []


def test_model_selector_switches_the_page_to_another_model(watched, multi_server):
    """An endpoint serving several models: the selector lists /models, and choosing one redraws
    the page for it (its sliders, samplers and panel), every request naming it (``model`` in the
    query of GETs and in the JSON of POSTs), every image that model's decoding."""
    gens, page = multi_server["gens"], watched.page
    seen = latent_queries(watched)
    bodies: list[dict] = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data)) if r.method == "POST" else None)
    open_explorer(watched, multi_server["url"] + "/")
    assert page.is_visible("#model-box")
    names = [m["name"] for m in requests.get(multi_server["url"] + "/models", timeout=30).json()["models"]]
    assert names[:2] == ["a", "b"]  # (test_serve_multi.py adds a third at its end)
    assert page.eval_on_selector_all("#model option", "els => els.map(e => e.value)") == names
    assert page.input_value("#model") == "a" and page.input_value("#sampler") == "gmm"
    z = code(watched)
    assert len(z) == 4 and shown_png(watched) == png_of(gens["a"].model, z)
    assert seen and all(q["model"] == "a" for q in seen) and bodies and all(b["model"] == "a" for b in bodies)

    seen.clear()
    bodies.clear()
    page.select_option("#model", "b")
    page.wait_for_function("JSON.parse(document.getElementById('zvec').value).length === 6")
    idle(watched)
    seed, z = int(page.input_value("#seed")), code(watched)
    assert sorted(sliders(watched)) == list(range(6))
    # B has no GMM sampler: the prior is the only one, and the code is the seed's prior draw.
    assert page.eval_on_selector_all("#sampler option", "els => els.map(e => e.value)") == ["prior"]
    np.testing.assert_allclose(z, gens["b"].latents(1, seed, "prior")[0].numpy(), atol=1e-6)
    assert shown_png(watched) == png_of(gens["b"].model, z)
    assert gens["b"].version in page.inner_text("#info")
    assert seen and all(q["model"] == "b" for q in seen)
    assert bodies and all(b["model"] == "b" for b in bodies)  # /decode and /interpolate
    assert watched.errors == []


def test_property_ranges_draw_near_the_training_galaxies_in_them(watched, server, models):
    """Range boxes for size, flux, ellipticity and colour (placeholders: the training range from
    /info); filled in, they become ``where=`` on /latent and the seed's code is the one the
    Generator draws with that selection. A range too narrow shows the server's error; the prior
    sampler switches the boxes off."""
    from ray_galaxy.generation.generator import Generator

    gen, page = Generator.load(models.a), watched.page
    ranges = requests.get(server.url + "/info", timeout=30).json()["properties"]
    seen = latent_queries(watched)
    open_explorer(watched, server.url + "/")
    assert page.is_visible("#where-box")
    for name in ("r50_px", "flux", "ellipticity", "colour"):
        for side, key in (("from", "min"), ("to", "max")):
            shown = page.get_attribute(f"#{side}-{name}", "placeholder")
            assert float(shown) == float(f"{ranges[name][key]:.3g}") and "e" not in shown, (name, side, shown)
    assert seen and all("where" not in q for q in seen)  # empty boxes send none
    seed, before = int(page.input_value("#seed")), code(watched)

    seen.clear()
    median = ranges["r50_px"]["median"]
    page.fill("#from-r50_px", repr(median))
    page.fill("#to-ellipticity", "0.9")
    page.dispatch_event("#to-ellipticity", "change")
    page.wait_for_function("JSON.parse(document.getElementById('zvec').value)[0] !== %r" % before[0])
    idle(watched)
    where = f"r50_px >= {median!r} and ellipticity <= 0.9"
    assert seen[-1] == {"seed": str(seed), "temperature": "1", "sampler": "gmm", "where": where}
    assert page.inner_text("#where-note") == f"where {where}"
    z = code(watched)
    np.testing.assert_allclose(z, gen.latents(1, seed, "gmm", where=where)[0].numpy(), atol=1e-6)
    assert shown_png(watched) == png_of(models.model_a, z)

    page.fill("#from-r50_px", repr(ranges["r50_px"]["max"] + 1))
    page.dispatch_event("#from-r50_px", "change")
    page.wait_for_function("document.getElementById('status').classList.contains('error')")
    assert "fewer than the 20 galaxies a draw needs" in page.inner_text("#status")
    assert code(watched) == z  # the page keeps the last good code

    page.select_option("#sampler", "prior")
    idle(watched)
    assert page.is_disabled("#from-r50_px") and page.inner_text("#where-note") == "property ranges need the GMM sampler"
    assert seen[-1]["sampler"] == "prior" and "where" not in seen[-1]
    assert [e for e in watched.errors if "422" not in e] == []  # the browser logs the 422 itself
