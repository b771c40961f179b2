"""Federated data: the Shakespeare partition, splits, blocks, text folders."""

import time

import pytest
import torch

from pocketfed.config import DataConfig
from pocketfed.data import shakespeare, textdir
from pocketfed.data.federated import load_dataset, split_pieces, to_blocks
from pocketfed.errors import UserError


def test_to_be_or_not_to_be_is_hamlets():
    roles = shakespeare.load_roles()
    owners = [d for d, speeches in roles.items() if any("To be, or not to be" in s for s in speeches)]
    assert owners == ["hamlet/HAM"]


def test_parse_play_by_hand():
    text = "ACT I.\n\nHam.\nA little more than kin,\n[Aside.] and less than kind!\n\n[Exit.]\n\nKing.\nHow is it\nthat the clouds still hang on you?\n\nHam.\nNot so, my lord.\n"
    assert shakespeare.parse_play(text) == {
        "HAM": ["A little more than kin,\nand less than kind!", "Not so, my lord."],
        "KING": ["How is it\nthat the clouds still hang on you?"],
    }


def test_corpus_is_large_and_builds_fast(tiny_base):
    shakespeare.load_roles.cache_clear()
    start = time.perf_counter()
    ds = load_dataset(DataConfig(min_train_tokens=0), tiny_base.tokenizer)
    elapsed = time.perf_counter() - start
    assert len(ds.device_ids) > 1000  # every speaking role of every play
    assert elapsed < 10, f"building {len(ds.device_ids)} devices took {elapsed:.1f}s"


def test_split_keeps_later_lines_for_test():
    pieces = [f"line {i}" for i in range(10)]
    train, test = split_pieces(pieces, 0.2)
    assert train == pieces[:8] and test == pieces[8:]
    assert split_pieces(pieces, 0.2) == (train, test)  # deterministic
    assert split_pieces(["only"], 0.2) == (["only"], [])


def test_blocks_pad_and_mask_the_tail():
    b = to_blocks([5, 6, 7, 8, 9], seq_len=2, pad_id=0)
    assert b.input_ids.tolist() == [[5, 6], [7, 8], [9, 0]]
    assert b.mask.tolist() == [[True, True], [True, True], [True, False]]
    assert b.num_tokens == 5


def test_min_size_filter(tiny_base):
    cfg = DataConfig(min_train_tokens=2000)
    ds = load_dataset(cfg, tiny_base.tokenizer)
    counts = ds.train_token_counts(ds.device_ids)
    assert min(counts) >= 2000 and "hamlet/HAM" in ds.device_ids
    hamlet = ds.device("hamlet/HAM")
    assert hamlet.train.num_tokens == counts[ds.device_ids.index("hamlet/HAM")]
    assert hamlet.test.num_tokens > 0


def test_textdir_devices(tmp_path, tiny_base):
    (tmp_path / "alice").mkdir()
    (tmp_path / "alice" / "notes.md").write_text("first note\n\nsecond note\n\nthird note\n" * 20)
    (tmp_path / "bob").mkdir()
    (tmp_path / "bob" / "msgs.jsonl").write_text('{"text": "hello there"}\n{"text": "see you soon"}\n' * 20)
    ds = load_dataset(DataConfig(dataset="textdir", path=str(tmp_path), min_train_tokens=10), tiny_base.tokenizer)
    assert ds.device_ids == ["alice", "bob"]
    assert ds.pieces("bob")[:2] == ["hello there", "see you soon"]
    assert isinstance(ds.device("alice").train.input_ids, torch.Tensor)


@pytest.mark.parametrize(
    "name, content, words",
    [
        ("empty.txt", "", "empty.txt is empty"),
        ("bad.jsonl", "{not json}\n", "bad.jsonl: line 1 is not valid JSON"),
        ("nofield.jsonl", '{"body": "x"}\n', 'no string "text" field'),
        ("latin1.txt", b"caf\xe9 \xff", "is not UTF-8 text"),
    ],
)
def test_textdir_bad_files_name_the_file(tmp_path, name, content, words):
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(UserError, match=words):
        textdir.read_device(tmp_path)


def test_unknown_dataset(tiny_base):
    with pytest.raises(UserError, match="unknown dataset 'mnist'; valid datasets are: shakespeare, textdir"):
        load_dataset(DataConfig(dataset="mnist"), tiny_base.tokenizer)
