"""Open a GGUF file and build everything needed to chat with it."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from engine.chat_template import ChatTemplate, fallback_for
from engine.errors import InvalidSettingError, ModelFileError
from engine.gguf_file import GGUFFile
from engine.models import model_module
from engine.models.base import BaseModel
from engine.tokenizer import Tokenizer


# The context window. The engine refuses more than 1M positions (a KV cache for more would not
# fit any machine this runs on). A user's request (within_training_context) must also be at
# least 16 (below that not even one chat-template turn, ~10 tokens of role markup, and a reply
# fit) and at most the model's training context (what its rope and weights were made for).
MIN_CTX = 16
MAX_CTX = 1 << 20


def check_context_size(n_ctx: int, n_ctx_train: int | None = None) -> int:
    """n_ctx if usable; n_ctx_train given: also MIN_CTX..n_ctx_train. Else InvalidSettingError."""
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, int):
        raise InvalidSettingError(f"context size must be an integer, got {n_ctx!r}")
    low, top = (MIN_CTX, min(MAX_CTX, n_ctx_train)) if n_ctx_train else (1, MAX_CTX)
    if not low <= n_ctx <= top:
        limit = f"this model's training context is {n_ctx_train}" if n_ctx_train and n_ctx_train < MAX_CTX \
            else f"at most {MAX_CTX}"
        raise InvalidSettingError(f"context size {n_ctx} is out of range {low}..{top} ({limit})")
    return n_ctx


@dataclass
class LoadedModel:
    path: Path
    gguf: GGUFFile
    model: BaseModel
    tokenizer: Tokenizer
    template: ChatTemplate

    @property
    def arch(self) -> str:
        return self.gguf.architecture

    @property
    def file_size(self) -> int:
        return self.gguf.file_size

    def fingerprint(self) -> str:
        """Identifies the exact model file cheaply: size, mtime and a hash of the header."""
        st = os.stat(self.path)
        h = hashlib.sha256()
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        h.update(bytes(self.gguf.buffer[: min(self.gguf.data_offset, 1 << 20)]))
        return h.hexdigest()[:32]


def load_model(path: str | os.PathLike, n_ctx: int | None = None, *,
               within_training_context: bool = False) -> LoadedModel:
    """Validate the file, map its weights and build model, tokenizer and chat template.

    within_training_context: n_ctx is a user's request (CLI, app): refuse more than the model
    was trained on (tests and tools may go beyond it, as llama.cpp allows).

    Raises ModelFileError for anything wrong with the file.
    """
    gf = GGUFFile(path)
    try:
        module = model_module(gf)
        gf.map_weights_on_huge_pages()   # before the model touches a weight
        if n_ctx is not None:
            n_ctx_train = gf.get(f"{gf.architecture}.context_length", None) if within_training_context else None
            if within_training_context and not (isinstance(n_ctx_train, int) and n_ctx_train > 0):
                n_ctx_train = MAX_CTX  # unknown: the engine's bound only
            check_context_size(n_ctx, n_ctx_train)
        try:
            model = module.Model(gf, n_ctx)
        except (ValueError, TypeError, KeyError, IndexError, OverflowError) as e:
            # metadata whose values are absurd rather than missing (shapes are checked before this)
            raise ModelFileError(gf.path, f"invalid model: {e}") from None
        try:
            tokenizer = Tokenizer.from_metadata(gf.metadata)
        except Exception as e:  # the vocabulary is untrusted input to a third-party builder
            raise ModelFileError(gf.path, f"tokenizer: {e}") from None
        if tokenizer.vocab_size != model.n_vocab:
            # fewer tokens: the model can sample ids nothing decodes; more: ids with no embedding row
            # (llama.cpp refuses both: it shapes token_embd from the token list)
            raise ModelFileError(gf.path, f"the vocabulary has {tokenizer.vocab_size} tokens but "
                                          f"token_embd.weight has {model.n_vocab} rows")
        bos = tokenizer.decode([tokenizer.bos_id]) if tokenizer.bos_id is not None else ""
        eos = tokenizer.decode([tokenizer.eos_id]) if tokenizer.eos_id is not None else ""
        template = ChatTemplate(gf.get("tokenizer.chat_template", None, kind=str), bos_token=bos, eos_token=eos,
                                fallback=fallback_for(gf.get("general.architecture", None, kind=str)))
        # (a template that fails to parse only raises TemplateError when rendered)
    except BaseException:
        gf.close()
        raise
    return LoadedModel(Path(path), gf, model, tokenizer, template)
