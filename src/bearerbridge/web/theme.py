"""The operator's look of the pages (`[pages]`): their templates before the built-in ones, and
the colours and logo, brought to base.html in a way the site's Content-Security-Policy allows.

The colours become CSS custom properties (`--accent`, `--background`, `--text`) in one inline
`<style>` element, which static/style.css reads with the built-in look as the fallback. The
site's policy (`default-src 'self'`) refuses inline styles, so the pages that carry one name
its SHA-256 in `style-src` (CSP Level 3 §8.4): that element and no other. A logo from another
origin is allowed by its origin in `img-src`. Without `[pages]` the policy is the site's own.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

from jinja2 import BaseLoader, ChoiceLoader, FileSystemLoader, PackageLoader, PrefixLoader
from markupsafe import Markup

from bearerbridge.config import PAGES_COLOURS, PagesSettings, is_css_colour, logo_origin

# The custom property of each [pages] colour, as static/style.css reads it.
PROPERTIES = dict(zip(PAGES_COLOURS, ("--accent", "--background", "--text"), strict=True))


def builtin_loader() -> BaseLoader:
    return PackageLoader("bearerbridge.web", "templates")


def loader(settings: PagesSettings) -> BaseLoader:
    """The operator's templates directory first, then the built-in templates, which are also
    `builtin/NAME`: an operator's login.html may extend "builtin/login.html" and replace one block."""
    builtin = builtin_loader()
    operators = [FileSystemLoader(settings.templates)] if settings.templates else []
    return ChoiceLoader([*operators, builtin, PrefixLoader({"builtin": builtin})])


@dataclass(frozen=True)
class Theme:
    """What base.html needs of `[pages]`, and the policy the pages are sent with."""

    style: Markup   # the <style> element setting the colours' custom properties; empty without colours
    accent: bool    # whether an accent colour is set: base.html marks <html class="accent"> for style.css
    logo: str
    policy: bytes   # the pages' Content-Security-Policy

    @classmethod
    def of(cls, settings: PagesSettings, site_policy: bytes) -> Theme:
        """The theme of `settings`; `site_policy` is the Content-Security-Policy of every other answer."""
        declarations = []
        for key, prop in PROPERTIES.items():
            value = getattr(settings, key)
            if value:
                if not is_css_colour(value):  # config.py refuses these; this keeps the <style> safe without it
                    raise ValueError(f"[pages] {key}: {value!r} is not a CSS colour")
                declarations.append(f"{prop}:{value}")
        policy = site_policy.decode()
        style = Markup("")
        if declarations:
            css = ":root{" + ";".join(declarations) + "}"
            digest = base64.b64encode(hashlib.sha256(css.encode()).digest()).decode()
            policy = allow(policy, "style-src", f"'sha256-{digest}'")
            style = Markup(f"<style>{css}</style>")  # only #hex digits and colour names
        origin = logo_origin(settings.logo)
        if origin:
            policy = allow(policy, "img-src", origin)
        return cls(style, bool(settings.accent_colour), settings.logo, policy.encode())


def allow(policy: str, directive: str, source: str) -> str:
    """`policy` with `source` added to `directive`; a directive it lacks starts from default-src's
    sources, which it stood for (a second directive of a name would be ignored: CSP3 §2.2.1)."""
    directives = [d.strip() for d in policy.split(";") if d.strip()]
    names = [d.split()[0].lower() for d in directives]
    if directive in names:
        directives[names.index(directive)] += f" {source}"
    else:
        default = directives[names.index("default-src")].split()[1:] if "default-src" in names else []
        directives.append(" ".join([directive, *(s for s in default if s != "'none'"), source]))
    return "; ".join(directives)
