"""The one error type of configuration problems (a leaf module: every layer may raise it)."""


class ConfigError(ValueError):
    """A configuration problem; the message is one line that names the field and the fix."""
