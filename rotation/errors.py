"""Rotor's errors. Each message is one line a person can act on, and never holds a secret."""

from __future__ import annotations


class RotorError(Exception):
    """Base of every error Rotor reports to a person."""


class ConfigError(RotorError):
    """rotor.yml or the environment is invalid."""


class UnknownName(RotorError):
    """An app, environment, user or rotation that the catalogue or state does not know."""


class InvalidIdentifier(RotorError):
    """A name that is unsafe to use as a database identifier or account name."""


class SecretError(RotorError):
    """A secret is missing, unreadable, or not the JSON shape Rotor expects."""


class DatabaseError(RotorError):
    """A database refused a login or a statement."""


class DatabaseUnreachable(DatabaseError):
    """The database server did not answer: wrong host or port, or no route from here."""


class KubeError(RotorError):
    """The Kubernetes API refused a request or reported a failed sync or rollout."""


class AwsError(RotorError):
    """An AWS API call failed in a way Rotor cannot work around."""


class StepFailed(RotorError):
    """A step found a condition it cannot fix; the rotation stops there."""


class RotationConflict(RotorError):
    """The app and environment already have an active rotation."""


class NotAllowed(RotorError):
    """The person may not do that (start, approve, or approve their own rotation)."""


class LeaseLost(RotorError):
    """Another worker took the rotation over; this one stopped without acting."""


class InvalidTransition(RotorError):
    """The rotation or step is not in a state that allows the operation."""


class NoticePending(Exception):
    """The 2nd line notice is asked for and not posted yet: the Slack side posts it."""
