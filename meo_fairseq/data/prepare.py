"""Read, validate and sentencepiece-encode the raw data sets (XSum, SQuAD v1.1, WikiText).

This is the Python half of ``scripts/prepare_{xsum,squad,wikitext}.sh``: the shell scripts handle
arguments, the staging directory, the stamp file and ``fairseq-preprocess``; this module does the
reading, validation, sentencepiece training and encoding.

It imports neither torch nor fairseq, and none of the rest of ``meo_fairseq``: the scripts run it
as a file (``python meo_fairseq/data/prepare.py SUBCOMMAND ...``) so that the package ``__init__``
(which registers fairseq models) is not imported either.

Conventions shared by all data sets:

* Every text field is whitespace-normalised (``" ".join(text.split())``) so that one example is one
  line; XSum documents, for instance, contain newlines.
* One sentencepiece model (unigram) is trained per data set, on the training split only, and shared
  by source and target. Training is deterministic: one thread, fixed seed, input given in file order
  (a deterministic sample when the text is larger than ``--spm-max-chars``).
* The fairseq dictionary is the sentencepiece vocabulary minus the pieces fairseq adds itself
  (``<unk>``, ``<s>``, ``</s>``), in sentencepiece order, so every piece maps to a dictionary entry.
* Bad input raises :class:`DataError`, whose message starts with ``FILE:LINE:`` (or ``FILE:`` plus a
  JSON path for errors inside a whole-file JSON document such as SQuAD).
"""

from __future__ import annotations

import argparse
import bisect
import io
import json
import os
import random
import re
import sys
import zipfile
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

SPLITS = ("train", "valid", "test")

#: Pieces fairseq's Dictionary defines itself; never written to dict.txt.
FAIRSEQ_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")

#: Separator between question and context in the SQuAD source (a sentencepiece user symbol).
SQUAD_SEP = "<sep>"

SPM_SEED = 1234
#: Upper bound on the characters of text sentencepiece is trained on (sampled deterministically
#: beyond it). 50M characters keeps training memory at a few GB on the full data sets.
SPM_MAX_CHARS = 50_000_000
#: Training lines longer than this are cut at spaces into chunks (sentencepiece skips very long
#: "sentences"; an XSum document or a WikiText paragraph is one line here).
SPM_CHUNK_CHARS = 4000


class DataError(Exception):
    """Invalid input data; the message names the file and, where there is one, the line."""

    def __init__(self, path: str, message: str, line: Optional[int] = None):
        self.path = str(path)
        self.line = line
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {message}")


def normalize_whitespace(text: str) -> str:
    """Collapse every run of (Unicode) whitespace, newlines included, to one space; strip ends."""
    return " ".join(text.split())


# --------------------------------------------------------------------------------------------
# Reading and validating
# --------------------------------------------------------------------------------------------


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise DataError(path, "file not found")
    if not os.path.isfile(path):
        raise DataError(path, "not a regular file")
    if os.path.getsize(path) == 0:
        raise DataError(path, "file is empty")


def iter_text_lines(path: str) -> Iterator[Tuple[int, str]]:
    """Yield ``(line_number, line)`` (1-based, newline stripped) of a UTF-8 text file.

    Lines are split the way fairseq-preprocess splits them (Python text mode: ``\\n``, ``\\r\\n``
    or ``\\r``). Undecodable bytes raise :class:`DataError` naming the line.
    """
    _check_file(path)
    lineno = 0
    with open(path, "rb") as f:
        for chunk in f:  # split at b"\n"; splitlines() then also splits at a lone b"\r"
            for raw in chunk.splitlines() or [b""]:
                lineno += 1
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(
                        path, f"not valid UTF-8 ({e.reason} at byte {e.start} of the line)", lineno
                    )
                if lineno == 1 and line.startswith("\ufeff"):
                    line = line[1:]
                yield lineno, line


def check_text_file(path: str) -> int:
    """Validate a plain text split file (exists, non-empty, UTF-8, some non-blank line).

    Returns the number of lines (as fairseq-preprocess will count them).
    """
    n = 0
    nonblank = False
    for lineno, line in iter_text_lines(path):
        n = lineno
        nonblank = nonblank or bool(line.strip())
    if not nonblank:
        raise DataError(path, "file is empty (no non-blank line)")
    return n


def _as_id(value, path: str, lineno: Optional[int], where: str = "") -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(path, f"{where}field 'id' must be a string, got {type(value).__name__}", lineno)
    value = str(value)
    if not value or value != value.strip() or len(value.split()) != 1:
        raise DataError(
            path, f"{where}field 'id' must be non-empty and contain no whitespace: {value!r}", lineno
        )
    return value


def read_jsonl(path: str, fields: Sequence[str] = ("id", "document", "summary")) -> List[dict]:
    """Read a JSON-lines file of objects that must have the string ``fields`` (``id`` unique).

    Blank lines are ignored. Every record gets ``_line``, its line number. Errors name file and line.
    """
    records: List[dict] = []
    seen = {}
    for lineno, line in iter_text_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(path, f"malformed JSON line: {e.msg} (column {e.colno})", lineno)
        if not isinstance(obj, dict):
            raise DataError(path, f"expected a JSON object, got {type(obj).__name__}", lineno)
        rec = {"_line": lineno}
        for field in fields:
            if field not in obj:
                raise DataError(path, f"missing field {field!r}", lineno)
            value = obj[field]
            if field == "id":
                value = _as_id(value, path, lineno)
                if value in seen:
                    raise DataError(path, f"duplicate id {value!r} (first on line {seen[value]})", lineno)
                seen[value] = lineno
            elif not isinstance(value, str):
                raise DataError(path, f"field {field!r} must be a string, got {type(value).__name__}", lineno)
            rec[field] = value
        records.append(rec)
    if not records:
        raise DataError(path, "file is empty (no JSON lines)")
    return records


def read_squad(path: str, need_answer_positions: bool = True) -> List[dict]:
    """Read a SQuAD v1.1 JSON file into a flat list of questions.

    Each item: ``id``, ``question``, ``context`` (the paragraph, shared between its questions),
    ``answers`` (list of ``(text, start)``; ``start`` is a character offset into ``context``, checked
    against the text when ``need_answer_positions``; a wrong offset is repaired to the nearest
    occurrence of the text, an answer not in the context at all is an error).
    """
    _check_file(path)
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(path, f"not valid UTF-8 ({e.reason})", line)
    if not text.strip():
        raise DataError(path, "file is empty")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, f"malformed JSON: {e.msg} (column {e.colno})", e.lineno)

    def need(obj, key, typ, where):
        if not isinstance(obj, dict):
            raise DataError(path, f"{where}: expected a JSON object, got {type(obj).__name__}")
        if key not in obj:
            raise DataError(path, f"{where}: missing field {key!r}")
        value = obj[key]
        ok = isinstance(value, typ) and not (typ is int and isinstance(value, bool))
        if not ok:
            raise DataError(path, f"{where}.{key}: expected {typ.__name__}, got {type(value).__name__}")
        return value

    questions: List[dict] = []
    seen = {}
    for i, article in enumerate(need(doc, "data", list, "top level")):
        for j, para in enumerate(need(article, "paragraphs", list, f"data[{i}]")):
            pwhere = f"data[{i}].paragraphs[{j}]"
            context = need(para, "context", str, pwhere)
            for k, qa in enumerate(need(para, "qas", list, pwhere)):
                where = f"{pwhere}.qas[{k}]"
                if not isinstance(qa, dict) or "id" not in qa:
                    need(qa, "id", str, where)  # raises with the right message
                qid = _as_id(qa["id"], path, None, f"{where}: ")
                if qid in seen:
                    raise DataError(path, f"{where}: duplicate question id {qid!r} (first at {seen[qid]})")
                seen[qid] = where
                question = need(qa, "question", str, where)
                answers = []
                for m, ans in enumerate(need(qa, "answers", list, where)):
                    awhere = f"{where}.answers[{m}]"
                    atext = need(ans, "text", str, awhere)
                    if need_answer_positions:
                        start = need(ans, "answer_start", int, awhere)
                    else:  # dev: positions only feed the statistics; -1 = unknown
                        start = ans.get("answer_start", -1)
                        start = start if isinstance(start, int) and not isinstance(start, bool) else -1
                    if need_answer_positions and context[start : start + len(atext)] != atext:
                        start = _nearest_occurrence(context, atext, start)
                        if start < 0:
                            raise DataError(
                                path, f"{awhere}: answer text {atext!r} does not occur in the context"
                            )
                    answers.append((atext, start))
                if not answers:
                    raise DataError(path, f"{where}: no answers (SQuAD v1.1 questions all have at least one)")
                questions.append({"id": qid, "question": question, "context": context, "answers": answers})
    if not questions:
        raise DataError(path, "no questions in the file")
    return questions


def _nearest_occurrence(haystack: str, needle: str, near: int) -> int:
    if not needle:
        return -1
    best, pos = -1, haystack.find(needle)
    while pos >= 0:
        if best < 0 or abs(pos - near) < abs(best - near):
            best = pos
        pos = haystack.find(needle, pos + 1)
    return best


def find_split_file(raw_dir: str, candidates: Sequence[str], split: str) -> str:
    """The one existing file among ``candidates`` in ``raw_dir``; DataError if none or several."""
    present = [c for c in candidates if os.path.exists(os.path.join(raw_dir, c))]
    if not present:
        alt = f" (or {', '.join(candidates[1:])})" if len(candidates) > 1 else ""
        raise DataError(os.path.join(raw_dir, candidates[0]), f"missing {split} split file{alt}")
    if len(present) > 1:
        raise DataError(raw_dir, f"ambiguous {split} split: both {' and '.join(present)} exist")
    return os.path.join(raw_dir, present[0])


# --------------------------------------------------------------------------------------------
# sentencepiece
# --------------------------------------------------------------------------------------------


def _chunks(line: str, size: int = SPM_CHUNK_CHARS) -> Iterator[str]:
    while len(line) > size:
        cut = line.rfind(" ", 0, size)
        if cut <= 0:
            cut = size
        yield line[:cut]
        line = line[cut:].lstrip()
    if line:
        yield line


def train_sentencepiece(
    texts: Iterable[str],
    vocab_size: int,
    user_defined_symbols: Sequence[str] = (),
    max_chars: int = SPM_MAX_CHARS,
    seed: int = SPM_SEED,
    character_coverage: float = 0.9995,
) -> bytes:
    """Train a unigram sentencepiece model deterministically; return the serialized model.

    The model is trained from memory (no file names end up inside it), with one thread and a fixed
    seed. If the text exceeds ``max_chars`` characters a fixed-seed random sample of lines is used.
    """
    import sentencepiece as spm

    lines = [c for t in texts for c in _chunks(normalize_whitespace(t))]
    if not lines:
        raise ValueError("no training text for sentencepiece")
    total = sum(len(x) for x in lines)
    if total > max_chars:
        order = list(range(len(lines)))
        random.Random(seed).shuffle(order)
        keep, n = [], 0
        for i in order:
            if n >= max_chars:
                break
            keep.append(i)
            n += len(lines[i])
        lines = [lines[i] for i in sorted(keep)]
        print(
            f"[prepare] sentencepiece: sampled {len(lines)} lines ({n} of {total} characters)",
            file=sys.stderr,
        )
    spm.set_random_generator_seed(seed)
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=buf,
            model_type="unigram",
            vocab_size=vocab_size,
            character_coverage=character_coverage,
            user_defined_symbols=list(user_defined_symbols),
            num_threads=1,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            max_sentence_length=4 * SPM_CHUNK_CHARS + 16,
            minloglevel=1,
        )
    except RuntimeError as e:
        raise ValueError(f"sentencepiece training failed: {e} (try a smaller --vocab-size)") from e
    return buf.getvalue()


def load_sentencepiece(model: bytes | str):
    import sentencepiece as spm

    if isinstance(model, bytes):
        return spm.SentencePieceProcessor(model_proto=model)
    return spm.SentencePieceProcessor(model_file=model)


def write_spm_files(model_proto: bytes, out_dir: str, dict_path: str) -> None:
    """Write ``spm.model``, ``spm.vocab`` (piece<TAB>score) into ``out_dir`` and the fairseq dict."""
    sp = load_sentencepiece(model_proto)
    with open(os.path.join(out_dir, "spm.model"), "wb") as f:
        f.write(model_proto)
    with open(os.path.join(out_dir, "spm.vocab"), "w", encoding="utf-8", newline="\n") as f:
        for i in range(sp.get_piece_size()):
            f.write(f"{sp.id_to_piece(i)}\t{sp.get_score(i):.6g}\n")
    write_fairseq_dict(sp, dict_path)


def write_fairseq_dict(sp, path: str) -> int:
    """fairseq ``dict.txt`` (``piece count`` lines) from a sentencepiece model, in spm order.

    Control/unknown pieces are left out (fairseq adds ``<s> <pad> </s> <unk>`` itself). The count is
    a decreasing rank, only so that the file looks like a frequency-sorted fairseq dict.
    """
    n = sp.get_piece_size()
    written = 0
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for i in range(n):
            piece = sp.id_to_piece(i)
            if sp.is_control(i) or sp.is_unknown(i) or piece in FAIRSEQ_SPECIALS:
                continue
            f.write(f"{piece} {n - i}\n")
            written += 1
    return written


def encode_pieces(sp, texts: Sequence[str], workers: int = 1) -> List[List[str]]:
    """Encode (already whitespace-normalised) texts into sentencepiece pieces."""
    return sp.encode(list(texts), out_type=str, num_threads=max(1, workers))


def encode_to_file(sp, texts: Sequence[str], path: str, workers: int = 1, batch: int = 2048) -> int:
    """Encode texts and write one line of space-separated pieces per text (in batches)."""
    n = 0
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for start in range(0, len(texts), batch):
            for pieces in encode_pieces(sp, texts[start : start + batch], workers):
                f.write(" ".join(pieces) + "\n")
                n += 1
    return n


def write_lines(path: str, lines: Iterable[str]) -> int:
    n = 0
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for line in lines:
            if "\n" in line or "\r" in line:
                raise AssertionError(f"line break inside an output line of {path}")
            f.write(line + "\n")
            n += 1
    return n


# --------------------------------------------------------------------------------------------
# XSum
# --------------------------------------------------------------------------------------------

XSUM_FILES = {
    "train": ("train.jsonl",),
    "valid": ("validation.jsonl", "valid.jsonl"),
    "test": ("test.jsonl",),
}


def xsum_input_files(raw_dir: str) -> List[str]:
    return [find_split_file(raw_dir, XSUM_FILES[s], s) for s in SPLITS]


def prepare_xsum(raw_dir: str, out_dir: str, text_dir: str, vocab_size: int, workers: int = 1) -> None:
    """XSum JSON lines -> spm model, encoded ``{split}.{src,tgt}`` (in text_dir), ids and references.

    out_dir gets: spm.model, spm.vocab, {train,valid,test}.id, {valid,test}.tgt.raw.
    text_dir gets: dict.txt and {train,valid,test}.{src,tgt} (pieces) for fairseq-preprocess.
    """
    data = {}
    for split, path in zip(SPLITS, xsum_input_files(raw_dir)):
        data[split] = (path, read_jsonl(path, ("id", "document", "summary")))  # all validated first
    src = {s: [normalize_whitespace(r["document"]) for r in recs] for s, (_, recs) in data.items()}
    tgt = {s: [normalize_whitespace(r["summary"]) for r in recs] for s, (_, recs) in data.items()}
    for split in SPLITS:
        n_empty = sum(1 for a, b in zip(src[split], tgt[split]) if not a or not b)
        if n_empty:
            print(
                f"[prepare] warning: {data[split][0]}: {n_empty} examples with an empty document "
                "or summary (kept)",
                file=sys.stderr,
            )
    proto = train_sentencepiece(src["train"] + tgt["train"], vocab_size)
    write_spm_files(proto, out_dir, os.path.join(text_dir, "dict.txt"))
    sp = load_sentencepiece(proto)
    for split in SPLITS:
        path, recs = data[split]
        write_lines(os.path.join(out_dir, f"{split}.id"), (r["id"] for r in recs))
        for side, texts in (("src", src[split]), ("tgt", tgt[split])):
            encode_to_file(sp, texts, os.path.join(text_dir, f"{split}.{side}"), workers)
        if split != "train":
            write_lines(os.path.join(out_dir, f"{split}.tgt.raw"), tgt[split])
        print(f"[prepare] {split}: {len(recs)} pairs from {path}", file=sys.stderr)


# --------------------------------------------------------------------------------------------
# SQuAD v1.1
# --------------------------------------------------------------------------------------------

SQUAD_FILES = {"train": "train-v1.1.json", "dev": "dev-v1.1.json"}


def squad_input_files(raw_dir: str) -> List[str]:
    return [find_split_file(raw_dir, (SQUAD_FILES[s],), s) for s in ("train", "dev")]


def _words(context: str) -> List[Tuple[int, int, str]]:
    return [(m.start(), m.end(), m.group()) for m in re.finditer(r"\S+", context)]


def choose_window(
    counts: Sequence[int], budget: int, answer: Optional[Tuple[int, int]] = None
) -> Tuple[int, int]:
    """Choose the context window, a word range ``[start, end)`` whose pieces fit in ``budget``.

    ``counts`` are the sentencepiece pieces per word. Candidate windows are those of the sliding
    "doc stride" grid: the first starts at word 0; each next one starts at the first word at least
    half a budget (in pieces) after the previous start; each is as long as fits. Without ``answer``
    (dev/test, where the answer is unknown at inference time) the first window is returned. With
    ``answer`` (a word range, for training) the first window that contains it whole is returned,
    or, if none does (an answer longer than the budget), the window starting at the answer.
    """
    n = len(counts)
    prefix = [0]
    for c in counts:
        prefix.append(prefix[-1] + c)

    def end_from(start: int) -> int:
        end = bisect.bisect_right(prefix, prefix[start] + budget) - 1
        return max(end, min(start + 1, n))

    if prefix[-1] <= budget:
        return 0, n
    start = 0
    while True:
        end = end_from(start)
        if answer is None or (start <= answer[0] and answer[1] <= end):
            return start, end
        if end >= n or start > answer[0]:
            break
        nxt = bisect.bisect_left(prefix, prefix[start] + max(1, budget // 2))
        start = max(start + 1, min(nxt, n - 1))
    return answer[0], end_from(answer[0])


def squad_source_pieces(
    sp, question: str, context: str, max_source_tokens: int, answer_span=None, cache=None
):
    """Pieces of ``question <sep> context-window`` (at most ``max_source_tokens - 1`` of them).

    Returns ``(pieces, (char_start, char_end), truncated)``: the window's character range in the
    context. Questions longer than half the budget are cut. See :func:`choose_window`.
    """
    limit = max_source_tokens - 1  # fairseq appends </s>
    q = sp.encode(normalize_whitespace(question), out_type=str)[: max(1, limit // 2)]
    budget = max(1, limit - len(q) - 1)
    if cache is not None and context in cache:
        words, word_pieces = cache[context]
    else:
        words = _words(context)
        word_pieces = sp.encode([w for _, _, w in words], out_type=str) if words else []
        if cache is not None:
            cache.clear()  # questions of one paragraph are consecutive
            cache[context] = (words, word_pieces)
    answer_words = None
    if answer_span is not None and words:
        a0, a1 = answer_span
        inside = [i for i, (s, e, _) in enumerate(words) if s < a1 and e > a0]
        if inside:
            answer_words = (inside[0], inside[-1] + 1)
    start, end = choose_window([len(p) for p in word_pieces], budget, answer_words)
    ctx = [p for wp in word_pieces[start:end] for p in wp][:budget]
    span = (words[start][0], words[end - 1][1]) if words else (0, 0)
    truncated = end - start < len(words)
    return q + [SQUAD_SEP] + ctx, span, truncated


def squad_input_text(question: str, context: str) -> str:
    return f"{normalize_whitespace(question)} {SQUAD_SEP} {normalize_whitespace(context)}"


def prepare_squad(
    raw_dir: str, out_dir: str, text_dir: str, vocab_size: int, max_source_tokens: int, workers: int = 1
) -> None:
    """SQuAD v1.1 -> spm model, encoded train/valid(=dev)/test(=dev) text, ids and dev answers.

    out_dir gets: spm.model, spm.vocab, {train,valid,test}.id, dev.answers.jsonl.
    text_dir gets: dict.txt, {train,valid}.{src,tgt} (pieces) for fairseq-preprocess.
    """
    train_path, dev_path = squad_input_files(raw_dir)
    train = read_squad(train_path, need_answer_positions=True)
    dev = read_squad(dev_path, need_answer_positions=False)
    contexts = list(dict.fromkeys(q["context"] for q in train))
    spm_text = [q["question"] for q in train] + contexts + [q["answers"][0][0] for q in train]
    proto = train_sentencepiece(spm_text, vocab_size, user_defined_symbols=[SQUAD_SEP])
    write_spm_files(proto, out_dir, os.path.join(text_dir, "dict.txt"))
    sp = load_sentencepiece(proto)

    for split, questions, path in (("train", train, train_path), ("valid", dev, dev_path)):
        cache: dict = {}
        src_lines, n_trunc, n_unreachable = [], 0, 0
        for q in questions:
            text, start = q["answers"][0]
            answer_span = (start, start + len(text)) if split == "train" else None
            pieces, (c0, c1), truncated = squad_source_pieces(
                sp, q["question"], q["context"], max_source_tokens, answer_span, cache
            )
            src_lines.append(" ".join(pieces))
            n_trunc += truncated
            if truncated and split != "train":
                reachable = any(s >= 0 and c0 <= s and s + len(t) <= c1 for t, s in q["answers"])
                n_unreachable += not reachable
        tgt = [normalize_whitespace(q["answers"][0][0]) for q in questions]
        write_lines(os.path.join(text_dir, f"{split}.src"), src_lines)
        encode_to_file(sp, tgt, os.path.join(text_dir, f"{split}.tgt"), workers)
        ids = [q["id"] for q in questions]
        write_lines(os.path.join(out_dir, f"{split}.id"), ids)
        if split == "valid":
            write_lines(os.path.join(out_dir, "test.id"), ids)
        msg = f"[prepare] {split}: {len(questions)} questions from {path}; {n_trunc} contexts cut to a window"
        if split != "train":
            msg += f"; {n_unreachable} questions with no reference answer inside their window"
        print(msg, file=sys.stderr)
    write_lines(
        os.path.join(out_dir, "dev.answers.jsonl"),
        (
            json.dumps({"id": q["id"], "answers": [t for t, _ in q["answers"]]}, ensure_ascii=False)
            for q in dev
        ),
    )


# --------------------------------------------------------------------------------------------
# WikiText
# --------------------------------------------------------------------------------------------


def wikitext_input_files(raw_dir: str, fmt: str) -> List[str]:
    return [find_split_file(raw_dir, (f"wiki.{s}.{fmt}",), s) for s in SPLITS]


def detect_wikitext_format(raw_dir: str) -> str:
    have = {fmt: os.path.exists(os.path.join(raw_dir, f"wiki.train.{fmt}")) for fmt in ("tokens", "raw")}
    if have["tokens"] and have["raw"]:
        raise DataError(raw_dir, "both wiki.train.tokens and wiki.train.raw exist: choose one with --format")
    if not (have["tokens"] or have["raw"]):
        raise DataError(
            os.path.join(raw_dir, "wiki.train.tokens"), "missing train split file (or wiki.train.raw)"
        )
    return "tokens" if have["tokens"] else "raw"


def prepare_wikitext_raw(
    raw_dir: str, out_dir: str, text_dir: str, vocab_size: int, workers: int = 1
) -> None:
    """WikiText raw text -> spm model and encoded ``{split}.txt`` (one output line per input line)."""
    lines = {}
    for split, path in zip(SPLITS, wikitext_input_files(raw_dir, "raw")):
        check_text_file(path)
        lines[split] = [normalize_whitespace(line) for _, line in iter_text_lines(path)]
    proto = train_sentencepiece([x for x in lines["train"] if x], vocab_size)
    write_spm_files(proto, out_dir, os.path.join(text_dir, "dict.txt"))
    sp = load_sentencepiece(proto)
    for split in SPLITS:
        n = encode_to_file(sp, lines[split], os.path.join(text_dir, f"{split}.txt"), workers)
        print(f"[prepare] {split}: {n} lines", file=sys.stderr)


# --------------------------------------------------------------------------------------------
# Downloads (need a network; not exercised by the tests)
# --------------------------------------------------------------------------------------------

XSUM_HF_DATASET = "EdinburghNLP/xsum"
XSUM_PARQUET_API = "https://huggingface.co/api/datasets/{dataset}/parquet/default/{split}"
XSUM_PARQUET_FALLBACK = (
    "https://huggingface.co/datasets/{dataset}/resolve/refs%2Fconvert%2Fparquet/default/{split}/0000.parquet"
)
SQUAD_URL = "https://rajpurkar.github.io/SQuAD-explorer/dataset/{name}"
WIKITEXT_URLS = {
    "tokens": [
        "https://wikitext.smerity.com/wikitext-103-v1.zip",
        "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-v1.zip",
    ],
    "raw": [
        "https://wikitext.smerity.com/wikitext-103-raw-v1.zip",
        "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-raw-v1.zip",
    ],
}


def _download(urls: Sequence[str], dest: str) -> None:
    """Download the first URL that works to ``dest`` (via ``dest.part``); keep an existing dest."""
    import urllib.request

    if os.path.exists(dest):
        print(f"[prepare] using already downloaded {dest}", file=sys.stderr)
        return
    errors = []
    for url in urls:
        print(f"[prepare] downloading {url}", file=sys.stderr)
        try:
            req = urllib.request.Request(url, headers={"User-Agent": "meo-fairseq-prepare"})
            with urllib.request.urlopen(req, timeout=60) as r, open(dest + ".part", "wb") as f:
                while True:
                    block = r.read(1 << 20)
                    if not block:
                        break
                    f.write(block)
            os.replace(dest + ".part", dest)
            return
        except Exception as e:  # noqa: BLE001 - try the next mirror, report all at the end
            errors.append(f"{url}: {e}")
    raise RuntimeError("download failed:\n  " + "\n  ".join(errors))


def download_xsum(dest_dir: str) -> None:
    """EdinburghNLP/xsum parquet files (Hugging Face) -> ``{train,validation,test}.jsonl``."""
    import urllib.request

    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SystemExit("reading the XSum parquet files needs pyarrow: pip install pyarrow")
    os.makedirs(dest_dir, exist_ok=True)
    for split in ("train", "validation", "test"):
        out = os.path.join(dest_dir, f"{split}.jsonl")
        if os.path.exists(out):
            continue
        try:
            api = XSUM_PARQUET_API.format(dataset=XSUM_HF_DATASET, split=split)
            with urllib.request.urlopen(api, timeout=60) as r:
                urls = json.load(r)
        except Exception as e:  # noqa: BLE001
            print(
                f"[prepare] could not list parquet files ({e}); trying the default file name", file=sys.stderr
            )
            urls = [XSUM_PARQUET_FALLBACK.format(dataset=XSUM_HF_DATASET, split=split)]
        parts = []
        for k, url in enumerate(urls):
            part = os.path.join(dest_dir, f"{split}-{k:04d}.parquet")
            _download([url], part)
            parts.append(part)
        with open(out + ".part", "w", encoding="utf-8", newline="\n") as f:
            for part in parts:
                for row in pq.read_table(part, columns=["id", "document", "summary"]).to_pylist():
                    f.write(
                        json.dumps(
                            {"id": row["id"], "document": row["document"], "summary": row["summary"]},
                            ensure_ascii=False,
                        )
                        + "\n"
                    )
        os.replace(out + ".part", out)


def download_squad(dest_dir: str) -> None:
    os.makedirs(dest_dir, exist_ok=True)
    for name in SQUAD_FILES.values():
        _download([SQUAD_URL.format(name=name)], os.path.join(dest_dir, name))


def download_wikitext(dest_dir: str, fmt: str) -> str:
    """Download and unzip WikiText-103; return the directory holding ``wiki.*.{tokens,raw}``."""
    os.makedirs(dest_dir, exist_ok=True)
    name = "wikitext-103" if fmt == "tokens" else "wikitext-103-raw"
    target = os.path.join(dest_dir, name)
    if not os.path.exists(os.path.join(target, f"wiki.test.{fmt}")):
        archive = os.path.join(dest_dir, name + "-v1.zip")
        _download(WIKITEXT_URLS[fmt], archive)
        with zipfile.ZipFile(archive) as z:
            z.extractall(dest_dir)
    return target


# --------------------------------------------------------------------------------------------
# Command line (used by the shell scripts)
# --------------------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="prepare.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp_):
        sp_.add_argument("--raw", required=True)
        sp_.add_argument("--out", required=True, help="final artifacts (spm.model, ids, references)")
        sp_.add_argument("--text-dir", required=True, help="encoded text + dict.txt for fairseq-preprocess")
        sp_.add_argument("--vocab-size", type=int, required=True)
        sp_.add_argument("--workers", type=int, default=1)

    common(sub.add_parser("xsum"))
    sq = sub.add_parser("squad")
    common(sq)
    sq.add_argument("--max-source-tokens", type=int, default=512)
    common(sub.add_parser("wikitext-raw"))
    ck = sub.add_parser("check-text", help="validate plain text split files")
    ck.add_argument("files", nargs="+")
    ls = sub.add_parser("input-files", help="print the input files of a data set, one a line")
    ls.add_argument("dataset", choices=["xsum", "squad", "wikitext-tokens", "wikitext-raw", "wikitext"])
    ls.add_argument("--raw", required=True)
    dl = sub.add_parser("download")
    dl.add_argument("dataset", choices=["xsum", "squad", "wikitext-tokens", "wikitext-raw"])
    dl.add_argument("--dest", required=True)
    args = p.parse_args(argv)

    try:
        if args.cmd == "xsum":
            prepare_xsum(args.raw, args.out, args.text_dir, args.vocab_size, args.workers)
        elif args.cmd == "squad":
            prepare_squad(
                args.raw, args.out, args.text_dir, args.vocab_size, args.max_source_tokens, args.workers
            )
        elif args.cmd == "wikitext-raw":
            prepare_wikitext_raw(args.raw, args.out, args.text_dir, args.vocab_size, args.workers)
        elif args.cmd == "check-text":
            for f in args.files:
                n = check_text_file(f)
                print(f"[prepare] {f}: {n} lines", file=sys.stderr)
        elif args.cmd == "input-files":
            if args.dataset == "xsum":
                files = xsum_input_files(args.raw)
            elif args.dataset == "squad":
                files = squad_input_files(args.raw)
            elif args.dataset == "wikitext":
                print(detect_wikitext_format(args.raw))
                return 0
            else:
                files = wikitext_input_files(args.raw, args.dataset.split("-")[1])
            print("\n".join(files))
        elif args.cmd == "download":
            if args.dataset == "xsum":
                download_xsum(args.dest)
                print(args.dest)
            elif args.dataset == "squad":
                download_squad(args.dest)
                print(args.dest)
            else:
                print(download_wikitext(args.dest, args.dataset.split("-")[1]))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError, OSError, zipfile.BadZipFile) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
