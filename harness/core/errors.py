"""Errors a user can cause: reported as one line naming the problem and the fix, exit status 2."""

from __future__ import annotations

import re

# user:password@ in a URL (tracking URIs, Optuna storage URLs): the password never reaches a terminal.
_URL_PASSWORD = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]+)@")
_PASSWORD_PARAM = re.compile(r"(?i)\b(password|passwd|pwd)=([^&\s;]+)")


def redact(text: object) -> str:
    """``text`` with the password of every URL (and ``password=`` parameters) replaced by ***."""
    s = _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:***@", str(text))
    return _PASSWORD_PARAM.sub(lambda m: f"{m[1]}=***", s)


def one_line(text: object, limit: int = 300) -> str:
    """Whitespace (newlines of driver messages included) collapsed, passwords masked, length bounded."""
    s = " ".join(redact(text).split())
    return s if len(s) <= limit else s[: limit - 1] + "…"


class UserError(Exception):
    """A problem with the user's input (config, CLI arguments, data files, paths)."""

    def __init__(self, problem: str, fix: str = "") -> None:
        super().__init__(problem)
        self.problem = problem
        self.fix = fix

    def line(self) -> str:
        """Always exactly one line, whatever the problem text holds (a driver's multi-line message)."""
        return "error: " + one_line(self.problem, 600) + (f" — {one_line(self.fix, 400)}" if self.fix else "")
