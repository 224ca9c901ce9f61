"""RuleError: what a user sees when a rule cannot be traced, checked or compiled."""
from __future__ import annotations


class RuleError(Exception):
    """A rule is malformed or cannot be placed where it was asked to run.

    The message names the rule and its source location, then says what was
    expected, what was found, and how to fix it.
    """

    def __init__(self, rule: str, where: str, expected: str, got: str, fix: str):
        self.rule, self.where, self.expected, self.got, self.fix = rule, where, expected, got, fix
        super().__init__(
            f"rule '{rule}' ({where}): expected {expected}; got {got}. Fix: {fix}"
        )
