"""Errors a user can cause: reported as one line naming the problem and the fix, exit status 2."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input (config, CLI arguments, data files, paths)."""

    def __init__(self, problem: str, fix: str = "") -> None:
        super().__init__(problem)
        self.problem = problem
        self.fix = fix

    def line(self) -> str:
        return f"error: {self.problem}" + (f" — {self.fix}" if self.fix else "")
