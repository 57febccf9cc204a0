"""The status page: ``/ui/`` on the token API's listener, for people.

Server-rendered HTML (Jinja2 templates), one stylesheet and one small script,
all shipped in this package. Sign-in with an API key gives a signed session
cookie (``session.py``); ``guard.py`` checks it, the CSRF token of every form
and sets the security headers; ``pages.py`` renders, ``actions.py`` acts
through the running daemon's services (the same operations as the API).
"""

from qbo_daemon.http.ui.app import make_ui_app

__all__ = ["make_ui_app"]
