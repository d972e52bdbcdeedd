"""[pages]: an operator's templates before the built-in ones, the colours and the logo, in process
over the whole tree; and once in a real Chromium, which must apply them under the site's
Content-Security-Policy (the colours' <style> by its hash, the logo by its origin)."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import threading
import tomllib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from twisted.logger import capturedLogs

from bearerbridge import config
from bearerbridge.config import Config, ConfigError, PagesSettings, ServerSettings
from bearerbridge.storage.models import Client
from bearerbridge.web.site import SECURITY_HEADERS, Pages
from bearerbridge.web.theme import allow

from ..fakes import Bridge, cheap_password_hash, sqlite_store
from ..support import Service, authorize_url, pkce_pair

CB = "https://app.example/cb"
SITE_POLICY = SECURITY_HEADERS[b"Content-Security-Policy"].decode()
EXAMPLE = Path(__file__).parent.parent.parent / "conf" / "bearerbridge.toml"
THEME = PagesSettings(accent_colour="#0f766e", background_colour="darkslategray", text_colour="#222")


@pytest.fixture
def store(tmp_path):
    store = sqlite_store(tmp_path / "x.db")
    with store.transaction():
        store.add_client(Client("web", "Web <App>", (CB,), "imap", ("authorization_code",), public=False), "s")
        store.add_user("alice", "alice@example.org", cheap_password_hash("pw"))
    yield store
    store.engine.dispose()


def site(store, pages: PagesSettings | None = None, site_name: str = "Mail of Example") -> Bridge:
    return Bridge.over(store, Config(server=ServerSettings(site_name=site_name), pages=pages or PagesSettings()))


def templates(tmp_path: Path, **files: str) -> str:
    """A templates directory holding `files` (name = text; `_` for `.`)."""
    directory = tmp_path / "templates"
    directory.mkdir(exist_ok=True)
    for name, text in files.items():
        (directory / name.replace("_", ".")).write_text(text)
    return str(directory)


def login_page(bridge: Bridge) -> str:
    _, challenge = pkce_pair()
    answer = bridge.browser().get(authorize_url("", "web", CB, challenge, "imap"))
    assert answer.code == 200, answer.body[:300]
    return answer.body.decode()


# -- the built-in look, unchanged without [pages] ---------------------------------------------------------------

def test_without_pages_the_pages_and_their_policy_are_as_before(store):
    answer = site(store).browser().get("/")
    page = answer.body.decode()
    assert answer.header("Content-Security-Policy") == SITE_POLICY
    assert "<style" not in page and 'class="accent"' not in page and "<img" not in page
    assert "<h1>Mail of Example</h1>" in page and '<link rel="stylesheet" href="/static/style.css">' in page


def test_the_stylesheet_falls_back_to_the_built_in_colours():
    css = (Path(__file__).parent.parent.parent / "src/bearerbridge/web/static/style.css").read_text()
    assert "background: var(--background, #f5f5f4); color: var(--text, #1c1917);" in css
    # Accent rules apply only under <html class="accent">: without it, the browser's own buttons.
    assert all(line.startswith(".accent ") for line in css.splitlines() if "var(--accent" in line)


def test_the_documented_example_names_every_pages_key_with_its_default():
    documented = tomllib.loads(EXAMPLE.read_text())["pages"]
    assert set(documented) == set(PagesSettings.__dataclass_fields__)
    assert config.parse({"pages": documented}).pages == PagesSettings()


# -- an operator's templates ------------------------------------------------------------------------------------

def test_an_operators_login_html_replaces_the_built_in_one_and_autoescapes(store, tmp_path):
    own = templates(tmp_path, login_html='{% extends "base.html" %}{% block content %}'
                                         '<p id="staff">Staff sign-in for {{ client_name }}</p>'
                                         '<form method="post" action="{{ action }}"></form>{% endblock %}')
    page = login_page(site(store, PagesSettings(templates=own)))
    assert '<p id="staff">Staff sign-in for Web &lt;App&gt;</p>' in page
    assert 'id="sign-in"' not in page and "<h1>Mail of Example</h1>" in page  # the built-in base.html still


def test_an_operators_template_may_extend_the_built_in_one_it_replaces(store, tmp_path):
    own = templates(tmp_path, login_html='{% extends "builtin/login.html" %}{% block content %}'
                                         '<p id="notice">Use your staff account.</p>{{ super() }}{% endblock %}')
    page = login_page(site(store, PagesSettings(templates=own)))
    assert page.index('id="notice"') < page.index('id="sign-in"')


def test_an_operators_base_html_extending_nothing_frames_every_page(store, tmp_path):
    own = templates(tmp_path, base_html='<!doctype html><title>{{ site_name }}</title>\n'
                                        '<div id="frame">{% block content %}{% endblock %}</div>\n')
    bridge = site(store, PagesSettings(templates=own))
    for page in (bridge.browser().get("/").body.decode(), login_page(bridge),
                 bridge.browser().get("/nothing-here").body.decode()):
        assert page.startswith("<!doctype html><title>Mail of Example</title>\n<div id=\"frame\">"), page[:200]
        assert "/static/style.css" not in page


def test_a_mistake_in_an_operators_template_stops_the_start_naming_file_and_line(tmp_path):
    own = templates(tmp_path, consent_html="{% extends 'base.html' %}\n{% block content %}\n{{ oops( }}\n")
    with pytest.raises(ConfigError, match=r"^\[pages\] templates: .*consent\.html, line 3: "):
        Pages("x", PagesSettings(templates=own))


def test_a_template_failing_as_it_renders_is_logged_and_the_built_in_one_answers(store, tmp_path):
    own = templates(tmp_path, error_html='{% extends "base.html" %}{% block content %}{{ no.such.thing }}'
                                         '{% endblock %}')
    with capturedLogs() as events:
        answer = site(store, PagesSettings(templates=own)).browser().get("/nothing-here")
    assert answer.code == 404 and b"There is no page at this address." in answer.body
    assert [e["name"] for e in events if "of [pages] templates failed" in e["log_format"]] == ["error.html"]


# -- colours and logo -------------------------------------------------------------------------------------------

def test_the_colours_reach_base_html_and_the_policy_allows_that_style_element_alone(store):
    bridge = site(store, THEME)
    answer = bridge.browser().get("/")
    page = answer.body.decode()
    style = re.search(r"<style>(.*?)</style>", page, re.S)
    assert style and style[1] == ":root{--accent:#0f766e;--background:darkslategray;--text:#222}"
    assert '<html lang="en" class="accent">' in page
    digest = base64.b64encode(hashlib.sha256(style[1].encode()).digest()).decode()
    assert answer.header("Content-Security-Policy") == f"{SITE_POLICY}; style-src 'self' 'sha256-{digest}'"
    assert bridge.browser().get("/healthz").header("Content-Security-Policy") == SITE_POLICY  # not a page


def test_colours_without_an_accent_leave_the_buttons_alone(store):
    page = site(store, PagesSettings(background_colour="#fff")).browser().get("/").body.decode()
    assert "<style>:root{--background:#fff}</style>" in page and 'class="accent"' not in page


@pytest.mark.parametrize("logo, policy", [
    ("https://cdn.example.org/brand/logo.svg", "; img-src 'self' https://cdn.example.org"),
    ("/brand/logo.svg", ""),  # this host's: 'self' allows it
])
def test_the_logo_stands_in_the_header_for_the_site_name(store, logo, policy):
    answer = site(store, PagesSettings(logo=logo), site_name="Mail & Co").browser().get("/")
    assert f'<h1><img class="logo" src="{logo}" alt="Mail &amp; Co"></h1>' in answer.body.decode()
    assert answer.header("Content-Security-Policy") == SITE_POLICY + policy


def test_a_source_joins_the_directive_the_site_policy_has_or_one_from_its_default_src():
    assert allow("default-src 'self'; img-src 'self' https:", "img-src", "https://cdn.example.org") \
        == "default-src 'self'; img-src 'self' https: https://cdn.example.org"
    assert allow("default-src 'none'; base-uri 'none'", "style-src", "'sha256-x'") \
        == "default-src 'none'; base-uri 'none'; style-src 'sha256-x'"


# -- refusals ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ("accent_colour = 'red;}body{background:url(//x)'", "[pages] accent_colour: 'red;}body"),
    ("text_colour = 'blurple'", "[pages] text_colour: 'blurple' is not a CSS colour: use #rgb, #rrggbb or a name"),
    ("background_colour = '#12'", "[pages] background_colour: '#12' is not a CSS colour"),
    ("background_colour = 'rgb(0,0,0)'", "[pages] background_colour: 'rgb(0,0,0)' is not a CSS colour"),
    ("accent_colour = 3", "[pages] accent_colour: expected a non-empty string"),
    ("logo = 'javascript:alert(1)'", "[pages] logo: expected a path on this host (/...) or an https URL"),
    ("logo = '//cdn.example.org/logo.png'", "[pages] logo: expected a path on this host"),
    ("logo = 'https://me@cdn.example.org/logo.png'", "[pages] logo: expected a path on this host"),
    ("logo = 'https://cdn.example.org/a logo.png'", "[pages] logo: 'https://cdn.example.org/a logo.png' has spaces"),
    ("logo = 'http://cdn.example.org/logo.png'", "[pages] logo: plain http is allowed only on loopback"),
    ("templates = 'no-such-dir'", "[pages] templates: {tmp}/no-such-dir is not a directory"),
    ("colour = 'red'", "[pages] colour: unknown key"),
])
def test_bad_pages_settings_are_refused_naming_the_key(tmp_path, text, message):
    path = tmp_path / "c.toml"
    path.write_text(f"[pages]\n{text}\n")
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    assert message.replace("{tmp}", str(tmp_path)) in str(caught.value)


def test_the_templates_directory_is_relative_to_the_config_file(tmp_path, monkeypatch):
    (tmp_path / "etc" / "look").mkdir(parents=True)
    (tmp_path / "etc" / "c.toml").write_text("[pages]\ntemplates = 'look'\naccent_colour = 'Teal'\n")
    monkeypatch.chdir(tmp_path)
    loaded = config.load("etc/c.toml").pages
    assert loaded == PagesSettings(templates=str(tmp_path / "etc" / "look"), accent_colour="Teal")


# -- in Chromium ------------------------------------------------------------------------------------------------

LOGO = (b'<svg xmlns="http://www.w3.org/2000/svg" width="240" height="48" viewBox="0 0 240 48">'
        b'<rect width="48" height="48" rx="10" fill="#0f766e"/><circle cx="24" cy="24" r="10" fill="#fff"/>'
        b'<text x="60" y="32" font-family="sans-serif" font-size="22" fill="#0f172a">Example Mail</text></svg>')


class LogoServer:
    """Another origin on loopback serving the logo (an image the policy must allow by its origin)."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                self.send_response(200 if self.path == "/logo.svg" else 404)
                self.send_header("Content-Type", "image/svg+xml")
                self.send_header("Content-Length", str(len(LOGO)))
                self.end_headers()
                self.wfile.write(LOGO)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/logo.svg"
        threading.Thread(target=self.server.serve_forever, name="logo", daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_chromium_applies_the_override_colours_and_logo_under_the_sites_policy(tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait  # here: only this test needs selenium

    from ..test_browser import WAIT, start_chromium

    shots = Path(os.environ.get("BEARERBRIDGE_SCREENSHOTS") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    own = templates(tmp_path, login_html='{% extends "builtin/login.html" %}{% block content %}'
                                         '<p id="notice">Use your staff account.</p>{{ super() }}{% endblock %}')
    logo = LogoServer()
    service = Service.start(tmp_path, extra=f'[pages]\ntemplates = "{own}"\nlogo = "{logo.url}"\n'
                                            'accent_colour = "#0f766e"\nbackground_colour = "#e2e8f0"\n'
                                            'text_colour = "#0f172a"\n')
    driver = start_chromium(tmp_path)
    try:
        client = service.client("--redirect-uri", CB, "--scope", "imap smtp")
        _, challenge = pkce_pair()
        driver.get(authorize_url(service.url, client["client_id"], CB, challenge, "imap smtp"))
        assert driver.find_element("id", "notice").text == "Use your staff account."
        look = driver.execute_script("""
            const style = (selector, property) => getComputedStyle(document.querySelector(selector))[property];
            const logo = document.querySelector('h1 img');
            return {page: style('body', 'backgroundColor'), text: style('main', 'color'),
                    button: style('#sign-in', 'backgroundColor'), edge: style('main', 'borderTopColor'),
                    logo: logo.complete && logo.naturalWidth, alt: logo.alt};""")
        assert look == {"page": "rgb(226, 232, 240)", "text": "rgb(15, 23, 42)", "button": "rgb(15, 118, 110)",
                        "edge": "rgb(15, 118, 110)", "logo": 240, "alt": "bearerbridge"}
        for width, height in ((1280, 900), (390, 844)):
            driver.set_window_size(width, height)
            assert driver.save_screenshot(str(shots / f"login-{width}.png"))

        username, password = service.user()
        driver.find_element("id", "username").send_keys(username)
        driver.find_element("id", "password").send_keys(password)
        driver.find_element("id", "sign-in").click()
        deny = WebDriverWait(driver, WAIT).until(lambda d: d.find_element("id", "deny"))  # the accent on white
        assert (deny.value_of_css_property("color"), deny.value_of_css_property("background-color")) \
            == ("rgba(15, 118, 110, 1)", "rgba(255, 255, 255, 1)")
        assert driver.save_screenshot(str(shots / "consent-390.png"))
    finally:
        driver.quit()
        service.stop()
        logo.close()
