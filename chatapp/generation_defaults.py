"""The defaults of a reply, in one place: the sampling settings and the reply length.

Read by every path that makes a reply: the CLI's flags (`deltatalk run` / `chat --plain`),
the TUI's config fallback and chat-settings dialog (`chatapp.config`), `deltatalk serve`
(a request without sampling fields) and the remote CLI. The sampling values themselves are
`engine.sampling.SamplingSettings`' field defaults (the engine's own, so a library caller
gets the same); the reply length is the app's choice and lives here.

`deltatalk serve` is the one exception for the length: a request without `max_tokens` runs
until the context is full, as the OpenAI API specifies.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.sampling import SamplingSettings


@dataclass(frozen=True)
class GenerationDefaults:
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    max_tokens: int = 1024          # tokens in one reply, unless the user or the chat says otherwise

    def sampling_settings(self) -> SamplingSettings:
        """A fresh, mutable copy of the default sampling settings."""
        return SamplingSettings(**self.sampling.to_dict())


GENERATION_DEFAULTS = GenerationDefaults()
