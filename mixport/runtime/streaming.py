"""Incremental detokenization: text pieces as tokens arrive, never a broken UTF-8 sequence."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from mixport.runtime.generate import GenerationRequest, iter_generate
from mixport.runtime.sampling import SamplingConfig

if TYPE_CHECKING:
    from mixport.runtime.api import Pipeline


# C0 controls but tab and newline, DEL, C1 controls, bidi embeddings/overrides/isolates, lone surrogates
_HIDDEN = [*range(0x09), *range(0x0B, 0x20), *range(0x7F, 0xA0), *range(0x202A, 0x202F), *range(0x2066, 0x206A),
           *range(0xD800, 0xE000)]
_ESCAPES = {cp: (f"\\x{cp:02x}" if cp < 0x100 else f"\\u{cp:04x}") for cp in _HIDDEN}


def terminal_text(text: str) -> str:
    """``text`` safe to show on a terminal: characters that move the cursor, recolour, retitle or
    reorder it (ESC, CR, BEL, backspace, C1, bidi overrides...) become visible ``\\x1b``/``\\u202e``
    escapes; newline and tab stay. Output to a pipe or file is written exact, without this."""
    return text.translate(_ESCAPES)


def cut_at_stops(text: str, stops: list[str] | None) -> str:
    """``text`` up to (not including) the first occurrence of any stop string."""
    for s in stops or []:
        text = text.split(s)[0]
    return text


def stop_checker(decode: Callable[[list[int]], str], stops: list[str]) -> Callable[[int, list[int]], bool]:
    """stop(row, new_ids): does the row's text contain a stop string? Called after every token, so
    a match ends with the newest token: only a window of the last tokens is decoded (a character
    is at most 4 byte-tokens, plus tokens that begin before the match), never the whole text."""
    window = 4 * max(len(s) for s in stops) + 4
    return lambda _row, ids: any(s in decode(ids[-window:]) for s in stops)


class TextStream:
    """Feed token ids; ``push`` returns the newly printable text (held back while a
    multi-byte character or a possible stop string is incomplete).

    Decoding is incremental: each push decodes only the tokens since the last complete
    piece plus that piece as context (a leading-space marker decodes as in the full text),
    so a long generation costs linear, not quadratic, decoding; ``flush`` decodes the whole
    continuation once and is authoritative."""

    def __init__(self, decode: Callable[[list[int]], str], stop: list[str] | None = None) -> None:
        self.decode, self.stop = decode, stop or []
        self.ids: list[int] = []
        self.text = ""  # text of ids[:self.read]
        self.prefix = self.read = 0  # ids[prefix:read]: the context the next piece is decoded with
        self.emitted = 0
        self.stopped = False

    def _advance(self) -> None:
        before = self.decode(self.ids[self.prefix:self.read])
        after = self.decode(self.ids[self.prefix:])
        if after.endswith("\ufffd") or not after.startswith(before):
            return  # an incomplete character: wait for the next token
        self.text += after[len(before):]
        self.prefix, self.read = self.read, len(self.ids)

    def push(self, token: int) -> str:
        self.ids.append(token)
        self._advance()
        text = cut_at_stops(self.text, self.stop)
        self.stopped = self.stopped or len(text) < len(self.text)
        if self.stopped:
            return self._take(text)
        hold = max((len(s) - 1 for s in self.stop), default=0)
        safe = len(text) - hold if hold else len(text)
        return self._take(text[:max(safe, self.emitted)])

    def flush(self) -> str:
        return self._take(cut_at_stops(self.decode(self.ids), self.stop))

    def _take(self, text: str) -> str:
        piece = text[self.emitted:]
        self.emitted = max(self.emitted, len(text))
        return piece


def stream_ids(pipe: Pipeline, ids: list[int], max_new_tokens: int, sampling: SamplingConfig,
               stop: list[str] | None = None) -> Iterator[str]:
    """Text pieces of the continuation of ``ids`` as tokens are produced (stop strings cut)."""
    text = TextStream(pipe.decode, stop)
    req = GenerationRequest([ids], max_new_tokens, sampling, pipe.eos_ids(),
                            pad_id=pipe.pad_id, stop=lambda _row, _ids: text.stopped, vocab_size=pipe.vocab_size)
    for _row, token in iter_generate(pipe.session, req, pipe.context):
        piece = text.push(token)
        if piece:
            yield piece
    tail = text.flush()
    if tail:
        yield tail


class Interrupt:
    """Within ``with Interrupt() as flag``, Ctrl-C (SIGINT) only sets ``flag.set``: the caller
    stops at its next check, with no KeyboardInterrupt landing halfway through an output."""

    def __init__(self) -> None:
        self.set = False
        self._old: Any = None

    def __enter__(self) -> Interrupt:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, _signum: int, _frame: Any) -> None:
        self.set = True

    def __exit__(self, *exc: object) -> None:
        import signal

        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
