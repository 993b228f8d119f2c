"""The TensorRT side of a parity check: mixport's TrtSession as a Polygraphy runner.

Polygraphy's own ``TrtRunner`` imports ``tensorrt`` only; this runner works with
either flavor (through ``mixport.plugins.trt_import``) and registers the mixport
plugins before the engine is deserialized. Stateless like ORT: the past comes
from the feed (host arrays), so every step sees the reference's cache.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata

from mixport import artifact
from mixport.artifact import Manifest
from mixport.tools.torch_runners import input_metadata


class TrtSessionRunner(BaseRunner):
    """FOLDER/model.engine through ``TrtSession.run``; outputs as float32 / int64 host arrays."""

    def __init__(self, folder: Path, manifest: Manifest, name: str = "tensorrt") -> None:
        super().__init__(name=name, prefix="mixport-trt")
        self.folder, self.manifest = Path(folder), manifest

    def activate_impl(self) -> None:
        from mixport.runtime.trt_session import TrtSession

        assert self.manifest.engine is not None  # check adds this runner only for a recorded engine
        self.session = TrtSession(artifact.folder_file(self.folder, self.manifest.engine.file), self.manifest)

    def get_input_metadata_impl(self) -> TensorMetadata:
        dtype = {"fp16": np.float16}.get(self.manifest.dtype, np.float32)
        return input_metadata(self.manifest.config["num_hidden_layers"], dtype)

    def infer_impl(self, feed_dict: OrderedDict) -> OrderedDict:
        start = time.perf_counter()
        out = OrderedDict(self.session.run(dict(feed_dict)))
        self.inference_time = time.perf_counter() - start
        return out

    def deactivate_impl(self) -> None:
        self.session.close()
        del self.session
