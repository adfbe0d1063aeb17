"""Convert the SentencePiece models shipped with mistral-common into Hugging Face tokenizer files.

Only the writer needs sentencepiece's protobuf module; serving reads the resulting
tokenizer.json with the `tokenizers` library alone (see engine/tokenizer.py).
"""

from __future__ import annotations

import json
from pathlib import Path

# mistral-common's bundled SentencePiece models, by tokenizer version.
SPM_FILES = {
    "v1": "tokenizer.model.v1",  # Mistral-7B v0.1 / v0.2: vocab 32000
    "v3": "mistral_instruct_tokenizer_240323.model.v3",  # v0.3: vocab 32768, [INST] etc.
}

SPACE = "\u2581"  # SentencePiece's "▁": stands for a space inside pieces

# sentencepiece_model.proto ModelProto.SentencePiece.Type
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def spm_model_path(version: str) -> Path:
    """Path of mistral-common's SentencePiece model for `version` ("v1" or "v3")."""
    if version not in SPM_FILES:
        raise ValueError(f"unknown tokenizer version {version!r}; expected one of {sorted(SPM_FILES)}")
    import mistral_common

    path = Path(mistral_common.__file__).parent / "data" / SPM_FILES[version]
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall mistral-common (pip install mistral-common)")
    return path


def load_spm_proto(path: str | Path):
    """Parse a SentencePiece .model file into its ModelProto."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(path).read_bytes())
    return proto


def _check_supported(proto) -> None:
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    # The tokenizers pipeline below reproduces exactly this SentencePiece configuration.
    problems = []
    if trainer.model_type != 2:
        problems.append(f"model_type {trainer.model_type} (only BPE=2 is supported)")
    if not trainer.byte_fallback:
        problems.append("byte_fallback is off")
    if norm.name != "identity" or norm.precompiled_charsmap:
        problems.append(f"normalizer {norm.name!r} (only 'identity' is supported)")
    if not norm.add_dummy_prefix or norm.remove_extra_whitespaces:
        problems.append("whitespace handling other than add_dummy_prefix without remove_extra_whitespaces")
    if trainer.treat_whitespace_as_suffix:
        problems.append("treat_whitespace_as_suffix")
    if problems:
        raise ValueError("unsupported SentencePiece model: " + "; ".join(problems))


def bpe_merges(proto) -> list[tuple[str, str]]:
    """Merges for a tokenizers BPE model, derived from the SentencePiece vocabulary.

    SentencePiece BPE repeatedly joins the adjacent pair whose concatenation is the
    highest-scoring piece. The equivalent merge list holds every split (left, right) of
    every normal piece into two normal pieces, ranked by the joined piece's score
    (higher first), ties by its id.
    """
    normal = {p.piece: (i, p.score) for i, p in enumerate(proto.pieces) if p.type == _NORMAL}
    ranked: list[tuple[float, int, int, int, str, str]] = []
    for piece, (pid, score) in normal.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in normal and right in normal:
                ranked.append((-score, pid, normal[left][0], normal[right][0], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def build_tokenizer_json(proto) -> str:
    """The tokenizer.json text (a `tokenizers` BPE pipeline) equivalent to SentencePiece `proto`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    _check_supported(proto)
    pieces = list(proto.pieces)
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    unk = pieces[proto.trainer_spec.unk_id].piece
    bos = pieces[proto.trainer_spec.bos_id].piece

    tok = Tokenizer(models.BPE(vocab=vocab, merges=bpe_merges(proto), unk_token=unk,
                               byte_fallback=True, fuse_unk=True))
    # SentencePiece's add_dummy_prefix: one "▁" before any non-empty text, spaces become "▁",
    # no pre-splitting (BPE runs over the whole string). A Metaspace pre-tokenizer would not do:
    # it skips the prefix when the text already starts with a space.
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    tok.decoder = decoders.Sequence([
        decoders.Replace(SPACE, " "),
        decoders.ByteFallback(),
        decoders.Fuse(),
        decoders.Strip(" ", 1, 0),  # the dummy-prefix space
    ])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, vocab[bos])])
    # Control pieces (<s>, </s>, [INST], ...) and <unk> never come out of text in SentencePiece:
    # special added tokens. User-defined pieces are matched in text: plain added tokens.
    tok.add_special_tokens([
        AddedToken(p.piece, special=True, normalized=False)
        for p in pieces if p.type in (_CONTROL, _UNKNOWN)])
    user = [AddedToken(p.piece, special=False, normalized=False) for p in pieces if p.type == _USER_DEFINED]
    if user:
        tok.add_tokens(user)
    for p in pieces:
        if tok.token_to_id(p.piece) != vocab[p.piece]:
            raise AssertionError(f"piece {p.piece!r} changed id during conversion")
    return tok.to_str(pretty=True)


def write_tokenizer_files(out_dir: str | Path, version: str = "v3", model_max_length: int = 32768) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json for `version`.

    The files are built from mistral-common's SentencePiece model ("v1": vocab 32000,
    "v3": vocab 32768 with [INST]/[/INST]/... control tokens); encoding text with them
    gives the same ids as mistral-common's SentencePiece encoder.
    """
    proto = load_spm_proto(spm_model_path(version))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pieces = proto.pieces
    unk = pieces[proto.trainer_spec.unk_id].piece
    bos = pieces[proto.trainer_spec.bos_id].piece
    eos = pieces[proto.trainer_spec.eos_id].piece
    (out / "tokenizer.json").write_text(build_tokenizer_json(proto), encoding="utf-8")
    special = {"bos_token": bos, "eos_token": eos, "unk_token": unk}
    config = {
        **special,
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "legacy": False,
        "padding_side": "left",
        # Loads tokenizer.json as written, whatever transformers' Llama classes would rebuild.
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
