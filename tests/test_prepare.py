"""Data pipelines: scripts/prepare_{xsum,wikitext,squad}.sh end to end on tests/data, and the helpers.

Every script run uses a small vocabulary and --workers 1 (--workers 2 for the determinism re-run,
which must not change a byte).
"""

import filecmp
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meo_fairseq.data import prepare as P

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
SCRIPTS = REPO / "scripts"
VOCAB = "600"
SPLITS = ("train", "valid", "test")


def run_script(name, *args):
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(
        ["bash", str(SCRIPTS / name), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(REPO),
        timeout=300,
    )


def ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def idx_sizes(path):
    """Sequence lengths stored in a fairseq MMapIndexedDataset .idx file."""
    data = Path(path).read_bytes()
    assert data[:9] == b"MMIDIDX\x00\x00", path
    (n,) = struct.unpack("<Q", data[18:26])
    return list(struct.unpack(f"<{n}i", data[26 : 26 + 4 * n]))  # magic 9, version 8, dtype 1, len 8


def lines(path):
    return Path(path).read_text(encoding="utf-8").split("\n")[:-1]


def n_lines(path):
    return len(lines(path))


def assert_same_tree(a, b):
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b))
    _, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    assert not mismatch and not errors, (mismatch, errors)


def assert_failed_cleanly(proc, out, *needles):
    assert proc.returncode != 0, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, f"{needle!r} not in:\n{proc.stderr}"
    assert not out.exists(), "--out must not exist after a failure"
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith("." + out.name)]
    assert not leftovers, leftovers


def spm_pieces(model_path):
    sp = P.load_sentencepiece(str(model_path))
    return [
        sp.id_to_piece(i) for i in range(sp.get_piece_size()) if not (sp.is_control(i) or sp.is_unknown(i))
    ]


def dict_words(path):
    return [line.rsplit(" ", 1)[0] for line in lines(path)]


# ----------------------------------------------------------------------------- XSum


@pytest.fixture(scope="module")
def xsum_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("xsum") / "out"
    ok(
        run_script(
            "prepare_xsum.sh", "--raw", DATA / "xsum", "--out", out, "--vocab-size", VOCAB, "--workers", 1
        )
    )
    return out


def test_xsum_outputs(xsum_out):
    inputs = {"train": "train.jsonl", "valid": "validation.jsonl", "test": "test.jsonl"}
    for split in SPLITS:
        records = [json.loads(x) for x in lines(DATA / "xsum" / inputs[split])]
        assert lines(xsum_out / f"{split}.id") == [r["id"] for r in records]
        for side in ("src", "tgt"):
            for ext in ("bin", "idx"):
                assert (xsum_out / f"{split}.src-tgt.{side}.{ext}").is_file()
            assert len(idx_sizes(xsum_out / f"{split}.src-tgt.{side}.idx")) == len(records)
        if split != "train":
            assert lines(xsum_out / f"{split}.tgt.raw") == [" ".join(r["summary"].split()) for r in records]
    for name in ("spm.model", "spm.vocab", "dict.src.txt", "dict.tgt.txt", "preprocess.log", "prepare.stamp"):
        assert (xsum_out / name).is_file(), name
    # joined dictionary = the sentencepiece pieces, same order
    assert (xsum_out / "dict.src.txt").read_bytes() == (xsum_out / "dict.tgt.txt").read_bytes()
    assert dict_words(xsum_out / "dict.src.txt") == spm_pieces(xsum_out / "spm.model")
    assert len(spm_pieces(xsum_out / "spm.model")) == int(VOCAB) - 3
    # nothing but the documented outputs (no encoded text, no staging leftovers)
    assert not [p for p in os.listdir(xsum_out.parent) if p != "out"]


def test_xsum_rerun_is_noop_and_deterministic(xsum_out, tmp_path):
    before = {p.name: p.stat().st_mtime_ns for p in xsum_out.iterdir()}
    proc = ok(
        run_script(
            "prepare_xsum.sh",
            "--raw",
            DATA / "xsum",
            "--out",
            xsum_out,
            "--vocab-size",
            VOCAB,
            "--workers",
            1,
        )
    )
    assert "up to date" in proc.stderr
    assert {p.name: p.stat().st_mtime_ns for p in xsum_out.iterdir()} == before
    # from scratch elsewhere (other workers, raw data copied elsewhere): the same bytes
    raw = tmp_path / "raw"
    shutil.copytree(DATA / "xsum", raw)
    again = tmp_path / "again"
    ok(run_script("prepare_xsum.sh", "--raw", raw, "--out", again, "--vocab-size", VOCAB, "--workers", 2))
    assert_same_tree(xsum_out, again)


def _xsum_raw(tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(DATA / "xsum", raw)
    return raw


def test_xsum_missing_split(tmp_path):
    raw = _xsum_raw(tmp_path)
    (raw / "test.jsonl").unlink()
    out = tmp_path / "out"
    assert_failed_cleanly(
        run_script("prepare_xsum.sh", "--raw", raw, "--out", out, "--vocab-size", VOCAB),
        out,
        f"{raw}/test.jsonl",
        "missing test split",
    )


def test_xsum_malformed_json_line(tmp_path):
    raw = _xsum_raw(tmp_path)
    rows = lines(raw / "validation.jsonl")
    rows[6] = rows[6][: len(rows[6]) // 2]  # line 7 cut in the middle
    (raw / "validation.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    assert_failed_cleanly(
        run_script("prepare_xsum.sh", "--raw", raw, "--out", out, "--vocab-size", VOCAB),
        out,
        f"{raw}/validation.jsonl:7:",
        "malformed JSON",
    )


def test_xsum_empty_file(tmp_path):
    raw = _xsum_raw(tmp_path)
    (raw / "train.jsonl").write_text("", encoding="utf-8")
    out = tmp_path / "out"
    assert_failed_cleanly(
        run_script("prepare_xsum.sh", "--raw", raw, "--out", out, "--vocab-size", VOCAB),
        out,
        f"{raw}/train.jsonl",
        "empty",
    )


def test_xsum_missing_field(tmp_path):
    raw = _xsum_raw(tmp_path)
    rows = lines(raw / "test.jsonl")
    rec = json.loads(rows[2])
    del rec["summary"]
    rows[2] = json.dumps(rec)
    (raw / "test.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    assert_failed_cleanly(
        run_script("prepare_xsum.sh", "--raw", raw, "--out", out, "--vocab-size", VOCAB),
        out,
        f"{raw}/test.jsonl:3:",
        "'summary'",
    )


def test_existing_foreign_out_is_not_overwritten(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    proc = run_script("prepare_xsum.sh", "--raw", DATA / "xsum", "--out", out, "--vocab-size", VOCAB)
    assert proc.returncode != 0 and "not overwriting" in proc.stderr
    assert os.listdir(out) == ["precious.txt"]


@pytest.mark.parametrize("script", ["prepare_xsum.sh", "prepare_wikitext.sh", "prepare_squad.sh"])
def test_help(script):
    proc = ok(run_script(script, "--help"))
    assert proc.stdout.startswith("Usage: scripts/" + script)
    assert (
        "--raw DIR" in proc.stdout
        and "--out DIR" in proc.stdout
        and "--vocab-size" in proc.stdout
        and "--workers" in proc.stdout
    )
    bad = run_script(script, "--bogus")
    assert bad.returncode != 0 and "unknown argument" in bad.stderr


# ----------------------------------------------------------------------------- WikiText


@pytest.fixture(scope="module")
def wikitext_tokens_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("wt") / "out"
    ok(run_script("prepare_wikitext.sh", "--raw", DATA / "wikitext-2", "--out", out, "--workers", 1))
    return out


def test_wikitext_tokens_outputs(wikitext_tokens_out, tmp_path):
    out = wikitext_tokens_out
    for split in SPLITS:
        src = DATA / "wikitext-2" / f"wiki.{split}.tokens"
        sizes = idx_sizes(out / f"{split}.idx")
        assert (out / f"{split}.bin").is_file()
        assert len(sizes) == n_lines(src)
        assert sizes == [len(x.split()) + 1 for x in lines(src)]  # words kept as they are, + </s>
    words = set(dict_words(out / "dict.txt"))
    assert {"Homarus", "gammarus", "@-@", ","} <= words
    assert not (out / "spm.model").exists()
    # re-run: no-op; from scratch with another worker count: same bytes
    assert (
        "up to date"
        in ok(run_script("prepare_wikitext.sh", "--raw", DATA / "wikitext-2", "--out", out)).stderr
    )
    again = tmp_path / "again"
    ok(run_script("prepare_wikitext.sh", "--raw", DATA / "wikitext-2", "--out", again, "--workers", 2))
    assert_same_tree(out, again)
    # other options: the output is rebuilt (and replaced) in place
    proc = ok(
        run_script(
            "prepare_wikitext.sh",
            "--raw",
            DATA / "wikitext-2",
            "--out",
            again,
            "--vocab-size",
            500,
            "--workers",
            1,
        )
    )
    assert "rebuilding" in proc.stderr
    assert len(lines(again / "dict.txt")) < len(lines(out / "dict.txt"))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_wikitext_raw_outputs(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    enwiki = REPO / "examples" / "data" / "enwiki"
    for split, n in (("train", 300), ("valid", 40), ("test", 40)):
        text = lines(enwiki / f"wiki.{split}.raw")[:n]
        (raw / f"wiki.{split}.raw").write_text("\n".join(text) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    ok(run_script("prepare_wikitext.sh", "--raw", raw, "--out", out, "--vocab-size", VOCAB, "--workers", 1))
    sp = P.load_sentencepiece(str(out / "spm.model"))
    for split in SPLITS:
        src = lines(raw / f"wiki.{split}.raw")
        sizes = idx_sizes(out / f"{split}.idx")
        assert len(sizes) == len(src)
        assert sizes == [len(sp.encode(P.normalize_whitespace(x))) + 1 for x in src]
    assert dict_words(out / "dict.txt") == spm_pieces(out / "spm.model")
    again = tmp_path / "again"
    ok(run_script("prepare_wikitext.sh", "--raw", raw, "--out", again, "--vocab-size", VOCAB, "--workers", 2))
    assert_same_tree(out, again)


def test_wikitext_bad_inputs(tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(DATA / "wikitext-2", raw)
    out = tmp_path / "out"
    (raw / "wiki.valid.tokens").write_text("", encoding="utf-8")
    assert_failed_cleanly(
        run_script("prepare_wikitext.sh", "--raw", raw, "--out", out),
        out,
        f"{raw}/wiki.valid.tokens",
        "empty",
    )
    (raw / "wiki.valid.tokens").write_bytes(b" \n = Title = \n bad \xff byte \n")
    assert_failed_cleanly(
        run_script("prepare_wikitext.sh", "--raw", raw, "--out", out),
        out,
        f"{raw}/wiki.valid.tokens:3:",
        "UTF-8",
    )
    (raw / "wiki.valid.tokens").unlink()
    assert_failed_cleanly(
        run_script("prepare_wikitext.sh", "--raw", raw, "--out", out),
        out,
        f"{raw}/wiki.valid.tokens",
        "missing valid split",
    )
    shutil.copy(DATA / "wikitext-2" / "wiki.valid.tokens", raw / "wiki.valid.tokens")
    (raw / "wiki.train.raw").write_text("x\n", encoding="utf-8")
    assert_failed_cleanly(run_script("prepare_wikitext.sh", "--raw", raw, "--out", out), out, "--format")


# ----------------------------------------------------------------------------- SQuAD

MAX_SRC = 200


@pytest.fixture(scope="module")
def squad_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("squad") / "out"
    ok(
        run_script(
            "prepare_squad.sh",
            "--raw",
            DATA / "squad",
            "--out",
            out,
            "--vocab-size",
            VOCAB,
            "--workers",
            1,
            "--max-source-tokens",
            MAX_SRC,
        )
    )
    return out


def _squad_questions(path):
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    return [qa for a in doc["data"] for p in a["paragraphs"] for qa in p["qas"]]


def test_squad_outputs(squad_out, tmp_path):
    out = squad_out
    train_q = _squad_questions(DATA / "squad" / "train-v1.1.json")
    dev_q = _squad_questions(DATA / "squad" / "dev-v1.1.json")
    assert lines(out / "train.id") == [q["id"] for q in train_q]
    assert lines(out / "valid.id") == lines(out / "test.id") == [q["id"] for q in dev_q]
    answers = [json.loads(x) for x in lines(out / "dev.answers.jsonl")]
    assert answers == [{"id": q["id"], "answers": [a["text"] for a in q["answers"]]} for q in dev_q]
    for split, n in (("train", len(train_q)), ("valid", len(dev_q)), ("test", len(dev_q))):
        src = idx_sizes(out / f"{split}.src-tgt.src.idx")
        assert len(src) == n == len(idx_sizes(out / f"{split}.src-tgt.tgt.idx"))
        assert max(src) <= MAX_SRC  # </s> included
        assert (out / f"{split}.src-tgt.src.bin").is_file() and (out / f"{split}.src-tgt.tgt.bin").is_file()
    pieces = dict_words(out / "dict.src.txt")
    assert pieces == spm_pieces(out / "spm.model") and P.SQUAD_SEP in pieces
    # re-run: no-op; elsewhere with 2 workers: same bytes
    args = ("--vocab-size", VOCAB, "--max-source-tokens", MAX_SRC)
    assert (
        "up to date"
        in ok(run_script("prepare_squad.sh", "--raw", DATA / "squad", "--out", out, *args)).stderr
    )
    again = tmp_path / "again"
    ok(run_script("prepare_squad.sh", "--raw", DATA / "squad", "--out", again, *args, "--workers", 2))
    assert_same_tree(out, again)


def test_squad_train_windows_contain_the_answer(squad_out):
    sp = P.load_sentencepiece(str(squad_out / "spm.model"))
    questions = P.read_squad(str(DATA / "squad" / "train-v1.1.json"))
    cut = 0
    for q in questions:
        text, start = q["answers"][0]
        pieces, (c0, c1), truncated = P.squad_source_pieces(
            sp, q["question"], q["context"], MAX_SRC, (start, start + len(text))
        )
        cut += truncated
        assert len(pieces) <= MAX_SRC - 1
        assert c0 <= start and start + len(text) <= c1, q["id"]
        assert P.SQUAD_SEP in pieces
    assert cut > len(questions) // 2  # the test contexts are long: windows are really exercised


def test_squad_bad_inputs(tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(DATA / "squad", raw)
    out = tmp_path / "out"
    doc = json.loads((raw / "dev-v1.1.json").read_text(encoding="utf-8"))
    del doc["data"][1]["paragraphs"][0]["qas"][0]["question"]
    (raw / "dev-v1.1.json").write_text(json.dumps(doc), encoding="utf-8")
    assert_failed_cleanly(
        run_script("prepare_squad.sh", "--raw", raw, "--out", out, "--vocab-size", VOCAB),
        out,
        f"{raw}/dev-v1.1.json",
        "data[1].paragraphs[0].qas[0]: missing field 'question'",
    )
    (raw / "dev-v1.1.json").write_text(
        '{"version": "1.1",\n "data": [\n {"title": "x",, }]}\n', encoding="utf-8"
    )
    assert_failed_cleanly(
        run_script("prepare_squad.sh", "--raw", raw, "--out", out, "--vocab-size", VOCAB),
        out,
        f"{raw}/dev-v1.1.json:3:",
        "malformed JSON",
    )
    (raw / "dev-v1.1.json").write_text("", encoding="utf-8")
    assert_failed_cleanly(
        run_script("prepare_squad.sh", "--raw", raw, "--out", out, "--vocab-size", VOCAB),
        out,
        f"{raw}/dev-v1.1.json",
        "empty",
    )
    (raw / "dev-v1.1.json").unlink()
    assert_failed_cleanly(
        run_script("prepare_squad.sh", "--raw", raw, "--out", out, "--vocab-size", VOCAB),
        out,
        f"{raw}/dev-v1.1.json",
        "missing dev split",
    )


# ----------------------------------------------------------------------------- helpers (no subprocess)


def test_read_jsonl_errors(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text(
        '{"id": "1", "document": "d", "summary": "s"}\n\n{"id": "1", "document": "d", "summary": "s"}\n',
        encoding="utf-8",
    )
    with pytest.raises(P.DataError, match=r"x\.jsonl:3: duplicate id '1' \(first on line 1\)"):
        P.read_jsonl(str(f))
    f.write_text('{"id": "1", "document": 5, "summary": "s"}\n', encoding="utf-8")
    with pytest.raises(P.DataError, match=r"x\.jsonl:1: field 'document' must be a string"):
        P.read_jsonl(str(f))
    f.write_text('["not", "an", "object"]\n', encoding="utf-8")
    with pytest.raises(P.DataError, match=r"x\.jsonl:1: expected a JSON object"):
        P.read_jsonl(str(f))
    f.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(P.DataError, match="empty"):
        P.read_jsonl(str(f))
    f.write_text('{"id": 7, "document": "a\\nb  c", "summary": "s"}\n', encoding="utf-8")
    (rec,) = P.read_jsonl(str(f))
    assert rec["id"] == "7" and P.normalize_whitespace(rec["document"]) == "a b c"


def test_iter_text_lines_counts_like_text_mode(tmp_path):
    f = tmp_path / "t.txt"
    f.write_bytes(b"a\r\nb\rc\n\nd")
    with open(f, encoding="utf-8") as fh:  # how fairseq-preprocess reads it
        expected = [x.rstrip("\n") for x in fh]
    assert [line for _, line in P.iter_text_lines(str(f))] == expected == ["a", "b", "c", "", "d"]


def test_choose_window():
    counts = [1] * 20
    assert P.choose_window(counts, 30) == (0, 20)  # fits whole
    assert P.choose_window(counts, 8) == (0, 8)  # no answer: the first window
    assert P.choose_window(counts, 8, (2, 4)) == (0, 8)
    assert P.choose_window(counts, 8, (6, 10)) == (4, 12)  # grid starts 0, 4, 8, ...: first containing it
    assert P.choose_window(counts, 8, (17, 20)) == (12, 20)
    assert P.choose_window(counts, 3, (5, 10)) == (5, 8)  # answer longer than the budget: starts at it
    assert P.choose_window([2, 5, 1, 1], 4, (1, 2)) == (1, 2)  # a single word over budget -> alone


def test_train_sentencepiece_is_deterministic():
    text = [x for x in lines(DATA / "wikitext-2" / "wiki.test.tokens") if x.strip()]
    a = P.train_sentencepiece(text, 300)
    assert a == P.train_sentencepiece(text, 300)
    assert a != P.train_sentencepiece(text, 300, max_chars=3000)  # sampled subset -> another model
    with pytest.raises(ValueError, match="vocab"):
        P.train_sentencepiece(["tiny text"], 5000)


# ----------------------------------------------------------------------------- re-preparing (issue 18)


def test_rebuild_keeps_files_the_script_did_not_write(tmp_path):
    """Re-preparing with other options replaces only the script's own files (issue 18, item 1)."""
    out = tmp_path / "out"
    args = ("--raw", DATA / "wikitext-2", "--out", out, "--workers", 1)
    ok(run_script("prepare_wikitext.sh", *args))
    first_dict = dict_words(out / "dict.txt")
    (out / "NOTES.txt").write_text("x\n")
    (out / "runs").mkdir()
    (out / "runs" / "log.txt").write_text("my log\n")
    (out / ".hidden").write_text("h\n")
    proc = ok(run_script("prepare_wikitext.sh", *args, "--vocab-size", 300))
    assert "NOTES.txt" in proc.stderr  # says what it keeps
    assert (out / "NOTES.txt").read_text() == "x\n"
    assert (out / "runs" / "log.txt").read_text() == "my log\n"
    assert (out / ".hidden").read_text() == "h\n"
    assert len(dict_words(out / "dict.txt")) == 300 < len(first_dict)  # rebuilt
    stamp_outputs = [
        line[len("output ") :] for line in lines(out / "prepare.stamp") if line.startswith("output ")
    ]
    assert "dict.txt" in stamp_outputs and "NOTES.txt" not in stamp_outputs
    assert not list(tmp_path.glob(".out.tmp.*"))


def test_rebuild_refuses_a_user_file_with_an_output_name(tmp_path):
    """tokens format, then a user's spm.model, then the raw format (which writes spm.model):
    refused, nothing changed."""
    out = tmp_path / "out"
    ok(
        run_script(
            "prepare_wikitext.sh",
            "--raw",
            DATA / "wikitext-2",
            "--out",
            out,
            "--workers",
            1,
            "--vocab-size",
            300,
        )
    )
    (out / "spm.model").write_text("mine\n")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    raw = tmp_path / "raw"
    raw.mkdir()
    for split, n in (("train", 200), ("valid", 20), ("test", 20)):
        text = lines(REPO / "examples" / "data" / "enwiki" / f"wiki.{split}.raw")[:n]
        (raw / f"wiki.{split}.raw").write_text("\n".join(text) + "\n", encoding="utf-8")
    proc = run_script(
        "prepare_wikitext.sh", "--raw", raw, "--out", out, "--workers", 1, "--vocab-size", VOCAB
    )
    assert (
        proc.returncode != 0 and f"{out}/spm.model was not written by prepare_wikitext.sh" in proc.stderr
    ), proc.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not list(tmp_path.glob(".out.tmp.*"))


def test_staging_dir_of_a_killed_run_is_removed(tmp_path):
    """A run killed with SIGKILL leaves .NAME.tmp.*; the next run for that --out removes it
    (issue 18, item 9), but not the staging directory of a run still going."""
    out = tmp_path / "out"
    dead = tmp_path / ".out.tmp.dead01"
    (dead / "out").mkdir(parents=True)
    (dead / "owner").write_text(f"999999999 {os.uname().nodename}\n")
    alive = tmp_path / ".out.tmp.alive1"
    (alive / "out").mkdir(parents=True)
    (alive / "owner").write_text(f"{os.getpid()} {os.uname().nodename}\n")
    old_version = tmp_path / ".out.tmp.legacy"
    (old_version / "out").mkdir(parents=True)
    os.utime(old_version, (1e9, 1e9))  # long ago
    other = tmp_path / ".other.tmp.dead02"  # another --out's: not ours to touch
    other.mkdir()
    (other / "owner").write_text(f"999999999 {os.uname().nodename}\n")
    proc = ok(
        run_script(
            "prepare_wikitext.sh",
            "--raw",
            DATA / "wikitext-2",
            "--out",
            out,
            "--workers",
            1,
            "--vocab-size",
            300,
        )
    )
    assert not dead.exists() and not old_version.exists(), proc.stderr
    assert alive.is_dir() and other.is_dir()
    assert str(dead) in proc.stderr


def test_sigkilled_prepare_then_rerun(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable)
    p = subprocess.Popen(["bash", str(SCRIPTS / "prepare_wikitext.sh"), "--raw", DATA / "wikitext-2",
                          "--out", out, "--workers", "1"], env=env, cwd=str(REPO), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    deadline = time.time() + 120
    while not list(tmp_path.glob(".out.tmp.*/out")) and time.time() < deadline and p.poll() is None:
        time.sleep(0.01)
    os.killpg(p.pid, signal.SIGKILL)  # the script and its children, as a killed job
    p.wait()
    staged = list(tmp_path.glob(".out.tmp.*"))
    assert staged and not out.exists()  # killed while staging
    ok(run_script("prepare_wikitext.sh", "--raw", DATA / "wikitext-2", "--out", out, "--workers", 1))
    assert not list(tmp_path.glob(".out.tmp.*")) and (out / "dict.txt").is_file()
