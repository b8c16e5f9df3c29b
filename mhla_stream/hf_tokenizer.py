"""SentencePiece BPE ``tokenizer.model`` -> a ``tokenizers`` ``tokenizer.json`` with the same ids.

Plain transformers (``AutoTokenizer``) then reads the folder without sentencepiece or protobuf.
The pieces follow sentencepiece's own encoder:

* normalization: identity, or the model's precompiled character map (e.g. nmt_nfkc); extra
  whitespace collapsed and stripped only when the model says so;
* one dummy-prefix space added in front of the text (always, even if the text starts with one),
  spaces written as U+2581;
* decoding keeps the dummy-prefix space (see below);
* BPE over the whole text where the merge order is the merged piece's score (sentencepiece merges
  the pair whose result scores highest); unknown characters fall back to ``<0xXX>`` byte pieces.
  No piece has U+2581 inside it, so splitting words in front of each U+2581 changes nothing and
  keeps the encoder fast on long texts.

Reading the model proto needs protobuf at save time only.
"""
from __future__ import annotations

import json
import os

SPACE = "\u2581"


def _model_proto(path):
    from sentencepiece import sentencepiece_model_pb2 as pb
    proto = pb.ModelProto()
    with open(path, "rb") as f:
        proto.ParseFromString(f.read())
    return proto


class TokenizerConversionError(ValueError):
    pass


def convert_sentencepiece(path):
    """A ``tokenizers.Tokenizer`` equal to the SentencePiece BPE model at ``path`` (ids and text),
    and its special tokens. A file that cannot be converted raises one clear error."""
    try:
        return _convert(path)
    except TokenizerConversionError:
        raise
    except Exception as e:  # unreadable or damaged file, a model kind that does not convert
        raise TokenizerConversionError(f"{path}: cannot convert the SentencePiece tokenizer "
                                       f"({type(e).__name__}: {e})") from None


def _convert(path):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    proto = _model_proto(path)
    if proto.trainer_spec.model_type != 2:  # 2 = BPE in sentencepiece's enum
        raise TokenizerConversionError(f"{path}: only SentencePiece BPE models convert (model_type {proto.trainer_spec.model_type})")
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    # merges: every split of a normal piece into two pieces of the vocabulary, ordered by the score of
    # the merged piece (higher first), then by id, which is how sentencepiece breaks ties
    normal = 1
    merges = []
    for i, (piece, score, kind) in enumerate(pieces):
        if kind != normal or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((-score, i, vocab[left], vocab[right], left, right))
    merges.sort()
    unk = proto.trainer_spec.unk_piece or "<unk>"
    model = BPE(vocab=vocab, merges=[(m[4], m[5]) for m in merges], unk_token=unk, fuse_unk=True,
                byte_fallback=proto.trainer_spec.byte_fallback)
    tok = Tokenizer(model)

    spec = proto.normalizer_spec
    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Strip(left=True, right=True)]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(SPACE))
    steps.append(normalizers.Replace(" ", SPACE))
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.Split(SPACE, behavior="merged_with_next")
    # The dummy-prefix space is kept on decode (sentencepiece drops it): transformers' pipeline and
    # TextStreamer decode the new tokens alone and append them to the prompt, so a stripped space would
    # glue the first new word to the prompt. Decoded text thus equals the runtime's streamed text.
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])

    specials = [p for p, _, kind in pieces if kind in (2, 3)]  # unknown, control
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in specials])
    bos_id, eos_id = proto.trainer_spec.bos_id, proto.trainer_spec.eos_id
    bos = pieces[bos_id][0] if bos_id >= 0 else None
    eos = pieces[eos_id][0] if eos_id >= 0 else None
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, bos_id)])
    return tok, {"bos": bos, "eos": eos, "unk": unk}


def write_tokenizer_files(sp_path, directory, model_max_length: int | None = None, converted=None) -> None:
    """``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` next to the model
    (``converted``: the result of ``convert_sentencepiece`` when the caller already has it)."""
    tok, special = converted or convert_sentencepiece(sp_path)
    tok.save(os.path.join(directory, "tokenizer.json"))
    named = {f"{k}_token": v for k, v in special.items() if v is not None}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **named, "add_bos_token": special["bos"] is not None,
              "add_eos_token": False, "clean_up_tokenization_spaces": False, "legacy": False,
              "model_max_length": model_max_length or 1_000_000_000}
    for name, data in (("tokenizer_config.json", config), ("special_tokens_map.json", named)):
        with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, ensure_ascii=False)
            f.write("\n")
