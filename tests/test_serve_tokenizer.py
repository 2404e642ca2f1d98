"""The shipped byte tokenizer: loadable offline by transformers, counting as the server counts."""

from __future__ import annotations

import os
import sys

import pytest

from hetero_sched import cli
from hetero_sched.catalog import get_model
from hetero_sched.serve.tokenizer import (FILES, VOCAB_SIZE, ByteTokenizer, Detokenizer, packaged_tokenizer_dir,
                                          tokenizer_files, write_tokenizer)

TEXTS = ["", "hello world", "héllo wörld 🙂", "tabs\tand\nnewlines  ", "\x00\x7f", "日本語のテキスト"]
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "héllo"},
            {"role": "assistant", "content": "hi"}, {"role": "user", "content": "again\n"}]


@pytest.fixture(scope="module")
def hf_tokenizer():
    os.environ["HF_HUB_OFFLINE"] = "1"                  # must load from the folder, never a hub
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(packaged_tokenizer_dir()))


def test_shipped_files_are_what_the_package_writes(tmp_path):
    assert sorted(p.name for p in packaged_tokenizer_dir().iterdir()) == sorted(FILES)
    for name, text in tokenizer_files().items():
        assert (packaged_tokenizer_dir() / name).read_text(encoding="utf-8") == text, name
    written = write_tokenizer(tmp_path / "tok")
    assert {p.name: p.read_text(encoding="utf-8") for p in written.iterdir()} == tokenizer_files()


def test_vocab_is_exactly_the_tiny_models(hf_tokenizer):
    assert VOCAB_SIZE == get_model("tiny").vocab_size == 256
    assert len(hf_tokenizer) == 256 and hf_tokenizer.vocab_size == 256
    assert hf_tokenizer.eos_token is None and hf_tokenizer.bos_token is None
    assert hf_tokenizer.all_special_ids == []


@pytest.mark.parametrize("text", TEXTS)
def test_ids_are_bytes_and_transformers_agrees(hf_tokenizer, text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert list(ids) == list(text.encode("utf-8"))
    assert hf_tokenizer.encode(text) == list(ids)
    assert tok.decode(ids) == text == hf_tokenizer.decode(list(ids))


def test_chat_template_renders_as_transformers_renders(hf_tokenizer):
    ours = ByteTokenizer().render_chat(MESSAGES)
    assert ours == "system: be brief\nuser: héllo\nassistant: hi\nuser: again\n\nassistant: "
    assert hf_tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == ours
    assert ByteTokenizer().render_chat(MESSAGES, add_generation_prompt=False) == \
        hf_tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=False)


def test_detokenizer_holds_split_characters():
    d = Detokenizer()
    smile = "🙂".encode()
    assert d.push(b"a" + smile[:2]) == "a"
    assert d.push(smile[2:]) == "🙂"
    assert d.push([0xFF]) == "\ufffd"                    # never valid UTF-8
    assert d.push([0xE6]) == "" and d.flush() == "\ufffd"  # cut mid-character at the end


def test_cli_tokenizer_writes_and_locates(tmp_path, monkeypatch, capsys):
    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["hetero-sched", "tokenizer", *args])
        try:
            cli.main()
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        out, err = capsys.readouterr()
        return code, out, err

    assert run() == (0, f"{packaged_tokenizer_dir()}\n", "")
    assert run(str(tmp_path / "t")) == (0, f"{tmp_path / 't'}\n", "")
    assert ByteTokenizer(tmp_path / "t").encode("ab") == (97, 98)
    (tmp_path / "file").write_text("x")
    code, out, err = run(str(tmp_path / "file"))
    assert code == 2 and err.count("\n") == 1 and "not a folder" in err


def test_hf_cache_copy_loads_offline_by_repo_id(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["hetero-sched", "tokenizer", str(tmp_path / "hub"), "--hf-cache"])
    cli.main()
    repo_id = capsys.readouterr().out.strip()
    assert repo_id == "hetero-sched/byte-256"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import snapshot_download
    from transformers import AutoTokenizer

    snapshot = snapshot_download(repo_id, cache_dir=str(tmp_path / "hub"), local_files_only=True)
    tok = AutoTokenizer.from_pretrained(snapshot)
    assert len(tok) == 256 and tok.encode("hé") == list("hé".encode())
