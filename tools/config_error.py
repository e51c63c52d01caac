"""The one error make_checkpoint.py and its per-family modules raise for a config they cannot turn into a checkpoint,
so that the command line reports every such config as one `error:` line whichever family refused it."""


class ConfigError(ValueError):
    """A config the tool cannot turn into a checkpoint; the message names the config and the fix."""
