"""Tokenizer files are untrusted input: chat templates render sandboxed, links stay inside the folder,
every file is parsed at export, token ids stay in the vocabulary, generated text cannot drive a terminal.

(issue 10 items 1, 2 (tokenizer files), 7 and 17)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import click.testing
import pytest

from mixport import artifact
from mixport.errors import RuntimeFailure, TokenizerError
from mixport.exporter import tokenizer_files
from mixport.runtime.api import Pipeline
from mixport.runtime.streaming import terminal_text
from mixport.runtime.tokenizer import Tokenizer
from tests.helpers import invoke, one_line_error, require_module

MIXTRAL = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""  # noqa: E501 - mistralai/Mixtral-8x7B-Instruct-v0.1's template, as published

QWEN = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""  # noqa: E501 - Qwen2.5-Instruct's ChatML template (its tool-call branches cut)

HELPERS = """{%- set ns = namespace(n=0) %}
{%- for m in messages %}
{%- if m['role'] == 'system' %}{% continue %}{% endif %}
{%- set ns.n = ns.n + 1 %}
{% generation %}{{ m | tojson(indent=2) }}{% endgeneration %}
{%- if ns.n > 5 %}{% break %}{% endif %}
{%- endfor %}
[{{ strftime_now('%Y') }}] {{ dict(a=1) | tojson }} {{ messages | map(attribute='role') | join(',') }}
{%- if add_generation_prompt %}>>{% endif %}"""  # transformers' helpers and extensions, all in one

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a ship, é日本"}]

HOSTILE = [
    "{{ cycler.__init__.__globals__.os.system('touch PWNED') }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ joiner.__init__.__globals__.__builtins__.open('/etc/passwd').read() }}",
    "{{ messages.append(1) }}",  # immutable: the caller's messages cannot be changed
    "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
    "{{ dict.mro() }}",
]
HOGS = [  # hangs and memory bombs: refused by the render budget
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{{ 'a' * 10000000000 }}",
    "{{ 2 ** 100000000 }}",
    "{{ 'x'.center(1000000000) }}",
    "{{ 'x' | center(1000000000) }}",
]


def tokenizer_folder(root: Path, source: Path, template: object, **config: object) -> Path:
    """A folder with SOURCE's tokenizer.json and a tokenizer_config.json holding TEMPLATE."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source / "tokenizer.json", root / "tokenizer.json")
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
           "unk_token": "<unk>", "chat_template": template, **config}
    (root / "tokenizer_config.json").write_text(json.dumps(cfg))
    return root


def set_template(folder: Path, template: str) -> None:
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = template
    cfg_path.write_text(json.dumps(cfg))


# ---- 1. chat templates render in the sandbox ----------------------------------------------------

@pytest.mark.parametrize(("name", "template"), [("mixtral", MIXTRAL), ("qwen", QWEN), ("helpers", HELPERS)])
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_hub_templates_render_as_transformers_does(rt_source: Path, tmp_path: Path, name: str, template: str,
                                                   generation_prompt: bool) -> None:
    transformers = require_module("transformers")
    folder = tokenizer_folder(tmp_path / name, rt_source, template)
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    for messages in (CHAT, CHAT[1:2]):
        want = hf.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
        got = Tokenizer(folder).apply_chat_template(messages, add_generation_prompt=generation_prompt)
        assert got == want and got


def test_mixtral_template_raise_exception_is_one_line(rt_source: Path, tmp_path: Path) -> None:
    tok = Tokenizer(tokenizer_folder(tmp_path / "t", rt_source, MIXTRAL))
    with pytest.raises(TokenizerError, match="roles must alternate") as info:
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("template", HOSTILE + HOGS,
                         ids=[f"hostile{i}" for i in range(len(HOSTILE))] + [f"hog{i}" for i in range(len(HOGS))])
def test_hostile_templates_are_refused(rt_source: Path, tmp_path: Path, template: str,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    tok = Tokenizer(tokenizer_folder(tmp_path / "t", rt_source, template))
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(TokenizerError, match="sandbox forbids|refused the messages") as info:
        tok.apply_chat_template(messages)
    assert "\n" not in str(info.value)
    assert messages == [{"role": "user", "content": "hi"}] and not (tmp_path / "PWNED").exists()


def test_run_chat_with_a_hostile_template_is_one_line_and_runs_nothing(rt_copy: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The attack from the issue: a plain jinja2.Environment ran the shell command."""
    monkeypatch.chdir(tmp_path)
    set_template(rt_copy, "{{ cycler.__init__.__globals__.os.system('touch PWNED') }}")
    one_line_error(invoke("run", rt_copy, "--chat", "--prompt", "hi", "--graph", "portable"),
                   "sandbox forbids", "__init__")
    assert not (tmp_path / "PWNED").exists()
    set_template(rt_copy, "{{ raise_exception('no system messages, please') }}")
    one_line_error(invoke("run", rt_copy, "--chat", "--prompt", "hi", "--graph", "portable"),
                   "refused the messages", "no system messages, please")
    set_template(rt_copy, "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}")
    one_line_error(invoke("run", rt_copy, "--chat", "--prompt", "hi", "--graph", "portable"), "range items")


def test_run_with_a_template_syntax_error_is_one_line(rt_copy: Path) -> None:
    set_template(rt_copy, "{% if messages %}unclosed")
    one_line_error(invoke("run", rt_copy, "--prompt", "hi", "--graph", "portable"), "syntax error",
                   "tokenizer_config.json chat_template")


# ---- 2. tokenizer files stay inside the folder ---------------------------------------------------

@pytest.mark.parametrize("target", ["/etc/passwd", "outside"])
def test_export_refuses_a_tokenizer_link_out_of_the_folder(rt_source: Path, tmp_path: Path, target: str) -> None:
    src = Path(shutil.copytree(rt_source, tmp_path / "src"))
    outside = tmp_path / "elsewhere" / "tokenizer.json"
    outside.parent.mkdir()
    shutil.copyfile(src / "tokenizer.json", outside)  # a valid tokenizer, but not the folder's
    (src / "tokenizer.json").unlink()
    (src / "tokenizer.json").symlink_to(outside if target == "outside" else Path(target))
    out = tmp_path / "out"
    one_line_error(invoke("export", src, "-o", out, "--no-check"), "tokenizer.json points outside the model folder")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    with pytest.raises(TokenizerError, match="outside"):
        artifact.copy_tokenizer(src, tmp_path / "elsewhere")  # the copy itself refuses too


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"])
def test_run_refuses_a_tokenizer_link_out_of_the_folder(rt_copy: Path, tmp_path: Path, name: str) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("{}")
    (rt_copy / name).unlink(missing_ok=True)
    (rt_copy / name).symlink_to(outside)
    one_line_error(invoke("run", rt_copy, "--prompt", "1 2", "--graph", "portable"),
                   f"{name} points outside the model folder")
    (rt_copy / name).unlink()
    (rt_copy / name).symlink_to("/etc/passwd")
    one_line_error(invoke("run", rt_copy, "--prompt", "1 2", "--graph", "portable"), "outside the model folder")


def test_links_inside_the_folder_and_the_hub_cache_are_followed(rt_source: Path, tmp_path: Path) -> None:
    """A link within the folder is fine; so is a Hugging Face cache snapshot (REPO/snapshots/REV/NAME ->
    ../../blobs/HASH). Only the file's contents are copied, never the link."""
    repo = tmp_path / "models--org--name"
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    shutil.copyfile(rt_source / "tokenizer.json", repo / "blobs" / "f00d")
    (snap / "tokenizer.json").symlink_to("../../blobs/f00d")
    shutil.copyfile(rt_source / "tokenizer_config.json", snap / "real_config.json")
    (snap / "tokenizer_config.json").symlink_to("real_config.json")
    assert tokenizer_files.read(snap).tokenizer is not None
    dst = tmp_path / "dst"
    dst.mkdir()
    assert artifact.copy_tokenizer(snap, dst) == ["tokenizer.json", "tokenizer_config.json"]
    assert not any(p.is_symlink() for p in dst.iterdir())
    assert (dst / "tokenizer.json").read_bytes() == (rt_source / "tokenizer.json").read_bytes()
    # a blobs folder that is itself a link leads anywhere: refused
    shutil.move(repo / "blobs", tmp_path / "real-blobs")
    (repo / "blobs").symlink_to(tmp_path / "real-blobs")
    with pytest.raises(TokenizerError, match="outside"):
        tokenizer_files.read(snap)


def test_broken_and_odd_tokenizer_entries_are_one_line(rt_source: Path, tmp_path: Path) -> None:
    src = tokenizer_folder(tmp_path / "t", rt_source, MIXTRAL)
    (src / "chat_template.jinja").symlink_to(src / "missing")
    with pytest.raises(TokenizerError, match="broken link"):
        tokenizer_files.read(src)
    (src / "chat_template.jinja").unlink()
    (src / "chat_template.jinja").mkdir()
    with pytest.raises(TokenizerError, match="not a regular file"):
        tokenizer_files.read(src)


# ---- 7. tokenizer files are parsed at export ----------------------------------------------------

BAD_FILES = [
    ("tokenizer.json", b"{not json", "tokenizer.json cannot be loaded"),
    ("tokenizer.json", b"{}", "tokenizer.json cannot be loaded"),
    ("tokenizer.json", b"\xff\xfe", "tokenizer.json is not UTF-8"),
    ("tokenizer_config.json", b"[1, 2]", "tokenizer_config.json is not a JSON object"),
    ("tokenizer_config.json", b"{'single': 1}", "tokenizer_config.json is not valid JSON"),
    ("tokenizer_config.json", b'{"chat_template": 5}', "chat template is not text"),
    ("tokenizer_config.json", b'{"chat_template": "{% if %}"}', "syntax error"),
    ("tokenizer_config.json", b'{"chat_template": [{"name": "default", "template": 5}]}', "chat template is not text"),
    ("tokenizer_config.json", b'{"chat_template": [5]}', "not of named templates"),
    ("tokenizer_config.json", b'{"bos_token": 1}', "bos_token is not a token"),
    ("tokenizer_config.json", b'{"eos_token": {"content": null}}', "eos_token is not a token"),
    ("tokenizer_config.json", b'{"add_bos_token": "yes"}', "add_bos_token is not a boolean"),
    ("special_tokens_map.json", b'"x"', "special_tokens_map.json is not a JSON object"),
    ("generation_config.json", b"nul", "generation_config.json is not valid JSON"),
    ("chat_template.jinja", b"{% for %}", "syntax error"),
    ("chat_template.jinja", b"\xc3\x28", "chat_template.jinja is not UTF-8"),
]


@pytest.mark.parametrize(("name", "data", "fragment"), BAD_FILES, ids=[f"{n}:{d[:12]!r}" for n, d, _ in BAD_FILES])
def test_export_refuses_a_bad_tokenizer_file(rt_source: Path, tmp_path: Path, name: str, data: bytes,
                                             fragment: str) -> None:
    src = Path(shutil.copytree(rt_source, tmp_path / "src"))
    (src / name).write_bytes(data)
    out = tmp_path / "out"
    one_line_error(invoke("export", src, "-o", out, "--no-check"), fragment)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_named_templates_pick_the_default(rt_source: Path, tmp_path: Path) -> None:
    folder = tokenizer_folder(tmp_path / "t", rt_source, [{"name": "tool_use", "template": "T"},
                                                          {"name": "default", "template": QWEN}])
    assert Tokenizer(folder).chat_template == QWEN


def test_run_refuses_a_corrupt_tokenizer_in_the_export(rt_copy: Path) -> None:
    (rt_copy / "tokenizer.json").write_text('{"model": 5}')
    one_line_error(invoke("run", rt_copy, "--prompt", "hi", "--graph", "portable"), "tokenizer.json cannot be loaded")


# ---- 7. token ids stay in the vocabulary --------------------------------------------------------

@pytest.mark.parametrize("prompt", ["-5 3", "3 {vocab}", "1 99999999999999999999999"])
def test_run_refuses_ids_outside_the_vocabulary(rt_copy: Path, prompt: str) -> None:
    (rt_copy / "tokenizer.json").unlink()
    vocab = artifact.Manifest.read(rt_copy).config["vocab_size"]
    one_line_error(invoke("run", rt_copy, "--prompt", prompt.format(vocab=vocab), "--graph", "portable"),
                   "token id outside the vocabulary", f"0 <= id < {vocab}")
    res = invoke("run", rt_copy, "--prompt", f"3 {vocab - 1}", "--max-new-tokens", "2", "--graph", "portable")
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize(("prompts", "fragment"), [
    ([[-5, 3]], "outside the vocabulary"), ([[3, 10**6]], "outside the vocabulary"),
    ([[1.5, 2]], "must be integers"), ([[True]], "must be integers"), ([1, 2, 3], "list of token-id lists"),
])
def test_generate_ids_refuses_bad_ids(pipes: dict[str, Pipeline], prompts: list, fragment: str) -> None:
    for pipe in pipes.values():
        with pytest.raises(RuntimeFailure, match=fragment):
            pipe.generate_ids(prompts, 2)
        with pytest.raises(RuntimeFailure, match=fragment):
            pipe.check(prompts, 2)


def test_numpy_ids_are_ids(pipes: dict[str, Pipeline]) -> None:
    np = pytest.importorskip("numpy")
    pipe = pipes["portable"]
    assert pipe.generate_ids([list(np.array([3, 7]))], 2) == pipe.generate_ids([[3, 7]], 2)


# ---- 17. generated text cannot drive the terminal -----------------------------------------------

def test_terminal_text_escapes_controls_only() -> None:
    assert terminal_text("a\x1b[31mb\x07\r\x08\x7f\x9b\u202ec") == "a\\x1b[31mb\\x07\\x0d\\x08\\x7f\\x9b\\u202ec"
    kept = "line\n\ttab é 日本 👩\u200d💻 \u00a0"
    assert terminal_text(kept) == kept


PROMPT = "\x1b]0;pwned\x07\x1b[31mred\r"


@pytest.mark.parametrize("stream", [False, True])
def test_run_output_is_exact_to_a_pipe(rt_copy: Path, stream: bool) -> None:
    args = ["--stream"] if stream else []
    res = invoke("run", rt_copy, "--prompt", PROMPT, "--max-new-tokens", "3", "--graph", "portable", *args)
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith(PROMPT)  # not escaped, and click did not strip the ANSI codes


@pytest.mark.parametrize("stream", [False, True])
def test_run_output_is_escaped_on_a_terminal(rt_copy: Path, stream: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(click.testing._NamedTextIOWrapper, "isatty", lambda _self: True)
    args = ["--stream"] if stream else []
    res = invoke("run", rt_copy, "--prompt", PROMPT, "--max-new-tokens", "3", "--graph", "portable", *args)
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith(terminal_text(PROMPT)) and "\x1b" not in res.stdout and "\r" not in res.stdout
