"""A model folder's tokenizer files, parsed and checked before anything uses them.

``mixport export`` reads them before copying (a corrupt ``tokenizer.json`` is refused there, not
when ``run`` loads it later) and ``mixport run`` reads them the same way when it loads a folder.
Every file is found through ``artifact.tokenizer_path``: a link that leaves the folder is refused.
What is checked: ``tokenizer.json`` loads in ``tokenizers``; ``tokenizer_config.json``,
``special_tokens_map.json`` and ``generation_config.json`` are JSON objects; the special tokens
are strings (or ``{"content": ...}``); ``add_bos_token`` is a boolean; the chat template
(``chat_template`` in the config: a string, or transformers' list of ``{"name", "template"}``;
else ``chat_template.jinja``) is text that compiles in the sandbox (``chat_template.py``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mixport import artifact
from mixport.errors import TokenizerError
from mixport.exporter.chat_template import compile_template

JSON_OBJECTS = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
TEMPLATE_FILE = "chat_template.jinja"
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


@dataclass
class TokenizerFiles:
    tokenizer: Any  # tokenizers.Tokenizer; None when the folder has no tokenizer.json
    config: dict[str, Any] = field(default_factory=dict)  # tokenizer_config.json ({} when absent)
    chat_template: str | None = None  # the default template's source
    special: dict[str, str] = field(default_factory=dict)  # bos_token... -> its text


def _text(path: Path, name: str) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TokenizerError(f"{name} is not UTF-8 text", given=f"byte {exc.start} of {path}",
                             expected="a UTF-8 file") from None


def _json_object(path: Path, name: str) -> dict[str, Any]:
    try:
        value = json.loads(_text(path, name))
    except (json.JSONDecodeError, RecursionError) as exc:
        raise TokenizerError(f"{name} is not valid JSON", given=f"{path}: {str(exc)[:120]}",
                             expected="a JSON object") from None
    if not isinstance(value, dict):
        raise TokenizerError(f"{name} is not a JSON object", given=f"{path}: a JSON {type(value).__name__}",
                             expected="a JSON object ({...})")
    return value


def _tokenizer(path: Path) -> Any:
    from tokenizers import Tokenizer

    text = _text(path, "tokenizer.json")
    try:
        return Tokenizer.from_str(text)
    except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception for any bad file
        raise TokenizerError("tokenizer.json cannot be loaded", given=f"{path}: {' '.join(str(exc).split())[:160]}",
                             expected="a tokenizer.json written by the tokenizers library") from None


def special_tokens(config: dict[str, Any]) -> dict[str, str]:
    """bos_token, eos_token, ... -> text (a string, or a dict's ``content``); TokenizerError for other types."""
    out = {}
    for key in SPECIAL_TOKENS:
        value = config.get(key)
        text = value.get("content") if isinstance(value, dict) else value
        if value is not None and not isinstance(text, str):
            raise TokenizerError(f"tokenizer_config.json: {key} is not a token", given=repr(value)[:80],
                                 expected='a string or {"content": "..."}')
        if text is not None:
            out[key] = text
    return out


def _template_of(config: dict[str, Any]) -> object:
    """The config's default template source (a list is transformers' named templates: 'default')."""
    value = config.get("chat_template")
    if not isinstance(value, list):
        return value
    named = {}
    for entry in value:
        if not (isinstance(entry, dict) and isinstance(entry.get("name"), str) and "template" in entry):
            raise TokenizerError("tokenizer_config.json: chat_template is a list but not of named templates",
                                 given=repr(entry)[:80], expected='[{"name": "default", "template": "..."}, ...]')
        compile_template(entry["template"], f"tokenizer_config.json chat_template {entry['name']!r}")
        named[entry["name"]] = entry["template"]
    return named.get("default")


def read(folder: Path) -> TokenizerFiles:
    """Parse and check every tokenizer file FOLDER has (see the module doc); TokenizerError names the first bad one."""
    folder = Path(folder)
    paths = {name: artifact.tokenizer_path(folder, name) for name in artifact.TOKENIZER_FILES}
    objects = {name: _json_object(p, name) for name in JSON_OBJECTS if (p := paths[name]) is not None}
    config = objects.get("tokenizer_config.json", {})
    special = special_tokens(config)
    if not isinstance(config.get("add_bos_token", True), bool):
        raise TokenizerError("tokenizer_config.json: add_bos_token is not a boolean",
                             given=repr(config["add_bos_token"])[:40], expected="true or false")
    source, template = _template_of(config), None
    if source is not None:
        compile_template(source, "tokenizer_config.json chat_template")
        template = str(source)
    if (p := paths[TEMPLATE_FILE]) is not None:  # used when the config has none; checked either way
        source = _text(p, TEMPLATE_FILE)
        compile_template(source, TEMPLATE_FILE)
        template = source if template is None else template
    tok_path = paths["tokenizer.json"]
    return TokenizerFiles(_tokenizer(tok_path) if tok_path else None, config, template, special)


def check(folder: Path) -> None:
    """``read`` for its checks only: what ``mixport export`` runs before it copies the files."""
    read(folder)
