"""Prompts from the command line: repeated --prompt, a prompts file (one per line), token ids."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mixport.errors import RuntimeFailure

if TYPE_CHECKING:
    from mixport.runtime.api import Pipeline


def read_prompts_file(path: Path) -> list[str]:
    """One prompt per non-empty line of a UTF-8 file."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise RuntimeFailure("cannot read the prompts file", given=f"{path}: {exc.strerror}",
                             expected="a readable text file, one prompt per line") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RuntimeFailure("the prompts file is not UTF-8", given=f"{path}: byte {exc.start} "
                             f"({data[exc.start:exc.start + 1]!r})", expected="UTF-8 text, one prompt per line",
                             hint="convert it, e.g. iconv -f latin1 -t utf-8") from None
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise RuntimeFailure("the prompts file has no prompts", given=str(path), expected="one prompt per line")
    return prompts


def collect(prompts: tuple[str, ...] | list[str], prompts_file: Path | None) -> list[str]:
    out = list(prompts) + (read_prompts_file(prompts_file) if prompts_file else [])
    if not out:
        raise RuntimeFailure("no prompt given", expected="--prompt TEXT (repeatable) or --prompts-file FILE")
    for text in out:  # refused here, before the model loads (as Pipeline.encode would after)
        if not text.strip():
            raise RuntimeFailure("empty prompt", given=repr(text), expected="some text")
    return out


def prompt_ids(pipe: Pipeline, prompt: str, chat: bool = False) -> list[int]:
    """Token ids of ``prompt``: text through the tokenizer, or ids ('1 2 3') without one."""
    if pipe.tokenizer is not None:
        return pipe.encode(prompt, chat)
    try:
        return [int(t) for t in prompt.split()] or pipe.encode(prompt)
    except ValueError:
        return pipe.encode(prompt)  # raises the clear "no tokenizer" error
