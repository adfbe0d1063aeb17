"""Mistral tokenizer: text <-> ids, the Instruct chat format, and streaming detokenization.

Everything here matches mistral-common's SentencePiece tokenizer token for token, but runs
on tokenizer.json with the `tokenizers` library (no sentencepiece at serving time).
engine/spm_to_hf.py writes those files from mistral-common's own models.

Decoding follows SentencePiece's rules, so text is the same as mistral-common's decode:
control tokens are invisible, <unk> reads " ⁇ ", the leading "▁" of the first text piece
is dropped (the dummy-prefix space), and byte-fallback pieces (<0xE4>...) are joined into
UTF-8 characters within a run of byte pieces, each byte that cannot form a valid
character becoming one U+FFFD.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import tokenizers

from engine.spm_to_hf import SPACE, write_tokenizer_files
from scheduler.request import ValidationError

__all__ = ["Tokenizer", "IncrementalDetokenizer", "write_tokenizer_files"]

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_UNK_SURFACE = " \u2047 "  # SentencePiece's default surface of <unk>
_REPLACEMENT = "\ufffd"
_JOIN = "\n\n"  # mistral-common joins system prompts and same-role neighbours with this
_ROLES = ("system", "user", "assistant")

# How a piece decodes.
_TEXT, _BYTE, _CONTROL, _UNK = 0, 1, 2, 3

# Length of the UTF-8 sequence a lead byte starts; 0 for bytes that never start one.
_UTF8_LEN = bytes(1 if b < 0x80 else 0 if b < 0xC0 else 2 if b < 0xE0 else 3 if b < 0xF0
                  else 4 if b < 0xF8 else 0 for b in range(256))


def _utf8_prefix_ok(buf: bytearray) -> bool:
    """Whether `buf` (shorter than its lead byte asks for) can still become a valid character."""
    try:
        codecs.getincrementaldecoder("utf-8")("strict").decode(bytes(buf), final=False)
    except UnicodeDecodeError:
        return False
    return True


def _token_content(value: Any, default: str) -> str:
    # tokenizer_config.json spells special tokens as a string or as {"content": ...}.
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return default


@dataclass(frozen=True)
class _Turn:
    role: str  # "user" or "assistant"
    content: str


class Tokenizer:
    """A Mistral tokenizer ("v1": vocab 32000, "v3": 32768 with [INST]/[/INST] control tokens)."""

    def __init__(self, hf: tokenizers.Tokenizer, bos_token: str = "<s>", eos_token: str = "</s>",
                 unk_token: str = "<unk>") -> None:
        self._hf = hf
        # User text must never turn into control tokens: "[INST]" typed by a user is text.
        hf.encode_special_tokens = True
        hf.no_truncation()  # a prompt is never cut or padded behind the caller's back
        hf.no_padding()
        self.vocab_size: int = hf.get_vocab_size(with_added_tokens=True)
        self.bos_token_id: int = self._require_id(bos_token, "bos_token")
        self.eos_token_id: int = self._require_id(eos_token, "eos_token")
        self.unk_token_id: Optional[int] = hf.token_to_id(unk_token)

        added = hf.get_added_tokens_decoder()
        self.special_ids: frozenset[int] = frozenset(i for i, t in added.items() if t.special)
        self.version: str = "v3" if hf.token_to_id("[INST]") in self.special_ids else "v1"
        if self.version == "v3":
            self.begin_inst_id: Optional[int] = hf.token_to_id("[INST]")
            self.end_inst_id: Optional[int] = self._require_id("[/INST]", "the v3 control token")
        else:
            self.begin_inst_id = self.end_inst_id = None

        # Non-special added tokens (SentencePiece user-defined pieces such as [REFERENCE_DOC_0])
        # are matched in text; see _encode_with_user_pieces.
        self._user_pieces = {t.content: i for i, t in added.items() if not t.special}
        self._user_re = (re.compile("|".join(re.escape(p) for p in sorted(self._user_pieces, key=len, reverse=True)))
                         if self._user_pieces else None)
        self._raw: Optional[tokenizers.Tokenizer] = None

        # Decode tables, one entry per id.
        self._kind = [_TEXT] * self.vocab_size
        self._text = [""] * self.vocab_size
        self._lead_space = [False] * self.vocab_size
        self._byte = [0] * self.vocab_size
        for i in range(self.vocab_size):
            piece = hf.id_to_token(i)
            if piece is None:
                raise ValueError(f"tokenizer.json has no token with id {i} (vocab size {self.vocab_size})")
            if i == self.unk_token_id:
                self._kind[i] = _UNK
            elif i in self.special_ids:
                self._kind[i] = _CONTROL
            elif m := _BYTE_PIECE.fullmatch(piece):
                self._kind[i] = _BYTE
                self._byte[i] = int(m.group(1), 16)
            else:
                self._text[i] = piece.replace(SPACE, " ")
                self._lead_space[i] = piece.startswith(SPACE)

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Load tokenizer.json (+ tokenizer_config.json for the bos/eos/unk tokens) from `path`."""
        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise FileNotFoundError(
                f"{tj} not found; a model directory needs tokenizer.json "
                "(engine.tokenizer.write_tokenizer_files writes one for Mistral v1/v3)")
        config: dict[str, Any] = {}
        cfg_path = path / "tokenizer_config.json"
        if cfg_path.is_file():
            config = json.loads(cfg_path.read_text(encoding="utf-8"))
        return cls(
            tokenizers.Tokenizer.from_file(str(tj)),
            bos_token=_token_content(config.get("bos_token"), "<s>"),
            eos_token=_token_content(config.get("eos_token"), "</s>"),
            unk_token=_token_content(config.get("unk_token"), "<unk>"),
        )

    def _require_id(self, token: str, what: str) -> int:
        tid = self._hf.token_to_id(token)
        if tid is None:
            raise ValueError(f"{what} {token!r} is not in the tokenizer vocabulary")
        return tid

    # ---- text -> ids

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text`, as SentencePiece encodes it. Control tokens never come out of text."""
        if not isinstance(text, str):
            raise ValidationError(f"text to encode must be a string, got {type(text).__name__}")
        try:
            if self._user_re is not None and self._user_re.search(text):
                ids = self._encode_with_user_pieces(text)
            else:
                ids = self._hf.encode(text, add_special_tokens=False).ids
        except TypeError as e:  # e.g. lone surrogates, which are not Unicode scalar values
            raise ValidationError(f"text is not valid Unicode: {e}") from None
        return [self.bos_token_id, *ids] if add_bos else ids

    def _encode_with_user_pieces(self, text: str) -> list[int]:
        # SentencePiece matches user-defined pieces after adding the dummy "▁" and turning
        # spaces into "▁", then runs BPE on the stretches between them; tokenizers' added-token
        # split happens before its normalizer, so do it here on the normalized text.
        if self._raw is None:
            raw = tokenizers.Tokenizer.from_str(self._hf.to_str())
            raw.normalizer = None
            raw.pre_tokenizer = None
            raw.encode_special_tokens = True
            self._raw = raw
        norm = SPACE + text.replace(" ", SPACE)
        ids: list[int] = []
        pos = 0
        for m in self._user_re.finditer(norm):
            if m.start() > pos:
                ids += self._raw.encode(norm[pos:m.start()], add_special_tokens=False).ids
            ids.append(self._user_pieces[m.group()])
            pos = m.end()
        if pos < len(norm):
            ids += self._raw.encode(norm[pos:], add_special_tokens=False).ids
        return ids

    # ---- ids -> text

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` as SentencePiece decodes it (control tokens dropped)."""
        detok = self.detokenizer()
        return "".join([detok.add(i) for i in ids]) + detok.flush()

    def detokenizer(self) -> "IncrementalDetokenizer":
        """A fresh streaming detokenizer for one sequence of output ids."""
        return IncrementalDetokenizer(self)

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary piece of `token_id` (e.g. "▁Hello", "<0x0A>", "[INST]")."""
        piece = self._hf.id_to_token(token_id) if isinstance(token_id, int) and token_id >= 0 else None
        if piece is None:
            raise ValidationError(f"token id {token_id!r} is outside the vocabulary (0..{self.vocab_size - 1})")
        return piece

    # ---- chat

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """Prompt ids of a conversation in the Mistral Instruct format, as mistral-common encodes it.

        `messages` are {"role": "system" | "user" | "assistant", "content": str}. As in
        mistral-common: consecutive messages of one role are merged ("\\n\\n"), system
        messages are gathered into one system prompt put before the last user message (v3) or
        the first one (v1), and a conversation not starting with a user turn gets an empty one.
        With add_generation_prompt the conversation must end on a user turn (the reply comes
        next); without it, it may end on an assistant turn, closed with </s>.

        Text is encoded segment by segment around control-token ids. In v3, [INST]/[/INST]
        are single control tokens; v1 has none, and mistral-common v1 encodes
        "[INST] {content} [/INST]" as one piece of text, which is reproduced here exactly
        (in v1 the markers are text whoever types them). BOS and EOS are always ids.
        """
        system_prompt, turns = _normalize_chat(messages, add_generation_prompt)
        user_idx = [i for i, t in enumerate(turns) if t.role == "user"]
        # v3 puts the system prompt in the last user message, v1 in the first.
        sys_idx = user_idx[-1] if self.version == "v3" else user_idx[0]
        ids = [self.bos_token_id]
        for i, turn in enumerate(turns):
            if turn.role == "user":
                content = turn.content
                if i == sys_idx and system_prompt:
                    content = system_prompt + _JOIN + content
                if self.version == "v3":
                    ids += [self.begin_inst_id, *self.encode(content), self.end_inst_id]
                else:
                    ids += self.encode(f"[INST] {content} [/INST]")
            else:
                # v3 (mistral-common InstructTokenizerV2+) drops trailing spaces of replies; v1 does not.
                content = turn.content.rstrip(" ") if self.version == "v3" else turn.content
                ids += [*self.encode(content), self.eos_token_id]
        return ids


def _field(message: Any, name: str, index: int) -> Any:
    if isinstance(message, Mapping):
        if name not in message:
            raise ValidationError(f"message {index} has no {name!r}")
        return message[name]
    if hasattr(message, name):
        return getattr(message, name)
    raise ValidationError(f"message {index} must be a mapping with 'role' and 'content', "
                          f"got {type(message).__name__}")


def _normalize_chat(messages: Sequence[Mapping[str, Any]],
                    add_generation_prompt: bool) -> tuple[Optional[str], list[_Turn]]:
    """Validate a conversation and normalize it the way mistral-common (1.x, v1-v3) does.

    Returns the system prompt (None when there is none) and the user/assistant turns,
    merged by role, starting with a user turn.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValidationError(f"messages must be a list of {{'role', 'content'}}, got {type(messages).__name__}")
    if len(messages) == 0:
        raise ValidationError("messages must not be empty")
    roles: list[str] = []
    contents: list[str] = []
    for i, m in enumerate(messages):
        role, content = _field(m, "role", i), _field(m, "content", i)
        if role not in _ROLES:
            raise ValidationError(f"message {i} has unknown role {role!r}; expected one of {', '.join(_ROLES)}")
        if not isinstance(content, str):
            raise ValidationError(f"message {i} ({role}) content must be a string, got {type(content).__name__}")
        if role == "assistant" and not content:
            raise ValidationError(f"message {i} (assistant) has empty content")
        if i > 0 and role == "system" and roles[-1] == "assistant":
            raise ValidationError(f"message {i}: a system message cannot follow an assistant message")
        roles.append(role)
        contents.append(content)
    if len(messages) == 1 and roles[0] == "assistant":
        raise ValidationError("a conversation must start with a user or system message, got a lone assistant message")
    if add_generation_prompt and roles[-1] == "assistant":
        raise ValidationError("the conversation must end with a user message to generate a reply "
                              "(the last message is from the assistant)")

    system_prompt = _JOIN.join(c for r, c in zip(roles, contents) if r == "system" and c) or None
    # Merge runs of one role; a system message ends a run (it is not merged across).
    turns: list[_Turn] = []
    run_role: Optional[str] = None
    run: list[str] = []
    for role, content in [*zip(roles, contents), (None, "")]:
        if role != run_role:
            if run_role in ("user", "assistant"):
                turns.append(_Turn(run_role, _JOIN.join(c for c in run if c)))
            run_role, run = role, []
        run.append(content)
    if not turns or turns[0].role != "user":
        turns.insert(0, _Turn("user", ""))
    return system_prompt, turns


class IncrementalDetokenizer:
    """Streams the text of a sequence of token ids, one token at a time.

    add() returns only newly completed text and never a broken UTF-8 character: byte-fallback
    pieces wait until they form a whole character (or provably cannot: then each bad byte
    becomes U+FFFD, as in decode). flush() returns what is still held at the end. The
    concatenation of every add() and the final flush() equals Tokenizer.decode(ids) exactly.

    Leading space: as in decode(ids), the first text piece loses its leading "▁" (the
    SentencePiece dummy prefix), so a reply "▁Hello▁world" streams as "Hello", " world".
    Each add() does O(1) work: a table lookup and at most 4 pending bytes.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self._pending = bytearray()  # bytes of a character not complete yet
        self._strip_space = True  # SentencePiece's is_bos_ws: nothing visible decoded yet
        self._space_stripped = False  # the previous piece gave up its leading "▁"
        self._emitted = False

    def add(self, token_id: int) -> str:
        """Feed one token id; return the new complete text."""
        tok = self._tok
        if not (isinstance(token_id, int) and 0 <= token_id < tok.vocab_size):
            raise ValidationError(f"token id {token_id!r} is outside the vocabulary (0..{tok.vocab_size - 1})")
        kind = tok._kind[token_id]
        if kind == _BYTE:
            self._pending.append(tok._byte[token_id])
            out = self._drain(final=False)
        else:
            # Any other piece ends a run of byte pieces.
            out = self._drain(final=True) if self._pending else ""
            if self._space_stripped or self._emitted or out:
                self._strip_space = False
            self._space_stripped = False
            if kind == _TEXT:
                text = tok._text[token_id]
                if self._strip_space and tok._lead_space[token_id]:
                    text = text[1:]
                    self._space_stripped = True
                out += text
            elif kind == _UNK:
                out += _UNK_SURFACE
        if out:
            self._emitted = True
        return out

    def flush(self) -> str:
        """Text still held at the end of the sequence (an unfinished character becomes U+FFFD)."""
        out = self._drain(final=True)
        if out:
            self._emitted = True
        return out

    def _drain(self, final: bool) -> str:
        # SentencePiece decodes a byte run one character at a time: a valid character, or
        # else U+FFFD for its first byte and a retry from the next one.
        buf = self._pending
        out = []
        while buf:
            n = _UTF8_LEN[buf[0]]
            if n and len(buf) >= n:
                try:
                    out.append(buf[:n].decode("utf-8"))
                    del buf[:n]
                    continue
                except UnicodeDecodeError:
                    pass
            elif n and not final and _utf8_prefix_ok(buf):
                break  # may still complete with the next byte piece
            out.append(_REPLACEMENT)
            del buf[:1]
        return "".join(out)
