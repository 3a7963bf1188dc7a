"""Preference data: formats, prompt splitting, truncation, malformed lines."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from decpo import data

SHARED_HH = (
    Path(__file__).resolve().parents[2]
    / "shared"
    / "data"
    / ("hh-rlhf-harmless-base-test.jsonl.gz")
)


def _write(path: Path, records: list, gz: bool = False) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in records)
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def test_prompt_chosen_rejected(tmp_path):
    path = _write(tmp_path / "p.jsonl", [{"prompt": "Q?", "chosen": " yes", "rejected": " no"}] * 3)
    pairs = data.read_pairs(path)
    assert pairs == [data.PreferencePair("Q?", " yes", " no")] * 3


def test_hh_transcripts_split_at_the_last_assistant_turn(tmp_path):
    chosen = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help?\n\nAssistant: Sure, gladly."
    rejected = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help?\n\nAssistant: No."
    path = _write(tmp_path / "hh.jsonl.gz", [{"chosen": chosen, "rejected": rejected}], gz=True)
    (pair,) = data.read_pairs(path)
    assert pair.prompt == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help?\n\nAssistant:"
    assert pair.chosen == " Sure, gladly." and pair.rejected == " No."


def test_hh_transcripts_that_diverge_earlier(tmp_path):
    chosen = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d"
    rejected = "\n\nHuman: a\n\nAssistant: x"
    (pair,) = data.read_pairs(
        _write(tmp_path / "hh.jsonl", [{"chosen": chosen, "rejected": rejected}])
    )
    assert pair.prompt == "\n\nHuman: a\n\nAssistant:"
    assert pair.chosen == " b\n\nHuman: c\n\nAssistant: d" and pair.rejected == " x"


def test_chat_messages_with_and_without_prompt(tmp_path):
    user = {"role": "user", "content": "hi"}
    good = {"role": "assistant", "content": "hello!"}
    bad = {"role": "assistant", "content": "go away"}
    path = _write(tmp_path / "c.jsonl", [{"chosen": [user, good], "rejected": [user, bad]}])
    (pair,) = data.read_pairs(path)
    assert pair.prompt == "\n\nUser: hi\n\nAssistant:"
    assert pair.chosen == " hello!" and pair.rejected == " go away"
    path = _write(tmp_path / "c2.jsonl", [{"prompt": [user], "chosen": [good], "rejected": [bad]}])
    assert data.read_pairs(path) == [pair]


def test_real_hh_data_parses():
    if not SHARED_HH.is_file():
        pytest.skip("../shared/data is not beside this checkout")
    pairs = data.read_pairs(SHARED_HH)
    assert len(pairs) > 2000
    assert all(p.prompt.endswith(data.HH_ASSISTANT) for p in pairs)
    assert sum(p.chosen != p.rejected for p in pairs) > 0.95 * len(pairs)


PAIRS = {"prompt": "p", "chosen": "c", "rejected": "r"}
HH = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}
_Q = {"role": "user", "content": "q"}
CHAT = {
    "chosen": [_Q, {"role": "assistant", "content": "a"}],
    "rejected": [_Q, {"role": "assistant", "content": "b"}],
}


@pytest.mark.parametrize(
    "first,line,message",
    [
        (PAIRS, "{not json", "Expecting"),
        (PAIRS, '{"prompt": "a", "chosen": "b"}', "keys"),
        (HH, '{"chosen": "no assistant turn", "rejected": "x"}', "Assistant"),
        (CHAT, '{"chosen": [{"role": "user"}], "rejected": []}', "messages"),
        (PAIRS, "[1, 2]", "JSON object"),
        (PAIRS, json.dumps(HH), "format"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, first, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(first) + "\n\n" + line + "\n")
    with pytest.raises(data.DataFormatError, match=rf"bad.jsonl:3: .*{message}"):
        data.read_pairs(path)


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(data.DataFormatError, match="no preference pairs"):
        data.read_pairs(tmp_path / "empty.jsonl")
    with pytest.raises(FileNotFoundError):
        data.read_pairs(tmp_path / "nope.jsonl")


def _good_lines(n: int) -> bytes:
    return "".join(json.dumps(PAIRS) + "\n" for _ in range(n)).encode()


def test_invalid_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(_good_lines(2) + b'{"prompt": "\xff", "chosen": "c", "rejected": "r"}\n')
    with pytest.raises(data.DataFormatError, match=r"bad.jsonl:3: not valid UTF-8"):
        data.read_pairs(path)


@pytest.mark.parametrize("damage", ["truncated", "corrupt", "not-gzip"])
def test_a_damaged_gzip_names_file_and_line(tmp_path, damage):
    blob = gzip.compress(_good_lines(200))
    if damage == "truncated":
        blob = blob[: len(blob) // 2]
    elif damage == "corrupt":
        blob = blob[:40] + bytes(b ^ 0x5A for b in blob[40:80]) + blob[80:]
    else:
        blob = _good_lines(3)
    path = tmp_path / "bad.jsonl.gz"
    path.write_bytes(blob)
    with pytest.raises(data.DataFormatError, match=r"bad.jsonl.gz:\d+: corrupt or truncated"):
        data.read_pairs(path)


def test_deeply_nested_json_names_file_and_line(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_bytes(_good_lines(1) + b"[" * 100_000 + b"]" * 100_000 + b"\n")
    with pytest.raises(data.DataFormatError, match=r"deep.jsonl:2: JSON nested too deeply"):
        data.read_pairs(path)


def test_a_lone_surrogate_names_file_and_line(tmp_path):
    path = tmp_path / "sur.jsonl"
    path.write_bytes(_good_lines(1) + b'{"prompt": "p", "chosen": "\\ud800", "rejected": "r"}\n')
    with pytest.raises(data.DataFormatError, match=r"sur.jsonl:2: chosen holds a lone surrogate"):
        data.read_pairs(path)


def test_identical_chosen_and_rejected_are_skipped_with_a_warning(tmp_path):
    same = {"prompt": "p", "chosen": "x", "rejected": "x"}
    path = _write(tmp_path / "pairs.jsonl", [PAIRS, same, PAIRS, same])
    with pytest.warns(data.DataWarning, match=r"skipped 2 pair.*identical.*line\(s\) 2, 4"):
        pairs = data.read_pairs(path)
    assert pairs == [data.PreferencePair("p", "c", "r")] * 2
    only_same = _write(tmp_path / "same.jsonl", [same])
    with pytest.warns(data.DataWarning), pytest.raises(data.DataFormatError, match="no preference"):
        data.read_pairs(only_same)


class _CharTokenizer:
    """One token per character; bos 1, eos 2, pad 0."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + (ord(c) % 50) for c in text]}


def test_truncation_keeps_responses_and_cuts_the_prompt_from_the_left():
    tok = _CharTokenizer()
    pairs = [data.PreferencePair("abcdefghij", "xyz", "q"), data.PreferencePair("p", "r" * 20, "s")]
    out, skipped = data.tokenize_pairs(pairs, tok, max_length=8)
    assert skipped == 1
    (tp,) = out
    # chosen = prompt tail + "xyz" + eos fits 8: the prompt keeps its last 4 tokens
    assert len(tp.chosen_ids) == 8
    assert tp.chosen_ids[-4:] == [3 + ord("x") % 50, 3 + ord("y") % 50, 3 + ord("z") % 50, 2]
    assert tp.chosen_labels[:4] == [data.IGNORE_INDEX] * 4
    assert tp.chosen_ids[:4] == [3 + ord(c) % 50 for c in "ghij"]
    assert tp.rejected_ids[:4] == tp.chosen_ids[:4]
    batch = data.collate(out, pad_id=0)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"][1].tolist() == [1] * 6 + [0] * 2


def test_synthetic_task_is_seeded():
    assert data.synthetic_pairs(5, 1) == data.synthetic_pairs(5, 1)
    assert data.synthetic_pairs(5, 1) != data.synthetic_pairs(5, 2)


def test_synthetic_task_has_many_prompts():
    pairs = data.synthetic_pairs(2000, 0)
    assert len({p.prompt for p in pairs}) > 500  # 800 possible; the split holds whole prompts out


# ------------------------------------------------------------------ held-out split


def _no_shared_prompt(train: list, held: list) -> bool:
    return not {p.prompt for p in train} & {p.prompt for p in held}


def test_split_holds_out_whole_prompts():
    p = data.PreferencePair
    pairs = [p("a", "1", "2"), p("b", "1", "2"), p("a", "3", "4"), p("c", "1", "2"),
             p("a", "5", "6"), p("d", "1", "2")]  # fmt: skip
    for seed in range(20):
        train, held = data.split_by_prompt(pairs, 0.2, seed)
        assert _no_shared_prompt(train, held)
        assert sorted(map(repr, train + held)) == sorted(map(repr, pairs))
        assert len(held) >= 1 and len(train) >= 1
        assert [x for x in pairs if x in held] == held  # input order kept
    # Prompt "a" (3 of 6 pairs) is held out together or not at all.
    held_sizes = {len(data.split_by_prompt(pairs, 0.2, s)[1]) for s in range(20)}
    assert held_sizes == {1, 3}


def test_split_of_the_synthetic_task_and_its_fraction():
    pairs = data.synthetic_pairs(2000, 0)
    train, held = data.split_by_prompt(pairs, 0.1, 0)
    assert _no_shared_prompt(train, held)
    assert not set(train) & set(held)  # hence no identical pair either
    assert 200 <= len(held) < 200 + 12  # stops at the first prompt reaching 10%
    assert len({x.prompt for x in held}) > 50


@pytest.mark.skipif(not SHARED_HH.is_file(), reason="needs ../shared/data (HH)")
def test_split_of_hh_has_no_eval_prompt_in_training():
    pairs = data.read_pairs(SHARED_HH)
    train, held = data.split_by_prompt(pairs, 0.1, 0)
    assert _no_shared_prompt(train, held)
    assert len(held) >= len(pairs) // 10


def test_split_refuses_a_single_prompt_and_bad_fractions():
    same = [data.PreferencePair("q", "1", "2"), data.PreferencePair("q", "3", "4")]
    with pytest.raises(ValueError, match="distinct prompt"):
        data.split_by_prompt(same, 0.5, 0)
    with pytest.raises(ValueError, match="eval_fraction"):
        data.split_by_prompt(same, 1.0, 0)


def test_train_split_depends_on_split_seed_not_on_seed():
    from decpo import models, train

    tokenizer = models.build_tokenizer(data.demo_corpus()[:300], vocab_size=300)

    def held_prompts(**kwargs):
        cfg = train.Config(demo_pairs=300, max_length=64, **kwargs)
        train_set, eval_set, _ = train.load_data(cfg, tokenizer)
        prompts = [tuple(x.chosen_ids[: x.prompt_len]) for x in eval_set]
        assert not set(prompts) & {tuple(x.chosen_ids[: x.prompt_len]) for x in train_set}
        return prompts

    assert held_prompts(seed=0) == held_prompts(seed=7)
    assert held_prompts(seed=0) != held_prompts(seed=0, split_seed=1)


def test_default_hooked_layers_follow_the_official_depth():
    from transformers import LlamaConfig, LlamaForCausalLM

    from decpo import models, train

    # The official script hooks layer 10 of Llama-2-7B's 32; other depths scale with it.
    assert models.default_dec_layers(32) == [10]
    assert [models.default_dec_layers(n)[0] for n in (1, 12, 24, 28, 40)] == [0, 4, 8, 9, 13]
    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=12,
                                         num_attention_heads=2, vocab_size=20))  # fmt: skip
    assert train.hooked_layers(train.Config(model="/some/model"), model) == [4]
    assert train.hooked_layers(train.Config(), model) is None  # the tiny demo: every layer
    assert train.hooked_layers(train.Config(model="/m", dec_layers="all"), model) is None
    assert train.hooked_layers(train.Config(model="/m", dec_layers="2,3"), model) == [2, 3]
