import json
import os
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers

import letkit.atomic
import letkit.data.shards as shard_writer
from letkit.data import ShardedTokenLoader, WindowPermutation, load_index, token_dtype, tokenize_corpus
from letkit.token_alignment import TeacherTokenizedLoader, decode_with_offsets, tokenize_for_teacher

WORDS = [f"w{i}" for i in range(60)]


def make_tokenizer(path):
    vocab = {"<unk>": 0, "<|endoftext|>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path))
    return tokenizer


def random_docs(n, seed):
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(1, 30))) for _ in range(n)]


@pytest.fixture
def corpus(tmp_path):
    """Two .txt files and one .jsonl file (with an empty document to skip), and a word-level tokenizer."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    docs = {"a.txt": random_docs(40, 0), "sub/b.txt": random_docs(25, 1), "c.jsonl": random_docs(30, 2)}
    (src / "a.txt").write_text("\n".join(docs["a.txt"]) + "\n\n")
    (src / "sub/b.txt").write_text("\n".join(docs["sub/b.txt"]))
    (src / "c.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs["c.jsonl"])) + '{"text": ""}\n')
    tokenizer = make_tokenizer(tmp_path / "tokenizer.json")
    # the expected token stream, in sorted source order: every document then <|endoftext|> (id 1)
    expected = [t for name in sorted(docs, key=lambda n: str(src / n)) for d in docs[name] for t in tokenizer.encode(d).ids + [1]]
    return src, tmp_path / "tokenizer.json", np.array(expected)


def read_stream(out):
    index = load_index(out)
    return np.concatenate([np.load(out / s["path"]) for s in index["shards"]]), index


def test_round_trip_and_shard_layout(corpus, tmp_path):
    src, tok, expected = corpus
    out = tmp_path / "out"
    index = tokenize_corpus([src], out, tok, shard_tokens=50, num_workers=1)
    stream, on_disk = read_stream(out)
    assert on_disk == index
    np.testing.assert_array_equal(stream, expected)
    assert index["dtype"] == "uint16" and stream.dtype == np.uint16
    assert index["total_tokens"] == expected.size and index["vocab_size"] == 62 and index["eos_id"] == 1
    shards = [np.load(out / s["path"]) for s in index["shards"]]
    assert len(shards) > 3
    assert all(s[-1] == 1 for s in shards)  # cut at document boundaries
    per_source = {}
    for s, meta in zip(shards, index["shards"]):
        per_source.setdefault(meta["path"].split("/")[1][:5], []).append(s.size)
    for sizes in per_source.values():  # every shard but a file's last holds >= shard_tokens tokens
        assert all(n >= 50 for n in sizes[:-1])


def test_parallel_workers_write_the_same_shards(corpus, tmp_path):
    src, tok, _ = corpus
    serial = tokenize_corpus([src], tmp_path / "serial", tok, shard_tokens=64, num_workers=1)
    parallel = tokenize_corpus([src], tmp_path / "parallel", tok, shard_tokens=64, num_workers=2)
    assert serial == parallel
    for s in serial["shards"]:
        assert (tmp_path / "serial" / s["path"]).read_bytes() == (tmp_path / "parallel" / s["path"]).read_bytes()


def crash_on_fourth_shard(monkeypatch) -> list[str]:
    """Make the fourth shard write raise KeyboardInterrupt; returns the names of the shards written before it."""
    real_write = shard_writer.atomic_write
    written = []

    def write_or_crash(path, write):
        if path.suffix == ".npy":
            if len(written) == 3:
                raise KeyboardInterrupt("simulated crash")
            written.append(path.name)
        real_write(path, write)

    for module in (shard_writer, letkit.atomic):  # shards directly, JSON files through atomic_write_json
        monkeypatch.setattr(module, "atomic_write", write_or_crash)
    return written


def test_interrupted_run_resumes_after_its_last_finished_shard(corpus, tmp_path, monkeypatch):
    src, tok, expected = corpus
    out = tmp_path / "out"
    real_write = shard_writer.atomic_write
    written = crash_on_fourth_shard(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        tokenize_corpus([src], out, tok, shard_tokens=40, num_workers=1)
    assert not (out / "index.json").exists()
    with pytest.raises(ValueError, match="has no index.json"):
        ShardedTokenLoader(out, seq_len=4, batch_size=1)
    first_run = {name: (out / "parts" / name).stat().st_mtime_ns for name in written}

    rewritten = []
    for module in (shard_writer, letkit.atomic):
        monkeypatch.setattr(module, "atomic_write",
                            lambda path, write: (rewritten.append(Path(path).name), real_write(path, write)))
    tokenize_corpus([src], out, tok, shard_tokens=40, num_workers=1)
    stream, index = read_stream(out)
    np.testing.assert_array_equal(stream, expected)
    assert not set(written) & set(rewritten)  # finished shards were not redone
    assert all((out / "parts" / n).stat().st_mtime_ns == t for n, t in first_run.items())
    fresh = tokenize_corpus([src], tmp_path / "fresh", tok, shard_tokens=40, num_workers=1)
    assert fresh["shards"] == index["shards"]

    rewritten.clear()
    tokenize_corpus([src], out, tok, shard_tokens=40, num_workers=1)  # all done: nothing but index.json rewritten
    assert rewritten == ["index.json"]


def shard_files(out):
    return sorted(p.name for p in (out / "parts").glob("*.npy"))


def test_changed_source_is_redone_and_changed_settings_refused(corpus, tmp_path):
    src, tok, _ = corpus
    out = tmp_path / "out"
    tokenize_corpus([src], out, tok, shard_tokens=50, num_workers=1)
    (src / "a.txt").write_text("w1 w2 w3\n")
    stream, _ = read_stream(out)
    index = tokenize_corpus([src], out, tok, shard_tokens=50, num_workers=1)
    assert index["shards"][0]["tokens"] == 4  # w1 w2 w3 <eos>
    assert index["total_tokens"] < stream.size
    assert shard_files(out) == sorted(s["path"].removeprefix("parts/") for s in index["shards"])  # old a.txt shards gone
    with pytest.raises(ValueError, match="other settings \\(shard_tokens differ\\)"):
        tokenize_corpus([src], out, tok, shard_tokens=99, num_workers=1)


def test_rerun_over_other_files_reuses_each_unchanged_file(corpus, tmp_path, caplog):
    """The index lists exactly this run's files, as a fresh run would; every file already done is reused."""
    src, tok, _ = corpus
    out = tmp_path / "out"
    everything = tokenize_corpus([src], out, tok, shard_tokens=50, num_workers=1)
    mtimes = {name: (out / "parts" / name).stat().st_mtime_ns for name in shard_files(out)}
    only_a = tokenize_corpus([src / "a.txt"], out, tok, shard_tokens=50, num_workers=1)
    assert only_a == tokenize_corpus([src / "a.txt"], tmp_path / "fresh", tok, shard_tokens=50, num_workers=1)
    assert "2 file(s) tokenized into" in caplog.text and "are not in these inputs (first: " in caplog.text
    assert tokenize_corpus([src], out, tok, shard_tokens=50, num_workers=1) == everything  # nothing was deleted
    assert {name: (out / "parts" / name).stat().st_mtime_ns for name in shard_files(out)} == mtimes


def test_source_deleted_mid_run_is_left_out_and_the_rest_resumes(corpus, tmp_path, monkeypatch, caplog):
    src, tok, _ = corpus
    out = tmp_path / "out"
    written = crash_on_fourth_shard(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        tokenize_corpus([src], out, tok, shard_tokens=40, num_workers=1)
    monkeypatch.undo()
    finished = {name: (out / "parts" / name).stat().st_mtime_ns for name in written}
    (src / "sub" / "b.txt").unlink()  # not started yet (a.txt and c.jsonl come first in sorted order)
    listed = shard_writer.find_sources

    def delete_after_listing(inputs):  # c.jsonl is deleted after the run has listed it
        sources = listed(inputs)
        (src / "c.jsonl").unlink()
        return sources

    monkeypatch.setattr(shard_writer, "find_sources", delete_after_listing)
    resumed = tokenize_corpus([src], out, tok, shard_tokens=40, num_workers=1)
    monkeypatch.undo()
    assert f"{src / 'c.jsonl'}: deleted during the run, left out" in caplog.text
    assert resumed == tokenize_corpus([src], tmp_path / "fresh", tok, shard_tokens=40, num_workers=1)
    assert all((out / "parts" / name).stat().st_mtime_ns == t for name, t in finished.items())  # not redone


def test_tokenize_errors(corpus, tmp_path):
    src, tok, _ = corpus
    with pytest.raises(ValueError, match="does not exist"):
        tokenize_corpus([tmp_path / "missing"], tmp_path / "o1", tok)
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(ValueError, match="neither a .txt nor a .jsonl file"):
        tokenize_corpus([tmp_path / "x.csv"], tmp_path / "o2", tok)
    with pytest.raises(ValueError, match="not a tokenizer.json"):
        tokenize_corpus([src], tmp_path / "o3", tmp_path / "nope.json")
    with pytest.raises(ValueError, match="eos_token '</s>' is not in the tokenizer"):
        tokenize_corpus([src], tmp_path / "o4", tok, eos_token="</s>")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "d.jsonl").write_text('{"text": "w1"}\n{"body": "w2"}\n')
    with pytest.raises(ValueError, match=r"d.jsonl \(line 2 after byte 0\): expected a JSON object with a string 'text'"):
        tokenize_corpus([bad], tmp_path / "o5", tok, num_workers=1)
    with pytest.raises(ValueError, match="shard_tokens must be >= 1, got 0"):
        tokenize_corpus([src], tmp_path / "o6", tok, shard_tokens=0)


def test_no_eos(corpus, tmp_path):
    src, tok, expected = corpus
    index = tokenize_corpus([src], tmp_path / "out", tok, eos_token=None, num_workers=1)
    assert index["eos_id"] is None and index["total_tokens"] == np.count_nonzero(expected != 1)


def test_token_dtype():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    with pytest.raises(ValueError, match="vocab_size must be >= 1, got 0"):
        token_dtype(0)


@pytest.fixture
def shards(corpus, tmp_path):
    src, tok, expected = corpus
    out = tmp_path / "shards"
    tokenize_corpus([src], out, tok, shard_tokens=60, num_workers=1)
    return out, expected


def test_loader_windows_are_slices_of_the_shards(shards):
    out, expected = shards
    loader = ShardedTokenLoader(out, seq_len=7, batch_size=4, shuffle=False)
    index = load_index(out)
    first = np.load(out / index["shards"][0]["path"])
    batch = next(loader)
    assert batch.dtype == torch.int64 and batch.shape == (4, 8)
    for i in range(4):  # consecutive windows overlap by the one target token
        np.testing.assert_array_equal(batch[i].numpy(), first[7 * i : 7 * i + 8])
    assert loader.vocab_size == 62
    assert loader.tokenizer_file == out / "tokenizer.json"  # a copy, for checking a teacher's tokenizer against
    assert (out / "tokenizer.json").read_bytes() == (out.parent / "tokenizer.json").read_bytes()
    (out / "tokenizer.json").write_text("{}")
    assert loader.tokenizer_file is None  # not the tokenizer index.json names


def test_ranks_read_disjoint_slices_of_the_global_batch(shards):
    out, _ = shards
    whole = ShardedTokenLoader(out, seq_len=5, batch_size=6, seed=3)
    ranks = [ShardedTokenLoader(out, seq_len=5, batch_size=3, rank=r, world_size=2, seed=3) for r in range(2)]
    read = Counter()
    for _ in range(whole.num_windows // 6):  # one epoch
        global_batch = next(whole)
        parts = [next(r) for r in ranks]
        torch.testing.assert_close(torch.cat(parts), global_batch)
        read.update(tuple(row.tolist()) for row in global_batch)
    in_order = ShardedTokenLoader(out, seq_len=5, batch_size=1, shuffle=False)
    every_window = Counter(tuple(next(in_order)[0].tolist()) for _ in range(in_order.num_windows))
    assert read.total() == whole.num_windows // 6 * 6 > whole.num_windows - 6
    assert all(every_window[w] >= n for w, n in read.items())  # no window read twice within the epoch
    assert all(r.epoch == 0 for r in ranks)
    next(ranks[0])
    assert ranks[0].epoch == 1


def test_shuffle_is_deterministic_and_seeded(shards):
    out, _ = shards

    def take(seed, n=10):
        loader = ShardedTokenLoader(out, seq_len=4, batch_size=2, seed=seed)
        return torch.cat([next(loader) for _ in range(n)])

    assert torch.equal(take(0), take(0))
    assert not torch.equal(take(0), take(1))
    in_order = ShardedTokenLoader(out, seq_len=4, batch_size=2, shuffle=False)
    assert not torch.equal(take(0), torch.cat([next(in_order) for _ in range(10)]))


def test_windows_split_off_a_held_out_part_that_training_never_reads(shards):
    """windows=slice(None, -h) reads (shuffled, over epochs) only windows before the last h, which
    windows=slice(-h, None) reads in order; a resume state of one split is refused by the other, and the default
    (all windows) keeps the fingerprint of states saved before ``windows`` existed."""
    out, _ = shards
    every = ShardedTokenLoader(out, seq_len=5, batch_size=1, shuffle=False)
    all_windows = [tuple(next(every)[0].tolist()) for _ in range(every.num_windows)]
    held_out = 7
    train = ShardedTokenLoader(out, seq_len=5, batch_size=1, seed=1, windows=slice(None, -held_out))
    assert train.num_windows == len(all_windows) - held_out
    read = [tuple(next(train)[0].tolist()) for _ in range(2 * train.num_windows)]  # two epochs
    assert sorted(read) == sorted(all_windows[:-held_out] * 2) and read[:10] != all_windows[:10]  # shuffled
    validation = ShardedTokenLoader(out, seq_len=5, batch_size=held_out, shuffle=False, windows=slice(-held_out, None))
    assert [tuple(row.tolist()) for row in next(validation)] == all_windows[-held_out:]
    assert every.fingerprint == ShardedTokenLoader(out, seq_len=5, batch_size=1, windows=slice(0, None)).fingerprint
    with pytest.raises(ValueError, match=r"fingerprint=.* \(different data\)"):
        ShardedTokenLoader(out, seq_len=5, batch_size=1, seed=1).load_state_dict(train.state_dict())
    with pytest.raises(ValueError, match=r"has 7 windows .* \(windows=slice\(-7, None, None\) of its \d+\).* fewer than "
                                         r"one global batch of world_size \* batch_size = 2 \* 4"):
        ShardedTokenLoader(out, seq_len=5, batch_size=4, world_size=2, windows=slice(-held_out, None))
    with pytest.raises(ValueError, match="windows must be a slice with step 1, got slice"):
        ShardedTokenLoader(out, seq_len=5, batch_size=1, windows=slice(None, None, 2))


@pytest.mark.parametrize("stop_after", [1, 7, "epoch - 2"])
def test_resume_continues_exactly(shards, stop_after):
    out, _ = shards
    kwargs = dict(seq_len=6, batch_size=2, rank=1, world_size=2, seed=5)
    uninterrupted = ShardedTokenLoader(out, **kwargs)
    crosses_epoch = stop_after == "epoch - 2"
    if crosses_epoch:  # the resumed loader goes on into the next epoch
        stop_after = uninterrupted.num_windows // uninterrupted.global_batch - 2
    want = [next(uninterrupted) for _ in range(stop_after + 25)]
    first = ShardedTokenLoader(out, **kwargs)
    for _ in range(stop_after):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = ShardedTokenLoader(out, **kwargs)
    resumed.load_state_dict(state)
    for i in range(25):
        assert torch.equal(next(resumed), want[stop_after + i])
    assert resumed.state_dict() == uninterrupted.state_dict()
    assert resumed.epoch == (1 if crosses_epoch else 0)


def test_loader_errors(shards, tmp_path):
    out, expected = shards
    with pytest.raises(ValueError, match="seq_len must be >= 1, got 0"):
        ShardedTokenLoader(out, seq_len=0, batch_size=1)
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size=2\)"):
        ShardedTokenLoader(out, seq_len=4, batch_size=1, rank=2, world_size=2)
    with pytest.raises(ValueError, match="fewer than one global batch of world_size \\* batch_size = 4 \\* 1000"):
        ShardedTokenLoader(out, seq_len=4, batch_size=1000, world_size=4)
    loader = ShardedTokenLoader(out, seq_len=4, batch_size=2)
    with pytest.raises(ValueError, match="seq_len=4 but this loader has seq_len=8"):
        ShardedTokenLoader(out, seq_len=8, batch_size=2).load_state_dict(loader.state_dict())
    other = tmp_path / "other"
    tokenize_corpus([tmp_path / "src" / "a.txt"], other, tmp_path / "tokenizer.json", num_workers=1)
    with pytest.raises(ValueError, match="fingerprint=.* \\(different data\\)"):
        ShardedTokenLoader(other, seq_len=4, batch_size=2).load_state_dict(loader.state_dict())
    (out / "index.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="has format 'something-else'"):
        ShardedTokenLoader(out, seq_len=4, batch_size=2)


def test_cli(corpus, tmp_path):
    src, tok, expected = corpus
    assert shard_writer.main([str(src), "--tokenizer", str(tok), "--output", str(tmp_path / "cli"), "--workers", "1",
                      "--shard-tokens", "80"]) == 0
    stream, _ = read_stream(tmp_path / "cli")
    np.testing.assert_array_equal(stream, expected)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 3000), seed=st.integers(0, 2**32))
def test_window_permutation_is_a_bijection(n, seed):
    permutation = WindowPermutation(n, [seed, 0])
    images = permutation(np.arange(n))
    np.testing.assert_array_equal(np.sort(images), np.arange(n))
    np.testing.assert_array_equal(permutation(np.arange(n)[::-1][:7]), images[::-1][:7])  # per index, any order
    if n > 50:  # not the identity, and another seed gives another order
        assert not np.array_equal(images, np.arange(n))
        assert not np.array_equal(images, WindowPermutation(n, [seed, 1])(np.arange(n)))


def test_window_permutation_errors():
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        WindowPermutation(0, 1)
    with pytest.raises(ValueError, match=r"indices must be in \[0, n=10\), got values in \[3, 10\]"):
        WindowPermutation(10, 1)([3, 10])


def test_batches_mix_windows_of_all_shards(shards):
    """A global shuffle: consecutive batches are not runs of one shard (the order within a shard was not enough)."""
    out, _ = shards
    loader = ShardedTokenLoader(out, seq_len=3, batch_size=8, seed=0)
    n_shards = len(loader.windows_per_shard)
    assert np.median(loader.windows_per_shard) > 16 and n_shards > 10  # a shard could fill whole batches
    per_batch = []
    for b in range(loader.num_windows // 8):
        shard, window = loader.locate(np.arange(8 * b, 8 * b + 8))
        assert (window < loader.windows_per_shard[shard]).all()
        per_batch.append(len(set(shard.tolist())))
    assert np.mean(per_batch) > 5, per_batch  # 8 windows drawn from > 10 shards: ~6.5 distinct expected
    shard, window = loader.locate(np.arange(loader.num_windows))  # a permutation of all (shard, window) pairs
    assert len(set(zip(shard.tolist(), window.tolist()))) == loader.num_windows
    in_order = ShardedTokenLoader(out, seq_len=3, batch_size=8, shuffle=False)
    shard, window = in_order.locate(np.arange(in_order.num_windows))
    np.testing.assert_array_equal(shard, np.repeat(np.arange(n_shards), in_order.windows_per_shard))


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="counts memory maps in /proc/self/maps")
def test_open_shards_are_bounded(shards):
    out, _ = shards
    loader = ShardedTokenLoader(out, seq_len=3, batch_size=8, seed=0)
    for _ in range(2 * loader.num_windows // 8):  # two epochs, touching every shard
        next(loader)
    with open("/proc/self/maps") as f:
        mapped = {line.split()[-1] for line in f if str(out) in line}
    assert len(loader.windows_per_shard) > ShardedTokenLoader.MAX_OPEN_SHARDS
    assert 0 < len(mapped) <= ShardedTokenLoader.MAX_OPEN_SHARDS, mapped


def teacher_tokenizer():
    """Another tokenizer for the same text: 'w12' -> 'w', '1', '2'; knows <|endoftext|> as a special token."""
    vocab = {"<unk>": 0, "<|endoftext|>": 1, "w": 2, **{str(d): d + 3 for d in range(10)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)])
    tokenizer.add_special_tokens(["<|endoftext|>"])
    return tokenizer


def test_decode_with_offsets_spans_tile_the_text():
    tokenizer = make_tokenizer_object()
    ids = [2, 3, 1, 40, 5]
    text, offsets = decode_with_offsets(ids, tokenizer)
    assert text == "w0 w1 <|endoftext|> w38 w3"
    assert [text[a:b] for a, b in offsets] == ["w0", " w1", " <|endoftext|>", " w38", " w3"]


def test_tokenize_for_teacher_refuses_bad_inputs():
    target, teacher = make_tokenizer_object(), teacher_tokenizer()
    with pytest.raises(ValueError, match=re.escape("inputs must be a [B, T] tensor of token ids, got Tensor (5,)")):
        tokenize_for_teacher(torch.tensor([2, 3, 1, 40, 5]), target, teacher)
    with pytest.raises(ValueError, match="inputs must be a \\[B, T\\] tensor of token ids, got list"):
        tokenize_for_teacher([[2, 3]], target, teacher)
    with pytest.raises(ValueError, match="teacher_max_length must be >= 1 or None, got 0"):
        tokenize_for_teacher(torch.tensor([[2, 3]]), target, teacher, teacher_max_length=0)
    teacher_ids, alignment = tokenize_for_teacher(torch.tensor([[2, 3]]), target, teacher, teacher_max_length=1)
    assert teacher_ids.shape == (1, 1)  # 'w' of 'w0': it ends inside the first target token; the rest was cut
    assert alignment.mask.tolist() == [[True, False]] and alignment.hi.tolist() == [[0, 0]]


def make_tokenizer_object():
    vocab = {"<unk>": 0, "<|endoftext|>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(["<|endoftext|>"])
    return tokenizer


def test_teacher_tokenized_loader_aligns_and_resumes_exactly(shards):
    out, _ = shards
    target, teacher = make_tokenizer_object(), teacher_tokenizer()
    kwargs = dict(seq_len=6, batch_size=3, rank=1, world_size=2, seed=4)
    plain = ShardedTokenLoader(out, **kwargs)
    loader = TeacherTokenizedLoader(ShardedTokenLoader(out, **kwargs), target, teacher, mode="last", teacher_max_length=14)
    for _ in range(5):
        batch, teacher_ids, alignment = next(loader)
        assert torch.equal(batch, next(plain))  # the target batches are untouched
        assert loader.state_dict() == plain.state_dict()  # prefetching does not move the saved position
        assert teacher_ids.shape[1] <= 14 and alignment.mask.shape == (3, 6)
        for row in range(3):
            words = [target.id_to_token(i) for i in batch[row, :-1].tolist()]
            pieces = [teacher.id_to_token(i) for i in teacher_ids[row].tolist()]
            lengths = [1 if w == "<|endoftext|>" else len(w) for w in words]  # teacher tokens: 'w12' -> w, 1, 2
            first_teacher_token = np.cumsum([0] + lengths[:-1])
            for t, word in enumerate(words):
                if first_teacher_token[t] >= 14:  # cut from the teacher's input (teacher_max_length)
                    assert not alignment.mask[row, t]
                elif first_teacher_token[t] + lengths[t] <= 14:  # "last": the teacher token ending where t ends
                    assert alignment.mask[row, t]
                    assert pieces[alignment.hi[row, t]] == (word if word == "<|endoftext|>" else word[-1]), (words, pieces, t)
    state = loader.state_dict()
    resumed = TeacherTokenizedLoader(ShardedTokenLoader(out, **kwargs), target, teacher, mode="mean")
    resumed.load_state_dict(state)
    sixth = next(plain)
    assert torch.equal(next(resumed)[0], sixth)
    unwrapped = loader.close()  # the plain loader again, at the position after the last batch returned
    assert torch.equal(next(unwrapped), sixth)
    resumed.close()
    with pytest.raises(ValueError, match="mode must be one of \\('last', 'mean'\\), got 'first'"):
        TeacherTokenizedLoader(plain, target, teacher, mode="first")


def test_letkit_tokenize_command_is_the_data_cli(capsys):
    from letkit.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["tokenize", "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: letkit tokenize")


def test_letkit_tokenize_bad_input_is_a_one_line_error(corpus, tmp_path, capsys):
    from letkit.cli import main

    src, tok, _ = corpus
    missing = tmp_path / "missing.txt"
    assert main(["tokenize", str(missing), "--tokenizer", str(tok), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == f"letkit tokenize: error: input {str(missing)!r} does not exist\n"
    assert main(["tokenize", str(src), "--tokenizer", str(tmp_path / "nope.json"), "--output", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith("letkit tokenize: error: tokenizer ")
    assert not (tmp_path / "out").exists()


SLOW_TOKENIZE = """
import signal, sys, time
import letkit.data.shards
from letkit.cli import main

signal.signal(signal.SIGINT, signal.default_int_handler)  # as from a terminal, even if pytest runs with SIGINT ignored

write = letkit.data.shards.atomic_write
letkit.data.shards.atomic_write = lambda path, data: (time.sleep(0.1), write(path, data))  # workers fork with this
sys.exit(main(["tokenize", *sys.argv[1:]]))
"""


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="sends SIGINT to a process group (POSIX)")
def test_ctrl_c_stops_every_worker_and_the_rerun_resumes(tmp_path):
    """Ctrl-C in a terminal signals the whole process group: parent and workers. Slowed shard writes (0.1 s each)
    keep the run busy for many seconds, so the signal lands mid-run."""
    import signal
    import subprocess
    import sys
    import time

    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"{i}.txt").write_text("\n".join(random_docs(120, i)) + "\n")
    tok = tmp_path / "tokenizer.json"
    make_tokenizer(tok)
    out = tmp_path / "out"
    args = [str(src), "--tokenizer", str(tok), "--output", str(out), "--workers", "2", "--shard-tokens", "30"]
    child = subprocess.Popen([sys.executable, "-c", SLOW_TOKENIZE, *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list((out / "parts").glob("*.npy")) and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert child.poll() is None, child.communicate()  # still running: the signal lands mid-run
        os.killpg(child.pid, signal.SIGINT)
        interrupted = time.monotonic()
        _, err = child.communicate(timeout=30)
        stopped_after = time.monotonic() - interrupted
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    assert child.returncode == 130, err
    assert stopped_after < 30
    assert "interrupted" in err and "rerun the same command to resume" in err, err
    assert not (out / "index.json").exists()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # no worker is left running in the group
        try:
            os.killpg(child.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("worker processes still run after the command exited")

    kept = {}
    for manifest in (out / "parts").glob("*.json"):
        for part in json.loads(manifest.read_text())["parts"]:
            kept[part["file"]] = (out / "parts" / part["file"]).stat().st_mtime_ns
    assert kept  # some work was finished before the interrupt, and is not redone
    resumed = tokenize_corpus([src], out, tok, shard_tokens=30, num_workers=2)
    fresh = tokenize_corpus([src], tmp_path / "fresh", tok, shard_tokens=30, num_workers=2)
    assert resumed == fresh
    for s in fresh["shards"]:
        assert (out / s["path"]).read_bytes() == (tmp_path / "fresh" / s["path"]).read_bytes()
    assert all((out / "parts" / name).stat().st_mtime_ns == mtime for name, mtime in kept.items())
    assert not [p for p in (out / "parts").iterdir() if p.name.startswith(".tmp-")]  # no leftovers of killed writes


@pytest.mark.parametrize("workers", ["0", "-3", "two"])
def test_letkit_tokenize_refuses_a_worker_count_below_one(corpus, tmp_path, capsys, workers):
    from letkit.cli import main

    src, tok, _ = corpus
    with pytest.raises(SystemExit) as exit_info:
        main(["tokenize", str(src), "--tokenizer", str(tok), "--output", str(tmp_path / "out"), "--workers", workers])
    assert exit_info.value.code == 2
    assert f"argument --workers: must be a positive integer, got {workers!r}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    bad = workers if workers == "two" else int(workers)
    error, message = ((TypeError, "num_workers must be an int or None, got str ('two')") if workers == "two"
                      else (ValueError, f"num_workers must be >= 1 or None, got {bad}"))
    with pytest.raises(error, match=re.escape(message)):
        tokenize_corpus([src], tmp_path / "out", tok, num_workers=bad)
    assert not (tmp_path / "out").exists()


def test_binary_files_are_skipped_and_undecodable_files_reported(tmp_path, caplog):
    src = tmp_path / "src"
    src.mkdir()
    tok = tmp_path / "tokenizer.json"
    make_tokenizer(tok)
    docs = random_docs(20, 0)
    (src / "a.txt").write_text("\n".join(docs) + "\n")
    (src / "b_binary.txt").write_bytes(b"w1 w2\n" + bytes(range(256)) * 4)  # NUL bytes: not a text file
    (src / "c_latin1.txt").write_bytes("w1 w2\nw3 caf\u00e9 w4\nna\u00efve w5\n".encode("latin-1"))  # 2 bad lines
    (src / "d_latin1.jsonl").write_bytes(json.dumps({"text": "w6 X"}).replace("X", "\u00e9").encode("latin-1") + b"\n")
    index = tokenize_corpus([src], tmp_path / "out", tok, num_workers=1)
    assert f"{src / 'b_binary.txt'}: skipped, binary" in caplog.text
    assert f"skipped 1 binary file(s) (a NUL byte in the first 8192 bytes), first: {src / 'b_binary.txt'}" in caplog.text
    assert f"2 file(s) are not valid UTF-8, first: {src / 'c_latin1.txt'} (2 lines)" in caplog.text
    assert "iconv" in caplog.text
    tokenizer = Tokenizer.from_file(str(tok))
    undecodable = ["w1 w2", "w3 caf\ufffd w4", "na\ufffdve w5", "w6 \ufffd"]
    expected = [t for d in docs + undecodable for t in tokenizer.encode(d).ids + [1]]
    np.testing.assert_array_equal(read_stream(tmp_path / "out")[0], expected)

    caplog.clear()  # a rerun (every file already done) reports them again
    assert tokenize_corpus([src], tmp_path / "out", tok, num_workers=1) == index
    assert "skipped 1 binary file(s)" in caplog.text and "2 file(s) are not valid UTF-8" in caplog.text
