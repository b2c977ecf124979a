"""Open a GGUF file and build everything needed to chat with it."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from engine.chat_template import ChatTemplate, fallback_for
from engine.errors import ModelFileError
from engine.gguf_file import GGUFFile
from engine.models import model_module
from engine.tokenizer import Tokenizer


@dataclass
class LoadedModel:
    path: Path
    gguf: GGUFFile
    model: object
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
        h.update(bytes(self.gguf._mmap[: min(self.gguf.data_offset, 1 << 20)]))
        return h.hexdigest()[:32]


def load_model(path: str | os.PathLike, n_ctx: int | None = None) -> LoadedModel:
    """Validate the file, map its weights and build model, tokenizer and chat template.

    Raises ModelFileError for anything wrong with the file.
    """
    gf = GGUFFile(path)
    try:
        module = model_module(gf)
        try:
            model = module.Model(gf, n_ctx)
        except (ValueError, TypeError, KeyError, IndexError, OverflowError) as e:
            # metadata whose values are absurd rather than missing (shapes are checked before this)
            raise ModelFileError(gf.path, f"invalid model: {e}") from None
        try:
            tokenizer = Tokenizer.from_metadata(gf.metadata)
        except Exception as e:  # the vocabulary is untrusted input to a third-party builder
            raise ModelFileError(gf.path, f"tokenizer: {e}") from None
        if tokenizer.vocab_size > model.n_vocab:
            raise ModelFileError(gf.path, f"tokenizer has {tokenizer.vocab_size} tokens but the model "
                                          f"only {model.n_vocab}")
        bos = tokenizer.decode([tokenizer.bos_id]) if tokenizer.bos_id is not None else ""
        eos = tokenizer.decode([tokenizer.eos_id]) if tokenizer.eos_id is not None else ""
        template = ChatTemplate(gf.get("tokenizer.chat_template", None, kind=str), bos_token=bos, eos_token=eos,
                                fallback=fallback_for(gf.get("general.architecture", None, kind=str)))
        # (a template that fails to parse only raises TemplateError when rendered)
    except BaseException:
        gf.close()
        raise
    return LoadedModel(Path(path), gf, model, tokenizer, template)
