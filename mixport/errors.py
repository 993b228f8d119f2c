"""Every mixport exception class: the ``MixportError`` family the CLI prints without a
traceback (one line, exit code ``exit_code``), plus ``NoMatch``, the passes' internal signal."""

from __future__ import annotations


class MixportError(Exception):
    """A user-facing error: what failed, what was given, what was expected, a hint."""

    exit_code = 1

    def __init__(self, what: str, *, given: object = None, expected: object = None,
                 hint: str | None = None) -> None:
        parts = [what]
        if given is not None:
            parts.append(f"given: {given}")
        if expected is not None:
            parts.append(f"expected: {expected}")
        if hint:
            parts.append(f"hint: {hint}")
        super().__init__("; ".join(parts))


class ConfigError(MixportError):
    """config.json is missing, malformed or describes an unsupported model."""


class CheckpointError(MixportError):
    """The weights cannot be read safely or do not match the config."""


class OutputExistsError(MixportError):
    """The output exists and --force was not given, or may not be written even with it (it is an
    input, or a folder mixport did not write)."""


class ExportError(MixportError):
    """Tracing or ONNX post-processing failed."""


class RuntimeFailure(MixportError):
    """A run folder or a generation request is unusable."""


class QueueFull(RuntimeFailure):
    """The continuous-batching scheduler's queue is full (HTTP 429); ``retry_after`` seconds is a
    fair wait."""

    def __init__(self, what: str, *, retry_after: float = 1.0, **parts: object) -> None:
        super().__init__(what, **parts)  # type: ignore[arg-type]
        self.retry_after = retry_after


class Closed(RuntimeFailure):
    """The scheduler is shutting down and takes no new request (HTTP 503)."""


INVALID_REQUEST = "invalid_request_error"


class ApiError(MixportError):
    """An HTTP request ``mixport serve`` refuses or cannot finish: ``status`` and the fields of
    OpenAI's error body (``serve/errors.py`` makes the response); its message is one line."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = INVALID_REQUEST, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers


class RayServeError(MixportError):
    """Ray Serve cannot be started, reached or given the deployment."""


class TokenizerError(MixportError):
    """A tokenizer file or chat template is malformed, unsafe, or points outside its folder."""


class ParityError(MixportError):
    """Outputs of two backends disagree beyond tolerance."""

    exit_code = 3


class CheckUnavailable(MixportError):
    """No backend here can run the folder, so parity cannot be checked (not a parity failure)."""


class PluginError(MixportError):
    """A mixport TensorRT plugin cannot be created or registered."""


class BuildError(MixportError):
    """A TensorRT engine cannot be built from the ONNX file."""


class TensorRTNotFoundError(BuildError):
    """Neither `tensorrt` nor `tensorrt_rtx_bindings` can be imported."""


class ParserSymlinkError(BuildError):
    """The ``libtensorrt_rtx.so`` link is missing and cannot be created."""


class KernelDependencyError(MixportError):
    """An optional package the kernels need (torch, triton) is not installed."""


class KernelInputError(MixportError):
    """A kernel was given tensors of the wrong shape, dtype or device."""


class PassError(MixportError):
    """A graph pass could not do what the pipeline requires (e.g. no MoE layer fused)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C's KeyboardInterrupt would be, so the same cleanup runs (the CLI
    then exits 143, 128 + SIGTERM, where Ctrl-C exits 130)."""


class NoMatch(Exception):  # noqa: N818 - a signal, not an error: it never reaches users
    """Why a pass's pattern did not match one layer (collected as a reason, never raised to users)."""


class FileSystemError(MixportError):
    """Reading or writing a file failed (disk full, permission denied...)."""

    @classmethod
    def from_os_error(cls, exc: OSError) -> FileSystemError:
        import errno

        where = exc.filename or "a file"
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return cls("out of disk space", given=f"while writing {where}",
                       expected="free space for the output", hint="an export needs about three times the "
                       "model's weights free beside OUT while it works (work files, then the output)")
        return cls(f"file access failed: {exc.strerror or exc}", given=where,
                   expected="a readable input and a writable output location")
