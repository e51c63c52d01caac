"""Error types that the CLI turns into one-line messages.

Every failure a user can cause (a bad checkpoint, a damaged artifact, a prompt that does not fit) raises
an `EdgeRuntimeError` whose message says what was wrong, where, and what to do. Anything else escaping is
a bug in edge-runtime, and the CLI lets its traceback through so that it gets reported.
"""


class EdgeRuntimeError(Exception):
    """A problem with the user's input or files, explained in the message."""


class UnsupportedConfigError(EdgeRuntimeError):
    """The checkpoint's config uses a feature this runtime does not implement."""


class CheckpointError(EdgeRuntimeError):
    """The checkpoint directory is missing files or holds tensors that do not match its config."""


class ArtifactError(EdgeRuntimeError):
    """The artifact directory is missing, damaged, or of a format version this runtime cannot read."""


class InvalidTextError(EdgeRuntimeError):
    """Text that is not Unicode: bytes that are not UTF-8, or a string holding a lone surrogate."""


class ContextLengthError(EdgeRuntimeError):
    """A prompt longer than the context the model was loaded with (OpenAI's context_length_exceeded)."""


class RequestError(EdgeRuntimeError):
    """A request the model cannot honour as given: an unknown tool, a schema the grammar engine cannot compile, a
    tool message answering no call. `param` names the field as OpenAI's error object does
    ("tools[1].function.parameters"), so that the server's 400 points at it and an SDK caller can too."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class UnwritableError(EdgeRuntimeError):
    """A file or directory edge-runtime must write could not be written (permissions, read-only, full disk)."""

    def __init__(self, message: str, path: str, reason: str) -> None:
        super().__init__(message)
        self.path, self.reason = path, reason
