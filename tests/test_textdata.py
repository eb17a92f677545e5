"""Text sources, evaluation text and calibration windows."""

from __future__ import annotations

import gzip
import json
import logging
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers_tokenizer import make_tiny_tokenizer  # noqa: E402

from dsnot_deploy.errors import UserInputError  # noqa: E402
from dsnot_deploy.sources import textdata  # noqa: E402
from dsnot_deploy.sources.textdata import (  # noqa: E402
    TextSource,
    load_text_source,
    sample_calibration,
    tokenize_eval,
)

DATA = Path("/work/shared/data")
WIKI_TEST = DATA / "wikitext-2-raw-v1" / "wiki.test.raw"
C4_TRAIN = DATA / "c4" / "en-train" / "c4_sample.jsonl"
C4_VALID = DATA / "c4" / "en-validation" / "c4-sample.00000-of-00001.json.gz"

RAW_SAMPLE = " \n = Title = \n \n Some text here . \n More text . \n \n = = Part = = \n"
RAW_ROWS = ["", " = Title = \n", "", " Some text here . \n", " More text . \n", "", " = = Part = = \n"]


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer(add_bos=True)


# ----------------------------------------------------------------------------- local files


def load_documents(source: str, split: str | None = None) -> list[str]:
    return list(load_text_source(source, split).documents)


def eval_text(source: str | TextSource, protocol: str) -> str:
    loaded = source if isinstance(source, TextSource) else load_text_source(source)
    return loaded.eval_text(protocol)


def test_txt_is_one_document_and_raw_text_is_exact(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_bytes(b"first line\r\nsecond line\n\nthird\n")
    source = load_text_source(str(path))
    assert source.documents == ("first line\r\nsecond line\n\nthird\n",)
    assert load_documents(str(path)) == ["first line\r\nsecond line\n\nthird\n"]
    assert eval_text(str(path), "llamacpp") == "first line\r\nsecond line\n\nthird\n"
    assert eval_text(str(path), "paper") == "first line\r\nsecond line\n\nthird\n"


def test_raw_file_gives_hf_style_rows(tmp_path):
    path = tmp_path / "wiki.test.raw"
    path.write_text(RAW_SAMPLE, encoding="utf-8")
    source = load_text_source(str(path))
    assert list(source.documents) == RAW_ROWS
    assert source.is_rows and source.raw_text == RAW_SAMPLE
    assert eval_text(source, "paper") == "\n\n".join(RAW_ROWS)
    assert eval_text(str(path), "paper") == "\n\n".join(RAW_ROWS)
    assert eval_text(str(path), "llamacpp") == RAW_SAMPLE


def test_raw_rows_read_crlf_like_open(tmp_path):
    path = tmp_path / "crlf.raw"
    path.write_bytes(RAW_SAMPLE.replace("\n", "\r\n").encode())
    assert load_documents(str(path)) == RAW_ROWS
    assert eval_text(str(path), "llamacpp") == RAW_SAMPLE.replace("\n", "\r\n")


def _json_lines(records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


RECORDS = [{"text": "alpha doc", "url": "u1"}, {"text": "beta\ndoc"}, {"text": "gamma/doc", "timestamp": "t"}]


@pytest.mark.parametrize("name", ["c4.jsonl", "c4.jsonl.gz", "c4.json.gz", "C4.JSONL"])
def test_json_lines_files(tmp_path, name):
    data = _json_lines(RECORDS) + b"\n"  # a trailing blank line is ignored
    path = tmp_path / name
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    assert load_documents(str(path)) == ["alpha doc", "beta\ndoc", "gamma/doc"]
    source = load_text_source(str(path))
    assert source.raw_text is None
    for protocol in ("paper", "llamacpp"):
        assert eval_text(source, protocol) == "alpha doc\n\nbeta\ndoc\n\ngamma/doc"


def test_escaped_slashes_decode(tmp_path):
    path = tmp_path / "c4.jsonl"
    path.write_text('{"text": "a\\/b", "timestamp": "2019-04-25 12:57:54"}\n', encoding="utf-8")
    assert load_documents(str(path)) == ["a/b"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.txt", None, "found no file"),
        ("data.csv", b"text\nhello\n", "file ending in"),
        ("noext", b"hello", "file ending in"),
        ("empty.txt", b"  \n\n", "all empty"),
        ("blank.raw", b" \n \n", "all empty"),
        ("empty.jsonl", b"", "all empty"),
        ("empties.jsonl", _json_lines([{"text": ""}, {"text": "  "}]), "all empty"),
        ("notext.jsonl", _json_lines([{"text": "ok"}, {"body": "x"}]), "line 2 has \\['body'\\]"),
        ("nonstring.jsonl", _json_lines([{"text": 3}]), "string field 'text'"),
        ("list.jsonl", b"[1, 2]\n", "string field 'text'"),
        ("broken.jsonl", b'{"text": "a"\n', "one JSON object per line"),
        ("bad.json.gz", b"not gzip", "could not read"),
        ("latin1.txt", "caf\u00e9".encode("latin-1"), "UTF-8"),
    ],
)
def test_bad_local_files_raise(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserInputError, match=message):
        load_documents(str(path))


def test_bad_protocol_and_empty_source_name():
    with pytest.raises(UserInputError, match="protocol"):
        eval_text("pydoc", "wanda")
    with pytest.raises(UserInputError, match="source name"):
        load_documents("")


# ----------------------------------------------------------------------------- named sources


def test_pydoc_default_is_sorted_topics():
    from pydoc_data.topics import topics

    docs = load_documents("pydoc")
    assert len(docs) == len(topics) > 10
    assert docs == [topics[k] for k in sorted(topics)]
    assert sum(len(d) for d in docs) > 100_000
    assert eval_text("pydoc", "llamacpp") == eval_text("pydoc", "paper") == "\n\n".join(docs)


class FakeLoad:
    def __init__(self, result=None, error=None):
        self.result, self.error, self.calls = result, error, []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        if self.error is not None:
            raise self.error
        return self.result


def test_c4_reads_shard_zero_text_field(monkeypatch):
    import datasets

    fake = FakeLoad(result=[{"text": "doc one", "url": "x"}, {"text": "doc two", "url": "y"}])
    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert load_documents("c4") == ["doc one", "doc two"]
    assert fake.calls[-1] == (
        ("allenai/c4",),
        {"data_files": {"train": "en/c4-train.00000-of-01024.json.gz"}, "split": "train"},
    )
    load_documents("c4", split="validation")
    assert fake.calls[-1][1]["data_files"] == {"validation": "en/c4-validation.00000-of-00008.json.gz"}


def test_c4_hub_failure_is_a_user_input_error(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", FakeLoad(error=ConnectionError("no route to host")))
    with pytest.raises(UserInputError, match="hub could not be reached.*local") as info:
        load_documents("c4")
    assert "no route to host" in str(info.value)
    with pytest.raises(UserInputError, match="split"):
        load_documents("c4", split="test")


def test_wikitext2_rows_from_hub(monkeypatch):
    import datasets

    fake = FakeLoad(result=[{"text": row} for row in RAW_ROWS])
    monkeypatch.setattr(datasets, "load_dataset", fake)
    source = load_text_source("wikitext2")
    assert list(source.documents) == RAW_ROWS and source.is_rows
    assert fake.calls[-1] == (("wikitext", "wikitext-2-raw-v1"), {"split": "test"})
    assert eval_text(source, "paper") == eval_text(source, "llamacpp") == "\n\n".join(RAW_ROWS)
    load_documents("wikitext2", split="validation")
    assert fake.calls[-1][1] == {"split": "validation"}

    monkeypatch.setattr(datasets, "load_dataset", FakeLoad(error=OSError("offline")))
    with pytest.raises(UserInputError, match="wiki.test.raw"):
        load_documents("wikitext2")
    with pytest.raises(UserInputError, match="split"):
        load_documents("wikitext2", split="dev")


# ----------------------------------------------------------------------------- real data


@pytest.mark.skipif(not WIKI_TEST.is_file(), reason="shared WikiText-2 test file not present")
def test_real_wikitext2_test_rows():
    source = load_text_source(str(WIKI_TEST))
    rows = source.documents
    assert len(rows) == 4358
    assert rows[0] == "" and rows[1] == " = Robert Boulter = \n"
    assert sum(1 for r in rows if r == "") == 1467
    raw = WIKI_TEST.read_bytes().decode("utf-8")
    assert eval_text(source, "llamacpp") == raw
    assert eval_text(source, "paper") == "\n\n".join(rows)


@pytest.mark.skipif(not C4_TRAIN.is_file(), reason="shared C4 train sample not present")
def test_real_c4_train_sample():
    docs = load_documents(str(C4_TRAIN))
    assert len(docs) == 1000 and len(set(docs)) == 1000
    assert docs[0].startswith("Beginners BBQ Class")


@pytest.mark.skipif(not C4_VALID.is_file(), reason="shared C4 validation sample not present")
def test_real_c4_validation_sample():
    docs = load_documents(str(C4_VALID))
    assert len(docs) == 1000
    assert docs[0].startswith("The woman who died after falling from a bridge")


# ----------------------------------------------------------------------------- tokens

LONG_DOCS = [
    "short one.",
    " ".join(f"word{i} the fox" for i in range(60)),
    "another short doc",
    " ".join(f"sparse {i} model" for i in range(80)),
]


def _is_window_of(window: list[int], ids: list[int]) -> bool:
    n = len(window)
    return any(ids[i : i + n] == window for i in range(len(ids) - n + 1))


def test_tokenize_eval_one_bos_and_no_length_warning(capfd):
    tok = make_tiny_tokenizer(add_bos=True)  # fresh: model_max_length 64, warns once per instance
    text = "\n\n".join(LONG_DOCS)
    ids = tokenize_eval(tok, text)
    assert ids.dtype == torch.long and ids.dim() == 1 and ids.numel() > 64
    assert ids[0].item() == tok.bos_token_id and int((ids == tok.bos_token_id).sum()) == 1
    assert ids.tolist() == tok(text, verbose=False)["input_ids"]
    assert "Token indices sequence length" not in capfd.readouterr().err
    plain = tokenize_eval(make_tiny_tokenizer(add_bos=False), text)
    assert plain.tolist() == ids.tolist()[1:]


def test_calibration_shape_determinism_and_windows(tok):
    a = sample_calibration(tok, LONG_DOCS, nsamples=6, seqlen=20, seed=0)
    b = sample_calibration(tok, LONG_DOCS, nsamples=6, seqlen=20, seed=0)
    c = sample_calibration(tok, LONG_DOCS, nsamples=6, seqlen=20, seed=1)
    assert a.shape == (6, 20) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    encoded = [tok(d)["input_ids"] for d in LONG_DOCS]
    long_enough = [ids for ids in encoded if len(ids) > 20]
    for window in a.tolist() + c.tolist():
        assert any(_is_window_of(window, ids) for ids in long_enough)


def test_calibration_follows_the_reference_draws(tok):
    seqlen, nsamples, seed = 30, 5, 3
    rng = random.Random(seed)
    expected = []
    while len(expected) < nsamples:
        ids = tok(LONG_DOCS[rng.randint(0, len(LONG_DOCS) - 1)])["input_ids"]
        if len(ids) <= seqlen:
            continue
        i = rng.randint(0, len(ids) - seqlen - 1)
        expected.append(ids[i : i + seqlen])
    got = sample_calibration(tok, LONG_DOCS, nsamples=nsamples, seqlen=seqlen, seed=seed)
    assert got.tolist() == expected


class CountingTokenizer:
    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __call__(self, text, **kwargs):
        self.calls.append(text)
        return self.inner(text, **kwargs)


def test_each_document_is_tokenized_at_most_once(tok):
    counting = CountingTokenizer(tok)
    sample_calibration(counting, LONG_DOCS, nsamples=50, seqlen=20, seed=0)
    assert len(counting.calls) == len(set(counting.calls)) <= len(LONG_DOCS)


def test_fallback_joins_short_documents(tok, caplog):
    docs = ["the quick brown fox", "jumps over the lazy dog", "sparse models are small", "perplexity"]
    lengths = [len(tok(d)["input_ids"]) for d in docs]
    seqlen = max(lengths) + 3  # no document is long enough on its own
    counting = CountingTokenizer(tok)
    with caplog.at_level(logging.INFO, logger=textdata.__name__):
        out = sample_calibration(counting, docs, nsamples=4, seqlen=seqlen, seed=0)
    assert out.shape == (4, seqlen)
    assert "joined" in caplog.text
    stream = tok("\n\n".join(docs))["input_ids"]
    assert all(_is_window_of(w, stream) for w in out.tolist())
    assert torch.equal(out, sample_calibration(tok, docs, nsamples=4, seqlen=seqlen, seed=0))
    assert counting.calls.count("\n\n".join(docs)) == 1


def test_whole_document_mode_is_logged(tok, caplog):
    with caplog.at_level(logging.INFO, logger=textdata.__name__):
        sample_calibration(tok, LONG_DOCS, nsamples=2, seqlen=10, seed=0)
    assert "whole documents" in caplog.text


def test_too_little_calibration_text_raises(tok):
    docs = ["tiny", "text"]
    total = len(tok("\n\n".join(docs))["input_ids"])
    with pytest.raises(UserInputError, match=f"at least {total + 5} tokens.*found {total} tokens"):
        sample_calibration(tok, docs, nsamples=1, seqlen=total + 4, seed=0)
    with pytest.raises(UserInputError, match="at least one"):
        sample_calibration(tok, [], nsamples=1, seqlen=4)
    with pytest.raises(UserInputError, match="nsamples >= 1"):
        sample_calibration(tok, LONG_DOCS, nsamples=0, seqlen=4)


def test_text_source_is_frozen():
    source = TextSource(name="x", documents=("a",))
    with pytest.raises(AttributeError):
        source.documents = ("b",)  # type: ignore[misc]
