"""The export folder's tokenizer (tokenizer.json + tokenizer_config.json), via `tokenizers`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mixport.errors import RuntimeFailure


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    def __init__(self, folder: Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        folder = Path(folder)
        self.tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        cfg_path = folder / "tokenizer_config.json"
        self.config: dict[str, Any] = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        self.bos_id = self.tok.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_id = self.tok.token_to_id(self.eos_token) if self.eos_token else None
        self.chat_template: str | None = self.config.get("chat_template")
        template_file = folder / "chat_template.jinja"
        if self.chat_template is None and template_file.is_file():
            self.chat_template = template_file.read_text()

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=True).ids
        add_bos = self.config.get("add_bos_token", True) if add_bos is None else add_bos
        if add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        """Render the chat template (Jinja, like transformers) with a generation prompt."""
        if not self.chat_template:
            raise RuntimeFailure("the tokenizer has no chat template", given="tokenizer_config.json",
                                 expected="a 'chat_template' entry", hint="drop --chat")
        import jinja2

        env = jinja2.Environment(undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)

        def raise_exception(message: str) -> None:
            raise RuntimeFailure("the chat template refused the messages", given=message)

        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(
            messages=messages, bos_token=self.bos_token or "", eos_token=self.eos_token or "",
            add_generation_prompt=True)


def load_tokenizer(folder: Path) -> Tokenizer | None:
    return Tokenizer(folder) if (Path(folder) / "tokenizer.json").is_file() else None
