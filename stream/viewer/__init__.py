"""The live web viewer: raw and enhanced frames side by side in a browser, with the server's
numbers (``scopecast view``; ``scopecast demo --view``).

``server`` serves the page and pushes frames over WebSocket, ``latest`` holds the newest frame
of each topic and decides what each browser is sent, ``access`` checks tokens and hosts,
``process`` runs the viewer in a child process, ``static/`` is the page (plain JS, no build).
"""

from .process import ViewerProcess
from .server import Viewer, ViewerConfig, ViewerError, serve

__all__ = ["Viewer", "ViewerConfig", "ViewerError", "ViewerProcess", "serve"]
