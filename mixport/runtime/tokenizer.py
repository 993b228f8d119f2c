"""The export folder's tokenizer (tokenizer.json + tokenizer_config.json), via `tokenizers`.

The files are read and checked by ``exporter.tokenizer_files`` (no link out of the folder, each
file parsed); the chat template is rendered in Jinja's sandbox (``exporter.chat_template``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from mixport.errors import RuntimeFailure
from mixport.exporter import chat_template, tokenizer_files

if TYPE_CHECKING:
    import jinja2


class Tokenizer:
    def __init__(self, folder: Path, files: tokenizer_files.TokenizerFiles | None = None) -> None:
        files = files or tokenizer_files.read(Path(folder))
        if files.tokenizer is None:
            raise RuntimeFailure("the folder has no tokenizer.json", given=str(folder), expected="tokenizer.json")
        self.tok = files.tokenizer
        self.config: dict[str, Any] = files.config
        self.special = files.special
        self.bos_token = files.special.get("bos_token")
        self.eos_token = files.special.get("eos_token")
        self.bos_id = self.tok.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_id = self.tok.token_to_id(self.eos_token) if self.eos_token else None
        self.chat_template: str | None = files.chat_template
        self._compiled: jinja2.Template | None = None

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=True).ids
        add_bos = self.config.get("add_bos_token", True) if add_bos is None else add_bos
        if add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render the chat template as transformers does (sandboxed Jinja, its helpers and variables)."""
        if not self.chat_template:
            raise RuntimeFailure("the tokenizer has no chat template", given="tokenizer_config.json",
                                 expected="a 'chat_template' entry", hint="drop --chat")
        if self._compiled is None:
            self._compiled = chat_template.compile_template(self.chat_template, "the chat template")
        tokens = {"bos_token": "", "eos_token": "", **self.special}
        return chat_template.render(self._compiled, [dict(m) for m in messages], tools=None, documents=None,
                                    add_generation_prompt=add_generation_prompt, **tokens)


def load_tokenizer(folder: Path) -> Tokenizer | None:
    """The folder's tokenizer, None without tokenizer.json; TokenizerError for a bad or escaping file."""
    files = tokenizer_files.read(Path(folder))
    return None if files.tokenizer is None else Tokenizer(Path(folder), files)

