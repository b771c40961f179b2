"""Runtime: load, KV-cache session, generate, suggest, privacy lock, import hygiene, bad input."""

import importlib
import json
import subprocess
import sys

import numpy as np
import pytest

from pocketfed.errors import UserError
from pocketfed.runtime import Session, generate, load, privacy_lock, suggest
from pocketfed.runtime.privacy_lock import host_id
from pocketfed.runtime.suggest import _is_continuation, _is_word_start, _split


@pytest.fixture(scope="module")
def int4(pf):
    return load(pf.export("onnx-int4"))


def test_runtime_imports_no_training_code():
    code = (
        "import sys, pocketfed.runtime, pocketfed.runtime.bench;"
        "print(sorted(m for m in sys.modules if m.startswith(('pocketfed', 'torch', 'transformers', 'peft'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = eval(out)  # noqa: S307 (our own printed list)
    # dependency-free foundations (files: the atomic write a device home's `current` goes through)
    shared = {"pocketfed", "pocketfed.errors", "pocketfed.memory", "pocketfed.egress", "pocketfed.files", "pocketfed.signing"}
    assert all(m in shared or m.startswith("pocketfed.runtime") for m in loaded), loaded


def test_session_reuses_the_shared_prefix(int4):
    ids = int4.encode("To be, or not to be, that is the question")
    s = Session(int4, 64)
    s.feed(ids)
    assert s.steps == len(ids)
    changed = ids[:-1] + [ids[-1] + 1]
    got = s.feed(changed)
    assert s.steps == len(ids) + 1  # only the changed last token ran
    fresh = Session(int4, 64).feed(changed)
    assert np.abs(got - fresh).max() < 1e-4


def test_session_answers_a_sequence_it_fed_lately_without_running_it(int4):
    ids = int4.encode("To be, or not to be, that is the question")
    s = Session(int4, 64)
    first = s.feed(ids)
    longer = s.feed(ids + [ids[0]])
    steps = s.steps
    again = s.feed(ids)  # a keyboard asking again about the same text
    assert s.steps == steps and np.array_equal(again, first)
    assert not again.flags.writeable  # handed out twice: nobody may change it
    # the cache was left holding ids + [ids[0]]; the next feed that runs brings it to what it asks for
    other = ids[:-1] + [ids[-1] + 1]
    got = s.feed(other)
    assert s.steps == steps + 1 and np.abs(got - Session(int4, 64).feed(other)).max() < 1e-4
    for extra in range(Session.REMEMBERED):  # the memo keeps the last REMEMBERED sequences only
        s.feed(ids + [extra + 2])
    s.feed(ids)
    assert s.steps > steps + 1 + Session.REMEMBERED
    assert np.abs(s.feed(ids + [ids[0]]) - longer).max() < 1e-4


def test_rows_branch_from_a_shared_prefix_in_one_step(int4):
    """feed_rows: each sequence's logits are those a fresh single-row session computes, the shared
    prefix's cache is copied between rows (not run again), and the last tokens run as one batch."""
    ctx = int4.encode("To be, or not to be, that is the question")
    a, b, c, d = int4.encode(" whether")[0], int4.encode(" tis")[0], int4.encode(" nobler")[0], int4.encode(" the")[0]
    s = Session(int4, 64, rows=3)
    s.feed(ctx)
    steps, batches = s.steps, s.batches
    seqs = [ctx + [a], ctx + [b], ctx + [c]]
    got = s.feed_rows(seqs)
    assert (s.steps, s.batches) == (steps + 3, batches + 1)
    for ids, logits in zip(seqs, got):
        assert np.abs(logits - Session(int4, 64).feed(ids)).max() < 1e-4
    # rows of different lengths in one step; one of them shorter than the context (a rewind)
    seqs = [ctx + [a, d], ctx + [c, a], ctx[:-1] + [d]]
    got = s.feed_rows(seqs)
    assert (s.steps, s.batches) == (steps + 6, batches + 2)
    for ids, logits in zip(seqs, got):
        assert np.abs(logits - Session(int4, 64).feed(ids)).max() < 1e-4
    # a sequence no row holds a prefix of is run up to its last token in its row first
    other = int4.encode("Good night, sweet prince")
    mixed = s.feed_rows([other, seqs[0], ctx + [b]])  # seqs[0]: remembered, runs nothing
    assert np.array_equal(mixed[1], got[0]) and s.batches == batches + 2 + 2  # other's prefix, then one step
    assert np.abs(mixed[0] - Session(int4, 64).feed(other)).max() < 1e-4
    assert np.abs(mixed[2] - Session(int4, 64).feed(ctx + [b])).max() < 1e-4
    with pytest.raises(ValueError, match="3-row"):
        s.feed_rows([ctx] * 4)


def test_common_prefix_by_hand():
    from pocketfed.runtime.model import _common

    assert _common([1, 2, 3], [1, 2, 3, 4]) == 3 and _common([1, 2, 3, 4], [1, 2, 3]) == 3
    assert _common([1, 2, 3], [1, 9, 3]) == 1 and _common([5], [6]) == 0 and _common([], [1]) == 0
    assert _common([1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6, 0]) == 6


def test_rows_are_assigned_by_the_prefix_they_hold_by_hand():
    from pocketfed.runtime.model import assign_rows, longest_prefix

    held = [[1, 2, 3], [1, 2, 7, 8], [5]]
    # [1, 2, 7, 8, 9] extends row 1 entirely (4 tokens before its last), [1, 2, 3, 4] row 0 (3);
    # a batch of two runs on rows 0 and 1
    assert assign_rows(held, [[1, 2, 3, 4], [1, 2, 7, 8, 9]]) == [(0, [1, 2, 3, 4]), (1, [1, 2, 7, 8, 9])]
    assert assign_rows(held, [[1, 2, 7, 8, 9], [1, 2, 3, 4]]) == [(0, [1, 2, 3, 4]), (1, [1, 2, 7, 8, 9])]
    # both want row 0 ([1, 2, 3] holds 3 of the first, 2 of the second): the longer claim wins it
    assert assign_rows(held, [[1, 2, 9], [1, 2, 3, 6]]) == [(0, [1, 2, 3, 6]), (1, [1, 2, 9])]
    assert longest_prefix(held, [1, 2, 7, 0]) == (1, 3) and longest_prefix(held, [4]) == (0, 0)


def test_batched_search_finds_the_words_of_one_expansion_at_a_time(int4, monkeypatch):
    """Expanding the WIDTH best entries per step emits the same words in the same order as plain
    best-first (one entry per step), given the steps; and a session without feed_rows (llama.cpp's
    in bench_decode) gets the same words from sequential feeds."""
    sg = importlib.import_module("pocketfed.runtime.suggest")  # the module (the package exports the function)

    class OneByOne:  # Session.feed only
        def __init__(self) -> None:
            self.inner = Session(int4, sg.SUGGEST_CACHE)

        def feed(self, ids):
            return self.inner.feed(ids)

    prefixes = ("To be, or not to be, that is the ", "My lord, I will ", "But soft, what light through yo", "Good night, sweet ")
    monkeypatch.setattr(sg, "MAX_STEPS", 64)
    batched = Session(int4, sg.SUGGEST_CACHE, rows=sg.WIDTH)
    wide = [suggest(int4, p, session=batched) for p in prefixes]
    assert wide == [suggest(int4, p, session=OneByOne()) for p in prefixes]
    monkeypatch.setattr(sg, "WIDTH", 1)
    single = Session(int4, sg.SUGGEST_CACHE)
    assert wide == [suggest(int4, p, session=single) for p in prefixes]
    assert batched.batches < single.batches


def test_generate_streams_greedy_tokens(int4):
    pieces = list(generate(int4, "My lord,", max_tokens=8))
    assert 1 <= len(pieces) <= 8
    ids = int4.encode("My lord,")
    s = Session(int4, 32)
    for _ in range(len(pieces)):
        ids.append(int(np.argmax(s.feed(ids))))
    assert "".join(pieces) == int4.decode(ids[len(int4.encode("My lord,")):])


def test_generate_refuses_too_long(int4):
    with pytest.raises(UserError, match="context"):
        list(generate(int4, "word " * 10, max_tokens=int4.context_length))


def test_word_rules_pinned():
    assert _split("To be or not to b") == ("To be or not to", "b")
    assert _split("To be or ") == ("To be or", "")
    assert _split("") == ("", "")
    assert _is_word_start(" the") and _is_word_start(" don't")
    assert not _is_word_start("the") and not _is_word_start(" ,") and not _is_word_start(" 42")
    assert _is_continuation("orrow") and _is_continuation("'s")
    assert not _is_continuation(" the") and not _is_continuation(".")


def test_suggest_three_distinct_words(int4):
    for prefix in ("To be, or not to be, that is the ", "My lord, I will ", "Good night, sweet "):
        words = suggest(int4, prefix)
        assert len(words) == 3, (prefix, words)
        assert len({w.lower() for w in words}) == 3
        assert all(w.replace("'", "").replace("-", "").isalpha() for w in words), words


def test_suggest_completes_the_word_being_typed(int4):
    words = suggest(int4, "To be, or not to be, that is the qu")
    assert words and all(w.lower().startswith("qu") for w in words), words


def test_suggest_whole_words_not_subword_tokens(int4):
    """Each suggestion is a greedy expansion to a word boundary: appending it, the model's next
    token starts a new word or is punctuation, not a continuation of the same word."""
    from pocketfed.runtime.suggest import _Vocab

    vocab = _Vocab(int4.token_text())
    prefix = "My lord, I will"
    for w in suggest(int4, prefix + " "):
        ids = int4.encode(prefix + " " + w)
        if int4.decode(ids[len(int4.encode(prefix)):]) != " " + w or len(ids) - len(int4.encode(prefix)) >= 4:
            continue  # tokenized differently from how it was generated, or cut at MAX_WORD_TOKENS
        nxt = int(np.argmax(Session(int4, 64).feed(ids)))
        assert not vocab.continues[nxt], (w, int4.token_text()[nxt])


def test_vocab_finds_the_words_that_agree_with_what_is_typed():
    """`agreeing` (binary search in the sorted words) against its definition, by hand: a token's
    lowercase word extends the typed letters, or is a non-empty prefix of them."""
    from pocketfed.runtime.suggest import _Vocab

    texts = [" to", " Tomorrow", "t", " t", "o", " top", "-", " b", "ab", " TOP", " toe's", ",", " tox", "to"]
    vocab = _Vocab(texts)
    hits = {t for t, ok in zip(texts, vocab.agreeing("to")) if ok}
    assert hits == {" to", " Tomorrow", "t", " t", " top", " TOP", " toe's", " tox", "to"}
    assert {t for t, ok in zip(texts, vocab.agreeing("tom")) if ok} == {" to", " Tomorrow", "t", " t", "to"}
    assert {t for t, ok in zip(texts, vocab.agreeing("tomorrowland")) if ok} == {" to", " Tomorrow", "t", " t", "to"}
    assert not vocab.agreeing("z").any()


def test_load_refuses_bad_folders(pf, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no manifest.json"):
        load(tmp_path / "empty")
    with pytest.raises(UserError, match="runs in llama.cpp"):
        load(pf.export("gguf-q4_0"))


def test_load_refuses_a_corrupt_model_file(pf, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(pf.export("onnx-int4"), bad)
    data = (bad / "model.onnx").read_bytes()
    (bad / "model.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="wrong size"):
        load(bad)
    # same size, garbage content: the session itself refuses it
    (bad / "model.onnx").write_bytes(b"\x00garbage" * (len(data) // 8) + b"\x00" * (len(data) % 8))
    with pytest.raises(UserError, match="could not be loaded"):
        load(bad)


# ---- privacy lock ----


def _export_with(tmp_path, pf, **manifest_changes):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(pf.export("gguf-q4_0"), folder)
    m = json.loads((folder / "manifest.json").read_text())
    m.update(manifest_changes)
    (folder / "manifest.json").write_text(json.dumps(m))
    return folder


def test_privacy_lock_with_ledger(pf, tmp_path):
    folder = _export_with(tmp_path, pf)
    home = tmp_path / "home"
    home.mkdir()
    lines = [{"kind": "update", "bytes": 1000}] * 3 + [{"kind": "metrics"}, {"kind": "refusal", "requested_kind": "text"}]
    (home / "ledger.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n{not json\n")
    line = privacy_lock(folder, home)
    assert line.startswith("privacy lock: made on this device; trained with DP epsilon=2.5, delta=1.0e-05;")
    assert "your personal data was not shared (ledger: 4 messages left this device" in line
    assert "update x3" in line and "metrics x1" in line and "1 refused and kept" in line


def test_privacy_lock_flags_raw_data_and_other_machines(pf, tmp_path):
    folder = _export_with(tmp_path, pf, made_on="someone-else", privacy=None)
    home = tmp_path / "home"
    home.mkdir()
    (home / "ledger.jsonl").write_text(json.dumps({"kind": "raw_text_upload"}) + "\n")
    line = privacy_lock(folder, home)
    assert "made on another machine" in line and "epsilon" not in line
    assert "WARNING" in line and "raw_text_upload" in line and "not shared" not in line


def test_privacy_lock_without_ledger(pf, tmp_path):
    folder = _export_with(tmp_path, pf)
    assert json.loads((folder / "manifest.json").read_text())["made_on"] == host_id()
    line = privacy_lock(folder, tmp_path / "no-home")
    assert "no egress ledger" in line and "not shared" not in line
    assert privacy_lock(folder) == line


def test_suggest_half_typed_word_three_completions_trailing_space_next_word(int4):
    """No trailing space: three distinct words completing the typed part (keeping its letters as
    typed); a trailing space: the next word, whatever it starts with."""
    for prefix in ("To be, or not to be, that is the qu", "My lord, I will b", "Good night, sweet pr"):
        typed = prefix.split()[-1]
        words = suggest(int4, prefix)
        assert len(words) == 3 and len({w.lower() for w in words}) == 3, (prefix, words)
        assert all(w.startswith(typed) and len(w) > len(typed) - 1 for w in words), (prefix, words)
        assert all(w.replace("'", "").replace("-", "").isalpha() for w in words), words
    after_space = suggest(int4, "To be, or not to be, that is the qu ")
    assert len(after_space) == 3 and not all(w.lower().startswith("qu") for w in after_space)


def test_thread_settings_follow_the_cpu(monkeypatch):
    from pocketfed.runtime import model as rt

    monkeypatch.setattr(rt, "usable_cpus", lambda: 2)
    monkeypatch.setattr(rt, "other_cpu_load", lambda: 0.1)  # idle: the second thread may spin
    assert rt.choose_settings() == (2, True)
    monkeypatch.setattr(rt, "other_cpu_load", lambda: 1.0)  # another process holds a core: one thread
    assert rt.choose_settings() == (1, False)
    assert rt.choose_settings(threads=2) == (2, False)  # two asked for: they sleep
    monkeypatch.setattr(rt, "other_cpu_load", lambda: 2.0)  # both cores busy: still one
    assert rt.choose_settings() == (1, False)
    monkeypatch.setattr(rt, "other_cpu_load", lambda: None)  # no /proc/stat: two threads, asleep
    assert rt.choose_settings() == (2, False)
    assert rt.choose_settings(threads=1, spin=True) == (1, False)  # nothing to spin for
    assert rt.choose_settings(threads=2, spin=True) == (2, True)
    monkeypatch.setattr(rt, "usable_cpus", lambda: 1)
    assert rt.choose_settings() == (1, False)
    with pytest.raises(UserError, match="threads must be at least 1"):
        rt.choose_settings(threads=0)


def test_other_cpu_load_sees_a_busy_process():
    from pocketfed.runtime.model import other_cpu_load

    if other_cpu_load() is None:
        pytest.skip("no /proc/stat")
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        import time

        time.sleep(0.3)
        assert other_cpu_load(0.5) > 0.5  # one spinning process: about one CPU
    finally:
        busy.kill()
        busy.wait()


def test_load_reports_its_settings(pf):
    m = load(pf.export("onnx-int4"), threads=2, spin=False)
    assert (m.threads, m.spin) == (2, False)
