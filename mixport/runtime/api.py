"""``mixport.runtime.load(OUT_DIR).generate(...)``: the Python face of ``mixport run``."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mixport import artifact
from mixport.artifact import Manifest
from mixport.errors import RuntimeFailure
from mixport.runtime import ort_graph
from mixport.runtime.generate import GenerationRequest, check_request, check_stops, generate
from mixport.runtime.ort_session import OrtSession, check_threads
from mixport.runtime.sampling import SamplingConfig
from mixport.runtime.session import Session
from mixport.runtime.streaming import cut_at_stops, stop_checker, stream_ids
from mixport.runtime.tokenizer import Tokenizer, load_tokenizer


class Busy:
    """One generation at a time per Pipeline: the session owns a KV cache and IOBinding buffers
    that concurrent runs would corrupt. Other threads wait; the thread that already holds it
    (an open stream, or a callback inside a generation) is refused instead of deadlocking."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # a plain Lock: a stream collected on another thread may release it
        self.owner: int | None = None

    def owned_here(self) -> bool:
        return self.owner == threading.get_ident()

    @contextmanager
    def hold(self) -> Iterator[None]:
        if self.owned_here():
            raise RuntimeFailure("this pipeline is already generating in this thread",
                                 given="a call while one of its streams is still open (or from a callback)",
                                 expected="one generation at a time per pipeline",
                                 hint="exhaust or close() the stream first, or load() a second pipeline")
        with self.lock:
            self.owner = threading.get_ident()
            try:
                yield
            finally:
                self.owner = None


class Pipeline:
    """A loaded export folder: session + tokenizer + generation.

    Safe to share between threads: ``generate``, ``generate_ids`` and ``stream`` are serialized
    (one lock per pipeline, held for the whole generation; a stream holds it from its first
    piece until it is exhausted, closed or garbage-collected), so each result equals the
    single-threaded one. For parallel generation, load() one pipeline per thread."""

    def __init__(self, folder: Path, session: Session, manifest: Manifest,
                 tokenizer: Tokenizer | None, backend_reason: str = "") -> None:
        self.folder, self.session, self.manifest, self.tokenizer = folder, session, manifest, tokenizer
        self.config = manifest.config
        self.backend_reason = backend_reason  # why this backend (e.g. why not TensorRT)
        self._busy = Busy()
        self._closed = False

    @property
    def backend(self) -> str:
        """"onnxruntime" or "tensorrt"."""
        return self.session.backend

    @property
    def graph(self) -> str:
        """What the backend runs: "engine" (TensorRT's model.engine), or ONNX Runtime's
        "fast" (model.ort.onnx) or "portable" (model.onnx) graph."""
        if self.session.backend == "tensorrt":
            return "engine"
        return str(getattr(self.session, "graph", "portable"))

    @property
    def context(self) -> int:
        return int(self.config["max_position_embeddings"])

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])

    @property
    def pad_id(self) -> int:
        return int(self.config.get("pad_token_id") or 0)

    def encode(self, prompt: str | list[int], chat: bool = False) -> list[int]:
        if isinstance(prompt, list):
            return prompt
        if not prompt.strip():
            raise RuntimeFailure("empty prompt", given=repr(prompt), expected="some text")
        if self.tokenizer is None:
            raise RuntimeFailure("the folder has no tokenizer, so prompts must be token ids",
                                 given=repr(prompt[:40]), expected="--prompt '1 2 3' (ids separated by spaces)")
        if chat:
            prompt = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
            return self.tokenizer.encode(prompt, add_bos=False)
        return self.tokenizer.encode(prompt)

    def eos_ids(self) -> tuple[int, ...]:
        eos = self.config.get("eos_token_id")
        ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer and self.tokenizer.eos_id is not None:
            ids.add(self.tokenizer.eos_id)
        return tuple(sorted(ids))

    def check(self, prompts: list[list[int]], max_new_tokens: int = 32) -> None:
        """Raise RuntimeFailure now for a request generation would refuse (empty, too long...)."""
        check_request(GenerationRequest(prompts, max_new_tokens, vocab_size=self.vocab_size), self.context)

    def generate_ids(self, prompts: list[list[int]], max_new_tokens: int = 32,
                     sampling: SamplingConfig | None = None, stop: list[str] | None = None,
                     on_token: Callable[[int, int], None] | None = None) -> list[list[int]]:
        with self._busy.hold():
            return self._generate_ids(prompts, max_new_tokens, sampling, stop, on_token)

    def _generate_ids(self, prompts: list[list[int]], max_new_tokens: int, sampling: SamplingConfig | None,
                      stop: list[str] | None, on_token: Callable[[int, int], None] | None = None) -> list[list[int]]:
        self._check_open()
        req = GenerationRequest(prompts, max_new_tokens, sampling or SamplingConfig(), self.eos_ids(),
                                pad_id=self.pad_id,
                                stop=self._stopper(check_stops(stop)), on_token=on_token, vocab_size=self.vocab_size)
        return generate(self.session, req, self.context)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeFailure("the pipeline is closed", given=str(self.folder),
                                 expected="a pipeline from load() that close() was not called on")

    def _stopper(self, stop: list[str] | None) -> Callable[[int, list[int]], bool] | None:
        if not stop or self.tokenizer is None:
            return None
        return stop_checker(self.tokenizer.decode, stop)

    def decode(self, ids: list[int], stop: list[str] | None = None) -> str:
        """Text of ``ids`` (ids as text without a tokenizer), cut at the first stop string."""
        if self.tokenizer is None:
            return " ".join(map(str, ids))
        return cut_at_stops(self.tokenizer.decode(ids), check_stops(stop))

    def generate(self, prompt: str | list[str], max_new_tokens: int = 32, *, chat: bool = False,
                 stop: list[str] | None = None, **sampling: Any) -> str | list[str]:
        """Text in, text out; a list of prompts runs as one left-padded batch."""
        config, stop = sampling_config(sampling), check_stops(stop)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        with self._busy.hold():
            ids = [self.encode(p, chat) for p in prompts]
            out = self._generate_ids(ids, max_new_tokens, config, stop)
            texts = [self.decode(o, stop) for o in out]
        return texts[0] if isinstance(prompt, str) else texts

    def stream(self, prompt: str, max_new_tokens: int = 32, *, chat: bool = False,
               stop: list[str] | None = None, **sampling: Any) -> Iterator[str]:
        """Yield text pieces as tokens are produced (one prompt); joined, they equal generate().
        The pipeline stays busy (other threads wait) until the stream is exhausted or closed."""
        config, stop = sampling_config(sampling), check_stops(stop)
        with self._busy.hold():
            self._check_open()
            ids = self.encode(prompt, chat)
            try:
                yield from stream_ids(self, ids, max_new_tokens, config, stop)
            finally:
                if self._closed:  # close() was called while this stream was open: finish it now
                    self.session.close()

    def scheduler(self, max_batch: int = 8, max_queue: int = 64, metrics: Any = None) -> Any:
        """A continuous-batching Scheduler that owns this pipeline until its ``close()``
        (``mixport.runtime.scheduler``): ``submit(Job(prompt_ids, ...))`` from any thread."""
        from mixport.runtime.scheduler import Scheduler

        return Scheduler(self, max_batch=max_batch, max_queue=max_queue, metrics=metrics)

    def close(self) -> None:
        """Release the session (after any generation in progress on another thread ends)."""
        self._closed = True
        if self._busy.owned_here():  # a stream of this thread is open: it closes the session when it ends
            return
        with self._busy.lock:
            self.session.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def sampling_config(options: dict[str, Any]) -> SamplingConfig:
    """generate()/stream() keyword options -> SamplingConfig (an unknown name is one error line)."""
    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(SamplingConfig)})
    if unknown:
        raise RuntimeFailure("unknown sampling option", given=", ".join(unknown),
                             expected=", ".join(f.name for f in dataclasses.fields(SamplingConfig)))
    return SamplingConfig(**options)


GRAPHS = ("auto", "fast", "portable")


def open_session(folder: Path, manifest: Manifest, path: Path, device: str, threads: int | None,
                 graph: str, progress: Callable[[str], None] | None = None) -> Session:
    """The ONNX Runtime session for ``graph``: fast (ort_graph, CPU), portable (model.onnx),
    or auto (fast when the model and device allow it, else portable)."""
    if graph not in GRAPHS:
        raise RuntimeFailure("unknown graph", given=graph, expected=" | ".join(GRAPHS))
    why_not = "device is not cpu" if device != "cpu" else ort_graph.supported(manifest.config, manifest.dtype)
    if graph == "fast" or (graph == "auto" and why_not is None):
        from mixport.runtime.ort_fast import OrtFastSession

        if graph == "fast" and device != "cpu":
            raise RuntimeFailure("the fast graph is built for ONNX Runtime's CPU provider", given=device,
                                 expected="--device cpu", hint="use --graph portable on cuda")
        try:
            return OrtFastSession(ort_graph.ensure(folder, manifest, progress), manifest, device, threads)
        except RuntimeFailure as exc:
            if graph == "fast":
                raise
            if progress:
                progress(f"fast graph unavailable, using model.onnx ({exc})")
    elif graph == "auto" and device == "cpu" and progress:  # the model's reason (e.g. PhiMoE's LayerNorm)
        progress(f"fast graph unavailable, using model.onnx (it does not build {why_not})")
    return OrtSession(path, manifest, device=device, threads=threads)


def load(folder: str | Path, device: str = "cpu", threads: int | None = None, graph: str = "auto",
         progress: Callable[[str], None] | None = None, backend: str = "auto") -> Pipeline:
    """Open an export folder. ``backend``: "onnxruntime", "tensorrt" or "auto" (TensorRT when
    model.engine is up to date and a GPU is visible, else ONNX Runtime; see ``backend_reason``).
    ``graph`` (ONNX Runtime): auto | fast | portable."""
    from mixport.runtime.select import choose_backend

    check_threads(threads)  # before anything is read or built
    folder = Path(folder)
    manifest = Manifest.read(folder)
    path = artifact.validate_folder(folder, manifest)
    choice = choose_backend(folder, manifest, backend)
    session: Session
    if choice.backend == "tensorrt":
        from mixport.runtime.trt_session import TrtSession

        assert manifest.engine is not None  # choose_backend picks TensorRT only for a recorded engine
        session = TrtSession(artifact.folder_file(folder, manifest.engine.file), manifest)
    else:
        session = open_session(folder, manifest, path, device, threads, graph, progress)
    return Pipeline(folder, session, manifest, load_tokenizer(folder), choice.reason)
