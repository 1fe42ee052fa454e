"""CURVE keys for sockets that leave this machine (pyzmq's ``zmq.auth``).

``scopecast keys DIR`` writes one server and one client certificate pair. The server loads
``server.key_secret`` and admits only clients whose public key is in ``DIR/authorized``; a
client (hook, viewer, status) loads ``client.key_secret`` and the server's public key.
Copy the folder (or just the files each side needs) to the machines that take part.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from calibration.errors import ScopecastError

log = logging.getLogger(__name__)


class KeysError(ScopecastError, ValueError):
    """A key folder that is missing or incomplete."""


SECRET_MODE = 0o600  # *.key_secret: the owner only
FOLDER_MODE = 0o700  # a key folder scopecast creates: the owner only
PUBLIC_MODE = 0o644


def generate_keys(directory: Path) -> list[Path]:
    """Create server and client certificates in ``directory``; refuse to overwrite existing ones.

    Secret keys are written readable by their owner only (0600), never briefly world-readable;
    folders this creates are 0700. Public keys stay readable (0644)."""
    directory = Path(directory)
    existing = [
        p for p in ("server.key", "client.key", "server.key_secret", "client.key_secret")
        if (directory / p).exists()
    ]  # fmt: skip
    if existing:
        raise KeysError(
            f"{directory} already holds {', '.join(existing)}: keep those (clients depend on "
            "them) or choose an empty folder"
        )
    created = not directory.exists()
    umask = os.umask(0o077)  # files are born 0600 and folders 0700: no readable moment
    try:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "authorized").mkdir(exist_ok=True)
        files = []
        for name in ("server", "client"):
            public, secret = zmq.auth.create_certificates(directory, name)
            files += [Path(public), Path(secret)]
        shutil.copy(directory / "client.key", directory / "authorized" / "client.key")
        files.append(directory / "authorized" / "client.key")
    finally:
        os.umask(umask)
    for f in files:
        os.chmod(f, SECRET_MODE if f.name.endswith(".key_secret") else PUBLIC_MODE)
    if created:
        os.chmod(directory, FOLDER_MODE)
    return files


def _load(path: Path, *, secret: bool) -> tuple[bytes, bytes | None]:
    if not path.exists():
        raise KeysError(f"{path} not found: create keys with `scopecast keys {path.parent}`")
    if secret and os.name == "posix" and path.stat().st_mode & 0o077:
        log.warning(
            "%s is readable by other users: `chmod 600 %s` (a secret key must stay private)",
            path, path,
        )  # fmt: skip
    public, secret_key = zmq.auth.load_certificate(path)
    if secret and secret_key is None:
        raise KeysError(f"{path} holds no secret key: pass the *.key_secret file's folder")
    return public, secret_key


@dataclass(frozen=True)
class Curve:
    """The key folder of one deployment; applies server or client keys to sockets."""

    directory: Path

    def server(self, sock: zmq.Socket) -> None:
        public, secret = _load(self.directory / "server.key_secret", secret=True)
        sock.curve_publickey, sock.curve_secretkey = public, secret
        sock.curve_server = True

    def client(self, sock: zmq.Socket) -> None:
        public, secret = _load(self.directory / "client.key_secret", secret=True)
        server_public, _ = _load(self.directory / "server.key", secret=False)
        sock.curve_publickey, sock.curve_secretkey = public, secret
        sock.curve_serverkey = server_public

    def authenticator(self, context: zmq.Context) -> ThreadAuthenticator:
        """Start the ZAP handler that admits the public keys in ``directory/authorized``."""
        authorized = self.directory / "authorized"
        if not authorized.is_dir():
            raise KeysError(f"{authorized} not found: create keys with `scopecast keys DIR`")
        auth = ThreadAuthenticator(context)
        auth.start()
        auth.configure_curve(domain="*", location=str(authorized))
        return auth


def curve_or_none(directory: Path | str | None) -> Curve | None:
    return Curve(Path(directory)) if directory else None
