"""Padding-free packing (--packing) and length-aware batching (--group-by-length):
the packed layout, attention confined to each sequence, the scores, the penalty and
the logged losses equal to the padded batch's, and the data-parallel equivalence."""

from __future__ import annotations

import random

import pytest
import torch

from decpo import data, models, train
from decpo.hooks import DecorrelationHooks
from decpo.train import METRIC_KEYS
from tests.helpers import assert_same_rows, torchrun_train, train_rows

FAST = ["--max-steps", "3", "--eval-every", "3", "--save-every", "100", "--demo-pairs", "120",
        "--batch-size", "4"]  # fmt: skip


def _pairs(n: int, seed: int = 0) -> tuple[list[data.TokenizedPair], object]:
    """n tokenized pairs of uneven lengths: the demo's prompts and answers, with a seeded
    number of extra words so that chosen and rejected lengths differ."""
    tokenizer = models.build_tokenizer(data.demo_corpus()[:300], vocab_size=300)
    rng = random.Random(seed)
    pairs = [
        data.PreferencePair(p.prompt, p.chosen * rng.randint(1, 3),
                            p.rejected * rng.randint(1, 2))
        for p in data.synthetic_pairs(n, seed)
    ]  # fmt: skip
    tokenized, skipped = data.tokenize_pairs(pairs, tokenizer, 128)
    assert skipped == 0
    return tokenized, tokenizer


@pytest.fixture(scope="module")
def tiny():
    """A float64 tiny Llama with LoRA adapters that move the policy off its reference,
    and 5 pairs of uneven lengths."""
    pairs, tokenizer = _pairs(5)
    torch.manual_seed(0)
    model = models.add_lora(models.build_tiny_model(tokenizer, 0), 4, None, ["q_proj", "up_proj"])
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3)
    return model.double(), pairs, tokenizer


# ---------------------------------------------------------------- the layout


def test_pack_sequences_fills_rows_without_exceeding_the_capacity():
    rng = random.Random(0)
    lengths = [rng.randint(1, 40) for _ in range(50)]
    rows = data.pack_sequences(lengths, 64)
    assert sorted(i for row in rows for i in row) == list(range(50))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    assert len(rows) < 50 and rows == data.pack_sequences(lengths, 64)  # packed, deterministic
    assert data.pack_sequences([80, 10], 64) == [[0], [1]]  # too long: a row of its own
    with pytest.raises(ValueError, match="capacity"):
        data.pack_sequences([3], 0)


def test_collate_packed_holds_the_padded_batch():
    """Unpacked, the packed tensors are collate()'s: same tokens, same labels; position
    ids restart per sequence; no label is predicted across a sequence boundary."""
    pairs, tokenizer = _pairs(6)
    for pair in pairs:
        pair.ref_logps = (-1.0, -2.0)
    padded = data.collate(pairs, tokenizer.pad_token_id)
    packed = data.collate_packed(pairs, tokenizer.pad_token_id, 128)
    rows, width = packed["input_ids"].shape
    lengths = padded["attention_mask"].sum(1)  # (2B,)
    assert rows < 12 and width <= 128 and packed["unpack"].shape == padded["input_ids"].shape
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    unpack = packed["unpack"]
    pad = tokenizer.pad_token_id
    torch.testing.assert_close(data.unpack_tokens(packed["input_ids"], unpack, pad),
                               padded["input_ids"])  # fmt: skip
    torch.testing.assert_close(data.unpack_tokens(packed["labels"], unpack, data.IGNORE_INDEX),
                               padded["labels"])  # fmt: skip
    positions = data.unpack_tokens(packed["position_ids"], unpack, -1)
    expected = torch.arange(padded["input_ids"].shape[1]).expand_as(positions)
    real = padded["attention_mask"].bool()
    torch.testing.assert_close(positions, torch.where(real, expected, -1))
    owner = data.unpack_tokens(packed["sequence_ids"], unpack, -1)
    ids = torch.arange(12)[:, None].expand_as(owner)
    torch.testing.assert_close(owner, torch.where(padded["attention_mask"].bool(), ids, -1))
    assert (packed["sequence_ids"] >= 0).sum() == lengths.sum()  # padding only at row ends
    starts = packed["position_ids"] == 0
    assert (packed["labels"][starts] == data.IGNORE_INDEX).all()
    torch.testing.assert_close(packed["ref_logps"], padded["ref_logps"])


def test_group_by_length_sorts_within_windows():
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(96)]
    order = list(range(96))
    rng.shuffle(order)
    grouped = data.group_by_length(order, lengths, 8, 3, random.Random(1))
    assert sorted(grouped) == list(range(96))
    for w in range(0, 96, 24):  # indices stay in their window of 3 groups
        assert set(grouped[w : w + 24]) == set(order[w : w + 24])
    groups = [grouped[g : g + 8] for g in range(0, 96, 8)]
    for g in groups:
        assert [lengths[i] for i in g] == sorted((lengths[i] for i in g), reverse=True)
    spread = sum(max(lengths[i] for i in g) - min(lengths[i] for i in g) for g in groups)
    plain = [order[g : g + 8] for g in range(0, 96, 8)]
    unsorted = sum(max(lengths[i] for i in g) - min(lengths[i] for i in g) for g in plain)
    assert spread < unsorted / 2
    with pytest.raises(ValueError, match="multiple"):
        data.group_by_length(order[:10], lengths, 8, 3, random.Random(1))


def test_grouped_micro_batches_are_rank_independent_and_less_padded():
    """Every pair of an epoch is drawn once; ranks r of K get micro-batch accum * K + r
    of what one process with --grad-accum K gets; micro-batches are padded less."""
    pairs, _ = _pairs(130)
    width = [max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs]
    one = train.Config(batch_size=2, grad_accum=4, group_by_length=True)
    two = train.Config(batch_size=2, grad_accum=2, group_by_length=True)
    steps = len(pairs) // 8
    seen, padded, grouped_padded = [], 0, 0
    for step in range(steps):
        single = train.micro_batches(pairs, one, 1, 0, step)
        ranks = [train.micro_batches(pairs, two, 2, r, step) for r in range(2)]
        assert [ranks[u % 2][u // 2] for u in range(4)] == single
        for micro in single:
            seen.extend(id(p) for p in micro)
            grouped_padded += sum(max(width[pairs.index(p)] for p in micro) - width[pairs.index(p)]
                                  for p in micro)  # fmt: skip
        for micro in train.micro_batches(pairs, train.Config(batch_size=2, grad_accum=4), 1, 0,
                                         step):  # fmt: skip
            padded += sum(max(width[pairs.index(p)] for p in micro) - width[pairs.index(p)]
                          for p in micro)  # fmt: skip
    assert len(seen) == len(set(seen)) == steps * 8
    assert grouped_padded < padded / 2


# ---------------------------------------------------------------- the model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_packed_rows_give_each_sequence_its_own_logits(arch, tiny):
    """Logits of a packed row equal those of each sequence run alone (float64)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    pairs, tokenizer = tiny[1], tiny[2]
    if arch == "llama":
        model = tiny[0]
    else:
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=256,
                                           vocab_size=len(tokenizer))).double()  # fmt: skip
    train.check_packing(model)  # accepted
    packed = data.collate_packed(pairs, tokenizer.pad_token_id, 128)
    model.eval()
    with torch.no_grad():
        logits = model(
            input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False
        ).logits  # (R, T, V)
        flat = logits.reshape(-1, logits.shape[-1])
        sequences = [(p.chosen_ids, p.rejected_ids) for p in pairs]
        for s, ids in enumerate([c for c, _ in sequences] + [r for _, r in sequences]):
            alone = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
            got = flat[packed["unpack"][s, : len(ids)]]
            torch.testing.assert_close(got, alone, rtol=1e-10, atol=1e-10)
    model.train()


def test_architectures_that_mix_packed_sequences_are_refused():
    """OPT builds its mask from attention_mask only: a packed row would attend across
    sequences, so --packing is refused, naming the model."""
    from transformers import OPTConfig, OPTForCausalLM

    model = OPTForCausalLM(
        OPTConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            ffn_dim=64,
            word_embed_proj_dim=32,
        )
    )
    with pytest.raises(train.TrainError, match=r"--packing: OPTForCausalLM .* does not keep"):
        train.check_packing(model)


@pytest.mark.parametrize("tokens", ["last", "all"])
def test_packed_scores_loss_and_penalty_equal_the_padded_batch(tiny, tokens):
    """score_sequences (sums, lengths, LD-DPO, WPO), the loss, every metric and the
    LoRA gradients of one micro-batch, packed and padded, in float64."""
    model, pairs, tokenizer = tiny
    cfg = train.Config(loss="dpo", dec_penalty=True, dec_weight=0.5, dec_tokens=tokens,
                       use_weighting=True, ld_alpha=0.5, dec_layers="1,3")  # fmt: skip
    results = []
    for packing in (False, True):
        cfg.packing = packing
        batch = train.collate_pairs(pairs, cfg, tokenizer.pad_token_id)
        model.zero_grad()
        with DecorrelationHooks(model, cfg.dec_module, [1, 3]) as hooks:
            scores = train.score_sequences(model, batch, cfg, torch.device("cpu"), wpo=True)
            loss, metrics = train.forward_pair_batch(model, batch, cfg, hooks,
                                                     torch.device("cpu"), True)  # fmt: skip
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        results.append((scores, loss, metrics, grads))
    (s0, l0, m0, g0), (s1, l1, m1, g1) = results
    for a, b in zip(s0, s1, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(l1, l0, rtol=1e-10, atol=1e-12)
    assert m0["dec/penalty"] > 0
    for key in m0:
        torch.testing.assert_close(m1[key], m0[key], rtol=1e-6, atol=1e-7)  # fp32 metrics
    for a, b in zip(g0, g1, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)


def test_precomputed_reference_of_packed_batches(tiny):
    """--precompute-ref with --packing stores the padded batches' reference log-probs."""
    model, pairs, tokenizer = tiny
    stored = []
    for packing in (False, True):
        cfg = train.Config(loss="dpo", batch_size=2, packing=packing)
        for pair in pairs:
            pair.ref_logps = None
        train.precompute_reference(model, pairs, cfg, tokenizer.pad_token_id, torch.device("cpu"))
        stored.append(torch.tensor([pair.ref_logps for pair in pairs], dtype=torch.float64))
        for pair in pairs:
            pair.ref_logps = None
    torch.testing.assert_close(stored[1], stored[0], rtol=1e-10, atol=1e-10)


def test_packed_rows_select_the_padded_rows():
    """select_rows on packed outputs with sequence_ids: the padded rows, order, groups."""
    from decpo.hooks import select_rows

    pairs, tokenizer = _pairs(4)
    padded = data.collate(pairs, tokenizer.pad_token_id)
    packed = data.collate_packed(pairs, tokenizer.pad_token_id, 128)
    values = torch.randn(*padded["input_ids"].shape, 5, dtype=torch.float64)  # (2B, L, 5)
    # The same per-token values laid out in the packed rows.
    rows, width = packed["input_ids"].shape
    flat = torch.zeros(rows * width, 5, dtype=torch.float64)
    valid = packed["unpack"] >= 0
    flat[packed["unpack"][valid]] = values[valid]
    for tokens in ("last", "all"):
        a = select_rows([values], padded["labels"] != data.IGNORE_INDEX, tokens)
        b = select_rows([flat.view(rows, width, 5)], packed["labels"] != data.IGNORE_INDEX,
                        tokens, packed["sequence_ids"])  # fmt: skip
        torch.testing.assert_close(b[0], a[0], rtol=0, atol=0)
        assert (a[1] is None) == (b[1] is None)
        if a[1] is not None:
            assert torch.equal(a[1], b[1])


# ---------------------------------------------------------------- decpo.train


def test_packed_and_padded_runs_log_the_same_losses(tmp_path, monkeypatch):
    """Same seed, same pairs per micro-batch: --packing logs the padded run's losses and
    metrics, train and held-out, to fp32 tolerance (--dec-tokens all: one group per
    sequence; --grad-accum 2 goes through the packed path too)."""
    monkeypatch.setattr(train, "plot_curves", lambda *args, **kwargs: None)
    common = [*FAST, "--dec-tokens", "all", "--grad-accum", "2"]
    padded = train.main([*common, "--output-dir", str(tmp_path / "padded")])
    packed = train.main([*common, "--packing", "--output-dir", str(tmp_path / "packed")])
    a, b = train_rows(tmp_path / "padded"), train_rows(tmp_path / "packed")
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b, strict=True):
        for key in METRIC_KEYS:
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-5), (ra["step"], key)
            if "eval/loss" in ra:
                assert rb["eval/" + key] == pytest.approx(ra["eval/" + key], rel=1e-4, abs=1e-5)
    assert packed["eval/rewards/margins"] == pytest.approx(padded["eval/rewards/margins"],
                                                           rel=1e-4)  # fmt: skip


def test_data_parallel_with_length_grouping_and_packing(tmp_path, monkeypatch):
    """2 gloo ranks with --group-by-length --packing log what one padded process with
    --group-by-length --grad-accum 2 logs."""
    monkeypatch.setattr(train, "plot_curves", lambda *args, **kwargs: None)
    common = [*FAST, "--batch-size", "2", "--max-steps", "3", "--eval-every", "100",
              "--group-by-length"]  # fmt: skip
    single = tmp_path / "single"
    train.main([*common, "--grad-accum", "2", "--output-dir", str(single)])
    ddp = tmp_path / "ddp"
    torchrun_train([*common, "--packing", "--output-dir", str(ddp)], port=29523)
    a, b = train_rows(single), train_rows(ddp)
    assert len(a) == len(b) == 3
    assert_same_rows(a, b)
