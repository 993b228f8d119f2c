"""The app in-process (``build_app`` under Starlette's TestClient, which is an httpx client the
`openai` client accepts): chat on an export whose tokenizer has no chat template is a 400, and the
portable graph serves too (batched: left-padded rows)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import require_module


def test_chat_without_a_template_is_400_and_the_portable_graph_serves(export_copy: Path) -> None:
    openai = require_module("openai")
    require_module("fastapi", "'mixport[serve]'")
    from fastapi.testclient import TestClient

    from mixport.serve.app import ServeOptions, build_app

    config_path = export_copy / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    del config["chat_template"]
    config_path.write_text(json.dumps(config))
    app = build_app(export_copy, ServeOptions(max_batch=4, threads=1, graph="portable", model_name="m"))
    with TestClient(app) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0)
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        error = caught.value.response.json()["error"]
        assert "no chat template" in error["message"] and error["param"] == "messages"
        done = client.completions.create(model="m", prompt="The ship", max_tokens=3, temperature=0)
        assert done.usage.completion_tokens == 3 and done.model == "m"
        health = http.get("/health").json()
        assert (health["graph"], health["batched"], health["active"]) == ("portable", True, 0)
