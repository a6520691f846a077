"""Exceptions for a user's mistakes; each message is one sentence with the fix."""


class PvlabError(Exception):
    """A failure the user can act on; printed as one line, exit status non-zero."""

    exit_code = 1


class SettingsError(PvlabError):
    """pvlab.yml, a PVLAB_* variable or a flag has a bad value."""


class HostError(PvlabError):
    """The host lacks something pvlab needs (a package, a daemon, a device)."""


class VmError(PvlabError):
    """The dom0 VM is missing, not running or not provisioned."""


class ImageError(PvlabError):
    """A boot volume or kernel that PV-GRUB or EC2 would not boot."""


class UserDataError(PvlabError):
    """User-data that EC2 would refuse."""


class DomainError(PvlabError):
    """A guest domain could not be created, found or removed."""
