"""data_prep: raw text -> megatron .bin/.idx + manifest (round trip, shards, formats, bad input, corpus)."""

from __future__ import annotations

import gzip
import json
import os
import shlex
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from data_prep import cli, sources
from data_prep.corpus import EOD_TOKEN, build as build_corpus, train_tokenizer
from data_prep.manifest import Manifest
from tests.paths import ROOT, readme_section_commands
from tests.tiny_data import documents

pytestmark = pytest.mark.filterwarnings("ignore:Could not determine rank")  # megatron logging without torch.distributed


def stdlib_texts(count: int) -> list[str]:
    """Real documents nobody here wrote: small modules of the running interpreter's stdlib."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if 500 < p.stat().st_size < 20000)
    return [p.read_text(encoding="utf-8") for p in files[:count]]


EDGE_TEXTS = [
    "naïve café, 東京, emoji 🙂 and a zero-width joiner \u200d.",
    "line one\nline two\r\nline three\twith tab",
    '{"looks": "like json"} and a backslash \\ and "quotes"',
    " leading and trailing spaces ",
    "x",
]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return stdlib_texts(40) + EDGE_TEXTS


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, texts) -> str:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(texts, 400, path)
    return str(path)


def read_documents(prefix: str) -> list[np.ndarray]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    return [np.array(dataset[i]) for i in range(len(dataset))]


def decode_all(prefix: str, tokenizer_file: str) -> list[str]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_file)
    eod = tok.token_to_id(EOD_TOKEN)
    docs = read_documents(prefix)
    assert all(d[-1] == eod and eod not in d[:-1] for d in docs), "each document ends with exactly one EOD"
    return [tok.decode(d[:-1].tolist(), skip_special_tokens=False) for d in docs]


def write_jsonl(path: Path, records: list, compress: bool = False) -> Path:
    lines = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
    if compress:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(lines)
    else:
        path.write_text(lines, encoding="utf-8")
    return path


def write_parquet(path: Path, texts: list, row_group_size: int = 7) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), path, row_group_size=row_group_size)
    return path


def write_dir(path: Path, texts: list[str]) -> Path:
    for i, text in enumerate(texts):
        sub = path / f"part{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"doc{i:03d}.txt").write_text(text, encoding="utf-8")
    return path


def dir_order(texts: list[str]) -> list[str]:
    """The document order of write_dir's layout: directories sorted, then files sorted."""
    return [t for _, t in sorted(((f"part{i % 3}/doc{i:03d}", t) for i, t in enumerate(texts)))]


def prep(*args: str, workers: int = 0) -> str:
    return cli.run([*map(str, args), "--workers", str(workers), "--no-progress"])


def test_round_trip_jsonl_through_pool(tmp_path, texts, tokenizer):
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": t, "meta": i} for i, t in enumerate(texts)])
    prefix = prep(src, "--tokenizer", tokenizer, "--output-prefix", tmp_path / "out/docs", workers=2)
    assert prefix == str(tmp_path / "out/docs_text_document")
    assert decode_all(prefix, tokenizer) == texts
    m = Manifest.read(prefix)
    assert (m.documents, m.dtype, m.malformed_lines) == (len(texts), "uint16", 0)
    assert m.tokens == sum(len(d) for d in read_documents(prefix))
    assert m.text_bytes == sum(len(t.encode()) for t in texts)
    assert m.eod_token == EOD_TOKEN and m.vocab_size == 400 and len(m.tokenizer_sha256) == 64
    assert not list((tmp_path / "out").glob("*.partial"))


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "parquet", "dir"])
def test_input_formats(tmp_path, texts, tokenizer, kind):
    if kind == "jsonl":
        src, expected = write_jsonl(tmp_path / "a.jsonl", [{"body": t} for t in texts]), texts
    elif kind == "jsonl.gz":
        src, expected = write_jsonl(tmp_path / "a.jsonl.gz", [{"body": t} for t in texts], compress=True), texts
    elif kind == "parquet":
        src, expected = write_parquet(tmp_path / "a.parquet", texts), texts
    else:
        src, expected = write_dir(tmp_path / "tree", texts), dir_order(texts)
    key = ["--text-key", "body"] if kind.startswith("jsonl") else []
    prefix = prep(src, "--tokenizer", tokenizer, "--output-prefix", tmp_path / "out", *key)
    assert decode_all(prefix, tokenizer) == expected


def test_tokenizer_directory_and_int32_for_large_vocab(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(70000)}
    vocab["<|endoftext|>"] = 70000
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": "w69999 w1 w65535"}, {"text": "w2"}])
    prefix = prep(src, "--tokenizer", tmp_path / "tok", "--output-prefix", tmp_path / "out")
    assert Manifest.read(prefix).dtype == "int32"
    docs = read_documents(prefix)
    assert docs[0].dtype == np.int32
    assert [d.tolist() for d in docs] == [[69999, 1, 65535, 70000], [2, 70000]]


@pytest.fixture
def mixed_inputs(tmp_path, texts):
    """Every input kind at once, large enough that shard boundaries fall inside each file."""
    many = texts * 3
    inputs = [
        write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in many]),
        write_jsonl(tmp_path / "b.jsonl.gz", [{"text": t} for t in reversed(many)], compress=True),
        write_parquet(tmp_path / "c.parquet", many[::2]),
        write_dir(tmp_path / "d", texts),
    ]
    return inputs


@pytest.mark.parametrize("count", [2, 3, 7])
def test_shards_concatenate_to_the_unsharded_run(tmp_path, tokenizer, mixed_inputs, monkeypatch, count):
    monkeypatch.setattr(sources, "GZIP_READ_BYTES", 4096)  # several read positions inside the small .gz
    common = [*mixed_inputs, "--tokenizer", tokenizer, "--chunk-mb", "0.002"]
    whole = read_documents(prep(*common, "--output-prefix", tmp_path / "whole"))
    parts, manifests = [], []
    for i in range(count):
        prefix = prep(*common, "--output-prefix", tmp_path / "part", "--shard", f"{i}/{count}")
        assert prefix.endswith(f"part-{i:05d}-of-{count:05d}_text_document")
        parts.append(read_documents(prefix))
        manifests.append(Manifest.read(prefix))
    assert all(len(p) > 0 for p in parts), "every shard gets a share of this input"
    joined = [d for part in parts for d in part]
    assert len(joined) == len(whole)
    assert all(np.array_equal(a, b) for a, b in zip(joined, whole))
    assert sum(m.tokens for m in manifests) == Manifest.read(str(tmp_path / "whole_text_document")).tokens
    assert [m.shard for m in manifests] == [[i, count] for i in range(count)]


@pytest.mark.parametrize("trailing_newline", [True, False])
def test_every_split_point_keeps_each_line_once(tmp_path, trailing_newline):
    """Two shards cut at any byte of a jsonl file hold every line exactly once, in order."""
    lines = [json.dumps({"text": "x" * (i % 7)}) for i in range(25)] + ["", "{broken"]
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(lines) + ("\n" if trailing_newline else ""))
    files = sources.discover([str(path)])
    size = files[0].size

    def lines_in(lo, hi):
        return [line for c in sources.read_chunks(files, lo, hi, "text", 16) for line in c.payload.split(b"\n")[:-1 if c.payload.endswith(b"\n") else None]]

    whole = lines_in(0, size)
    assert [line.decode() for line in whole] == lines
    for cut in range(size + 1):
        assert lines_in(0, cut) + lines_in(cut, size) == whole, f"cut at byte {cut}"


def test_malformed_lines_skipped_and_reported(tmp_path, tokenizer, capsys):
    good = [{"text": f"document number {i}"} for i in range(30)]
    records = list(good)
    bad = {4: "{not json", 9: json.dumps({"txt": "wrong key"}), 17: json.dumps({"text": 7}), 25: json.dumps(["a", "list"])}
    for line_no in sorted(bad):  # 1-based line numbers in the final file
        records.insert(line_no - 1, bad[line_no])
    src = write_jsonl(tmp_path / "mixed.jsonl", records)
    prefix = prep(src, "--tokenizer", tokenizer, "--output-prefix", tmp_path / "out", "--chunk-mb", "0.0005")
    err = capsys.readouterr().err
    for line_no in bad:
        assert f"skipped {src}:{line_no}: " in err
    assert Manifest.read(prefix).malformed_lines == len(bad)
    assert decode_all(prefix, tokenizer) == [r["text"] for r in good]

    # A shard that starts mid-file (seeked, line numbers counted lazily) reports the same numbers.
    prep(src, "--tokenizer", tokenizer, "--output-prefix", tmp_path / "half", "--shard", "1/2")
    err = capsys.readouterr().err
    reported = {int(line.split(f"{src}:")[1].split(":")[0]) for line in err.splitlines() if line.startswith("data_prep: skipped")}
    assert reported and reported <= set(bad) and min(reported) > 4


def test_strict_fails_on_first_malformed_line(tmp_path, tokenizer, capsys):
    src = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, {"text": "fine too"}, '{"text": "unterminated'])
    with pytest.raises(cli.MalformedInput, match=rf"^{src}:3: bad JSON .*--strict"):
        prep(src, "--tokenizer", tokenizer, "--output-prefix", tmp_path / "out", "--strict")
    assert not list(tmp_path.glob("out_text_document*")), "no partial output left behind"
    with pytest.raises(SystemExit) as exit_info:
        cli.main([str(src), "--tokenizer", tokenizer, "--output-prefix", str(tmp_path / "out"), "--strict", "--workers", "0", "--no-progress"])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith(f"data_prep: error: {src}:3: ")


def test_bad_parquet_and_text_inputs(tmp_path, tokenizer, capsys):
    nulls = write_parquet(tmp_path / "nulls.parquet", ["a", None, "c"])
    prefix = prep(nulls, "--tokenizer", tokenizer, "--output-prefix", tmp_path / "p")
    assert "nulls.parquet: row 1: 'text' is null" in capsys.readouterr().err
    assert decode_all(prefix, tokenizer) == ["a", "c"]
    with pytest.raises(sources.InputError, match="no column 'body'"):
        prep(nulls, "--tokenizer", tokenizer, "--output-prefix", tmp_path / "p", "--text-key", "body")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "ok.txt").write_text("fine")
    (tree / "latin1.txt").write_bytes(b"line\ncaf\xe9\n")
    prep(tree, "--tokenizer", tokenizer, "--output-prefix", tmp_path / "t")
    assert f"{tree / 'latin1.txt'}: line 2: not UTF-8" in capsys.readouterr().err
    with pytest.raises(sources.InputError, match="no such file"):
        prep(tmp_path / "missing.jsonl", "--tokenizer", tokenizer, "--output-prefix", tmp_path / "x")


def test_corpus_command_selects_files_and_caches(tmp_path):
    root = tmp_path / "lib"
    modules = {
        "abc_mod.py": "def f(x):\n    return x + 1\n" * 40,
        "pkg/inner.py": "class A:\n    '''doc'''\n    value = 'é'\n" * 30,
        "site-packages/third_party.py": "third = 'party'\n",
        "test/data/fixture.py": "fixture = 1\n",
        "_sysconfigdata__linux.py": "build_time_vars = {}\n",
    }
    for rel, text in modules.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
    (root / "latin1.py").write_bytes(b"x = '\xe9'\n")
    out = tmp_path / "corpus"
    info = build_corpus(out, vocab_size=300, workers=0, root=root, progress=False)
    assert info["files"] == 2 and info["documents"] == 2
    assert decode_all(info["dataset_prefix"], str(out / "tokenizer.json")) == [modules["abc_mod.py"], modules["pkg/inner.py"]]
    assert json.loads((out / "tokenizer_config.json").read_text())["eos_token"] == EOD_TOKEN
    stamp = os.stat(out / "stdlib_text_document.bin").st_mtime_ns
    assert build_corpus(out, vocab_size=300, workers=0, root=root, progress=False) == info
    assert os.stat(out / "stdlib_text_document.bin").st_mtime_ns == stamp, "up to date: nothing rewritten"
    (root / "abc_mod.py").write_text("changed = True\n")
    assert build_corpus(out, vocab_size=300, workers=0, root=root, progress=False)["fingerprint"] != info["fingerprint"]


def test_readme_commands_run_as_written(tmp_path):
    """README "Prepare your data": both data_prep commands, their /data/... paths moved under a
    scratch folder (a gzipped jsonl and a tokenizer directory there), run as shown."""
    commands = [c for c in readme_section_commands("## Prepare your data") if " -m data_prep " in c]
    assert len(commands) == 2
    data = tmp_path / "data"
    texts = documents(5, 60)
    (data / "raw").mkdir(parents=True)
    with gzip.open(data / "raw" / "web.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    (data / "tokenizers" / "mine").mkdir(parents=True)
    train_tokenizer(texts, 300, data / "tokenizers" / "mine" / "tokenizer.json")
    for command in commands:
        argv = shlex.split(command.replace("/data/", f"{data}/"))
        assert argv[:3] == [".venv/bin/python", "-m", "data_prep"]
        proc = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
    written = sorted(p.name for p in (data / "tokenized").iterdir() if p.suffix == ".idx")
    assert written == ["web-00000-of-00002_text_document.idx", "web_text_document.idx"], written
