"""The byte-level tokenizer of the tiny Llama (vocabulary exactly 256), as Hugging Face files.

Token id ``b`` is the byte ``b``: a prompt of ``n`` UTF-8 bytes is ``n`` tokens, any token
sequence decodes (invalid UTF-8 becomes U+FFFD), and the ``tiny`` model's 256-entry embedding
covers it exactly. The files (``tokenizer.json``: a byte-level BPE with no merges,
``tokenizer_config.json`` with the chat template, ``special_tokens_map.json``) load with
``tokenizers.Tokenizer.from_file`` and ``transformers.AutoTokenizer.from_pretrained(dir)`` --
offline, which is how load generators (aiperf, guidellm) get the same token counts as the server.

**No special tokens, no EOS.** All 256 ids are bytes, so there is no room for BOS/EOS without
stealing a byte; a request always ends at ``max_tokens`` (``finish_reason: length``), as
``ignore_eos`` would make it anyway -- the benchmarking default, and what lets the scheduler
know every request's output length at arrival. The chat template is plain text
(``role: content`` lines, then ``assistant: ``), rendered by the server from the shipped file
exactly as Hugging Face renders it.
"""

from __future__ import annotations

import codecs
import hashlib
import json
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

VOCAB_SIZE = 256
"""Every byte value, nothing else (the ``tiny`` model's ``vocab_size``)."""

CHAT_TEMPLATE = ("{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")
"""One ``role: content`` line per message, then ``assistant: `` when a reply is wanted."""

PLACEHOLDER = b"token "
"""Text of the placeholder output (``placeholder_token_ids``): ASCII, so re-tokenizing a
placeholder reply gives back exactly as many tokens as were generated."""

FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

HF_REPO_ID = "hetero-sched/byte-256"
"""The repository id :func:`write_hf_cache` files the tokenizer under."""


def _byte_chars() -> list[str]:
    """GPT-2's byte -> printable character table (what the ByteLevel pre-tokenizer emits)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(VOCAB_SIZE):
        if b not in chars:
            chars[b] = chr(VOCAB_SIZE + extra)
            extra += 1
    return [chars[b] for b in range(VOCAB_SIZE)]


def tokenizer_files() -> dict[str, str]:
    """The tokenizer's files, name -> text (deterministic: the shipped copies are exactly these)."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    tokenizer: dict[str, Any] = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
        "pre_tokenizer": byte_level, "post_processor": None, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {c: i for i, c in enumerate(_byte_chars())}, "merges": []},
    }
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 30,
              "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False,
              "bos_token": None, "eos_token": None, "pad_token": None, "unk_token": None,
              "chat_template": CHAT_TEMPLATE}
    dump = lambda obj: json.dumps(obj, indent=1, ensure_ascii=False) + "\n"  # noqa: E731
    return {"tokenizer.json": dump(tokenizer), "tokenizer_config.json": dump(config), "special_tokens_map.json": dump({})}


def write_tokenizer(folder: Path) -> Path:
    """Write the tokenizer's files into ``folder`` (created); returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in tokenizer_files().items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def write_hf_cache(cache_dir: Path, repo_id: str = HF_REPO_ID) -> str:
    """File the tokenizer in a Hugging Face hub cache folder as ``repo_id``; returns the id.

    For tools that resolve only hub ids when offline: aiperf 0.13 loads a tokenizer in offline
    workers through ``snapshot_download(local_files_only=True)``, which refuses a plain folder
    (aiperf PR #1339). With ``HF_HUB_OFFLINE=1 HF_HUB_CACHE=cache_dir``, ``--tokenizer repo_id``
    then loads these files with no network. The snapshot's name is a hash of the files.
    """
    files = tokenizer_files()
    commit = hashlib.sha1("".join(files[name] for name in FILES).encode()).hexdigest()
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    write_tokenizer(repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit, encoding="utf-8")
    return repo_id


def packaged_tokenizer_dir() -> Path:
    """The copy shipped inside the package (``hetero_sched/data/tokenizer``)."""
    return Path(str(resources.files("hetero_sched") / "data" / "tokenizer"))


def placeholder_token_ids(start: int, count: int) -> tuple[int, ...]:
    """Output tokens ``start .. start+count-1`` of a placeholder reply (the modeled backend's text)."""
    n = len(PLACEHOLDER)
    return tuple(PLACEHOLDER[(start + i) % n] for i in range(count))


class Detokenizer:
    """Streams token ids to text: bytes that end mid-character wait for the rest."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_ids: Sequence[int]) -> str:
        """Text completed by these tokens."""
        return self._decoder.decode(bytes(token_ids))

    def flush(self) -> str:
        """What is left at the end of the stream (an incomplete character becomes U+FFFD)."""
        return self._decoder.decode(b"", final=True)


class ByteTokenizer:
    """The tokenizer loaded from its files (default: the packaged copy); the server counts with it."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = Path(folder) if folder is not None else packaged_tokenizer_dir()
        self._tokenizer = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        if self._tokenizer.get_vocab_size() != VOCAB_SIZE:
            raise ValueError(f"{self.folder}: vocabulary of {self._tokenizer.get_vocab_size()}, expected {VOCAB_SIZE}")
        config = json.loads((self.folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        self.chat_template: str = config["chat_template"]

    @cached_property
    def _template(self) -> Any:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)  # as transformers renders it
        return env.from_string(self.chat_template)

    def encode(self, text: str) -> tuple[int, ...]:
        """Token ids of ``text`` (no special tokens: there are none)."""
        return tuple(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of ``token_ids``."""
        return self._tokenizer.decode(list(token_ids), skip_special_tokens=False)

    def render_chat(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text of a chat, from the shipped template (messages: ``role``, ``content`` strings)."""
        return str(self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt))
