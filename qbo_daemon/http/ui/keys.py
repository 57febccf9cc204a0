"""Typed keys of the status page's application and request state."""

from __future__ import annotations

import jinja2
from aiohttp import web

from qbo_daemon.engine.services import Services
from qbo_daemon.http.ui.session import Session
from qbo_daemon.http.ui.static import StaticFiles
from qbo_daemon.http.ui.throttle import SignInThrottle

SERVICES = web.AppKey("ui_services", Services)
TEMPLATES = web.AppKey("ui_templates", jinja2.Environment)
STATIC = web.AppKey("ui_static", StaticFiles)
THROTTLE = web.AppKey("ui_throttle", SignInThrottle)
SESSION = web.RequestKey("ui_session", Session)
