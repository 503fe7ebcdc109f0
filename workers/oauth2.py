"""OAuth 2.0 access tokens for XOAUTH2 at the relay, read from a file or a command, refreshed.

``TokenSource(file=PATH)`` reads the token from a file (a token refresher
such as an oauth2-proxy sidecar or a cron job keeps it current): the file is
read again whenever it changed (size or modification time) and after
``invalidate()``.  ``TokenSource(command=CMD)`` runs ``/bin/sh -c CMD``
(for example ``gcloud auth print-access-token`` or a script that asks
Microsoft Entra for a token) and keeps its output until it expires: the
``expires_in`` of a JSON answer minus a minute, or ``lifetime`` seconds
(default 300) for a bare token, or until ``invalidate()`` (called when the
server refuses the token, so a revoked token costs one failed AUTH).

Either source may give the bare token (surrounding blanks and a final
newline are ignored) or a JSON object with ``access_token`` (or
``accessToken``, ``token``) and optionally ``expires_in`` (seconds).

The token stays in this process's memory: it is never logged (``repr``
shows the source, not the token), never put in Redis, task arguments or
results.  Errors say what failed (missing file, exit status) without the
command's output, which might hold a secret.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from typing import Callable

__all__ = ["TokenSource", "TokenError"]

#: Seconds a command's bare token is used before the command runs again.
DEFAULT_LIFETIME = 300.0
#: Seconds a command may take.
COMMAND_TIMEOUT = 30.0


class TokenError(Exception):
    """No token could be had (the file is missing or empty, the command failed)."""


class TokenSource:
    """A refreshable OAuth 2.0 access token (see the module docstring); thread-safe."""

    def __init__(self, *, file: str | None = None, command: str | None = None,
                 lifetime: float = DEFAULT_LIFETIME, clock: Callable[[], float] = time.monotonic):
        if (file is None) == (command is None):
            raise ValueError("a TokenSource needs exactly one of file= and command=")
        self.file = file
        self.command = command
        self.lifetime = lifetime
        self.clock = clock
        self._lock = threading.Lock()
        self._token: str | None = None
        self._valid_until = 0.0
        self._stamp: tuple | None = None        # (size, mtime_ns) of the file the token came from
        self.refreshes = 0                      # how many times the token was (re)read: for tests and metrics

    def __repr__(self) -> str:
        what = f"file={self.file!r}" if self.file is not None else f"command={self.command!r}"
        return f"TokenSource({what})"

    def get(self) -> str:
        """The current token (read or fetched again when stale); raises ``TokenError``."""
        with self._lock:
            if self.file is not None:
                try:
                    st = os.stat(self.file)
                except OSError as e:
                    raise TokenError(f"cannot read the token file {self.file}: {e.strerror or e}") from None
                stamp = (st.st_size, st.st_mtime_ns)
                if self._token is None or stamp != self._stamp:
                    try:
                        with open(self.file, encoding="utf-8") as f:
                            text = f.read()
                    except (OSError, UnicodeDecodeError) as e:
                        raise TokenError(f"cannot read the token file {self.file}: {e}") from None
                    self._token, _ = _parse(text, f"the token file {self.file}")
                    self._stamp = stamp
                    self.refreshes += 1
                return self._token
            if self._token is None or self.clock() >= self._valid_until:
                token, expires_in = _parse(self._run(), "the token command")
                lifetime = self.lifetime if expires_in is None else max(30.0, expires_in - 60.0)
                self._token, self._valid_until = token, self.clock() + lifetime
                self.refreshes += 1
            return self._token

    def invalidate(self) -> None:
        """Forget the token: the next ``get`` reads the file or runs the command again."""
        with self._lock:
            self._token = None
            self._stamp = None

    def _run(self) -> str:
        try:
            p = subprocess.run(["/bin/sh", "-c", self.command], stdin=subprocess.DEVNULL, capture_output=True,
                               timeout=COMMAND_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise TokenError(f"the token command did not finish in {COMMAND_TIMEOUT:g} s") from None
        except OSError as e:
            raise TokenError(f"cannot run the token command: {e}") from None
        if p.returncode != 0:
            raise TokenError(f"the token command failed (exit status {p.returncode})")
        try:
            return p.stdout.decode("utf-8")
        except UnicodeDecodeError:
            raise TokenError("the token command printed something that is not UTF-8 text") from None


def _parse(text: str, what: str) -> tuple[str, float | None]:
    """``(token, expires_in or None)`` from a bare token or a JSON object."""
    text = text.strip()
    expires = None
    if text.startswith("{"):
        try:
            d = json.loads(text)
        except ValueError:
            raise TokenError(f"{what} gave malformed JSON") from None
        token = d.get("access_token") or d.get("accessToken") or d.get("token") if isinstance(d, dict) else None
        if not isinstance(token, str):
            raise TokenError(f"{what} gave JSON without access_token")
        try:
            expires = float(d["expires_in"]) if d.get("expires_in") is not None else None
        except (TypeError, ValueError):
            expires = None
        text = token.strip()
    else:
        text = text.splitlines()[0].strip() if text else ""
    if not text or any(c.isspace() or not c.isprintable() for c in text):
        raise TokenError(f"{what} gave no usable token")
    return text, expires
