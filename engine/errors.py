"""The engine's exception types: every user-facing failure is one of these."""


class DeltatalkError(Exception):
    """Base class of every error the engine raises on purpose."""


class ModelFileError(DeltatalkError):
    """A model file that cannot be used: corrupt, truncated, or of an unsupported kind.

    The message names the file, the problem, and what is supported.
    """

    def __init__(self, path, problem: str, supported: str | None = None):
        self.path = str(path)
        self.problem = problem
        self.supported = supported
        msg = f"{self.path}: {problem}"
        if supported:
            msg += f" (supported: {supported})"
        super().__init__(msg)


class UnsupportedQuantError(DeltatalkError):
    """A tensor whose ggml type has no kernel here."""


class TemplateError(DeltatalkError):
    """The model's chat template failed to render."""


class ContextOverflowError(DeltatalkError):
    """A prompt longer than the context window."""


class StateMismatchError(DeltatalkError):
    """A saved chat state that belongs to another model file (or is damaged)."""


class InvalidSettingError(DeltatalkError, ValueError):
    """A setting outside what the engine or this model allows (context size, sampling values).

    Also a ValueError: callers that check settings catch that."""


class PromptError(DeltatalkError):
    """A prompt that cannot be run: empty (after the template), or with ids outside the vocabulary."""


class ModelOutputError(DeltatalkError):
    """Logits that cannot be sampled: no finite value left (NaN/inf from damaged weights)."""
