"""Preference data: reading the three file formats, the synthetic demo task,
tokenizing pairs into padded chosen+rejected batches or packed rows, and the
length-grouped order of --group-by-length.

File formats (JSONL or JSONL.GZ, detected per file from its first record):
- "pairs":  {"prompt": str, "chosen": str, "rejected": str}
- "chat":   {"chosen": [messages], "rejected": [messages]} with an optional
            "prompt": [messages]; without it the prompt is the longest common prefix
            of whole messages. A message is {"role": ..., "content": ...}.
- "hh":     {"chosen": str, "rejected": str}, Anthropic HH transcripts; the prompt
            is the shared prefix up to and including the last "\n\nAssistant:".
"""

from __future__ import annotations

import gzip
import json
import random
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

IGNORE_INDEX = -100
HH_ASSISTANT = "\n\nAssistant:"


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str


class DataFormatError(ValueError):
    """A malformed preference file: names the file and the line."""


class DataWarning(UserWarning):
    """Pairs of a preference file that were skipped (named by file and lines)."""


# ------------------------------------------------------------------ file formats


def _open_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of the non-blank lines. Invalid UTF-8 and a corrupt or
    truncated gzip stream raise DataFormatError naming the file and the line."""
    number = 0
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise DataFormatError(
                        f"{path}:{number}: not valid UTF-8 (byte {exc.start}: {exc.reason})"
                    ) from None
                if line.strip():
                    yield number, line
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DataFormatError(
            f"{path}:{number + 1}: corrupt or truncated compressed stream ({exc})"
        ) from None
    except OSError as exc:  # unreadable: permissions, an I/O error
        raise DataFormatError(f"{path}:{number + 1}: cannot be read ({exc})") from None


def _check_text(pair: PreferencePair) -> PreferencePair:
    """ValueError for text that cannot be tokenized (a lone surrogate from a \\ud800 escape)."""
    for name in ("prompt", "chosen", "rejected"):
        try:
            getattr(pair, name).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"{name} holds a lone surrogate ({exc.reason})") from None
    return pair


def detect_format(record: dict[str, Any]) -> str:
    """'pairs', 'chat' or 'hh' for one record; ValueError if it is none of them."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    chosen, rejected = record.get("chosen"), record.get("rejected")
    if isinstance(chosen, list) and isinstance(rejected, list):
        return "chat"
    if isinstance(chosen, str) and isinstance(rejected, str):
        return "pairs" if isinstance(record.get("prompt"), str) else "hh"
    raise ValueError(
        "expected keys prompt/chosen/rejected (strings), chosen/rejected message lists, "
        f"or chosen/rejected HH transcripts; got keys {sorted(record)}"
    )


def _split_hh(chosen: str, rejected: str) -> PreferencePair:
    cut = chosen.rfind(HH_ASSISTANT)
    if cut < 0:
        raise ValueError(f"HH transcript without {HH_ASSISTANT!r}")
    cut += len(HH_ASSISTANT)
    prompt = chosen[:cut]
    if not rejected.startswith(prompt):
        # The two transcripts diverge before chosen's last turn: share the longest
        # common prefix that ends at an assistant turn.
        common = 0
        for a, b in zip(chosen, rejected, strict=False):
            if a != b:
                break
            common += 1
        cut = chosen.rfind(HH_ASSISTANT, 0, common)
        if cut < 0:
            raise ValueError("chosen and rejected share no prompt ending in an assistant turn")
        cut += len(HH_ASSISTANT)
        prompt = chosen[:cut]
    return PreferencePair(prompt, chosen[cut:], rejected[cut:])


def _check_messages(name: str, messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    ):
        raise ValueError(f"{name} must be a list of {{'role': str, 'content': str}} messages")
    return messages


def render_chat(
    messages: Sequence[dict[str, str]], tokenizer: Any | None = None, prompt: bool = False
) -> str:
    """Messages as text: the tokenizer's chat template when it has one, otherwise
    "\n\nRole: content" turns (the HH convention). prompt=True appends the
    assistant's turn header (the template's generation prompt, or "\n\nAssistant:"),
    so that header belongs to the prompt and is not scored as response."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=prompt
        )
    text = "".join(f"\n\n{m['role'].capitalize()}: {m['content']}" for m in messages)
    return text + HH_ASSISTANT if prompt else text


def _split_chat(record: dict[str, Any], tokenizer: Any | None) -> PreferencePair:
    chosen = _check_messages("chosen", record["chosen"])
    rejected = _check_messages("rejected", record["rejected"])
    if "prompt" in record:
        prompt = _check_messages("prompt", record["prompt"])
    else:
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    if not chosen or not rejected:
        raise ValueError("chosen and rejected need at least one message after the prompt")
    prompt_text = render_chat(prompt, tokenizer, prompt=True)
    chosen_text = render_chat(list(prompt) + list(chosen), tokenizer)
    rejected_text = render_chat(list(prompt) + list(rejected), tokenizer)
    if not (chosen_text.startswith(prompt_text) and rejected_text.startswith(prompt_text)):
        raise ValueError("the chat template does not render the prompt as a prefix")
    return PreferencePair(
        prompt_text, chosen_text[len(prompt_text) :], rejected_text[len(prompt_text) :]
    )


def read_pairs(path: str | Path, tokenizer: Any | None = None) -> list[PreferencePair]:
    """All pairs of a JSONL(.gz) file. Any malformed line (bad JSON or format, invalid
    UTF-8, lone surrogates, a corrupt gzip stream) raises DataFormatError naming the
    file and the line number, before anything is trained. Pairs whose chosen and
    rejected responses are identical carry no preference: they are skipped with a
    DataWarning naming their lines."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"preference data file not found: {path}")
    pairs: list[PreferencePair] = []
    identical: list[int] = []
    fmt: str | None = None
    for number, line in _open_lines(path):
        try:
            record = json.loads(line)
            kind = detect_format(record)
            if fmt is None:
                fmt = kind
            elif kind != fmt:
                raise ValueError(f"record is in {kind!r} format, the file's first is {fmt!r}")
            if kind == "pairs":
                pair = PreferencePair(record["prompt"], record["chosen"], record["rejected"])
            elif kind == "hh":
                pair = _split_hh(record["chosen"], record["rejected"])
            else:
                pair = _split_chat(record, tokenizer)
            _check_text(pair)
        except RecursionError:
            raise DataFormatError(f"{path}:{number}: JSON nested too deeply") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise DataFormatError(f"{path}:{number}: {exc}") from None
        if pair.chosen == pair.rejected:  # no preference to learn: skipped, reported below
            identical.append(number)
            continue
        pairs.append(pair)
    if identical:
        shown = ", ".join(map(str, identical[:10])) + (", ..." if len(identical) > 10 else "")
        warnings.warn(
            f"{path}: skipped {len(identical)} pair(s) whose chosen and rejected responses "
            f"are identical (line(s) {shown})",
            DataWarning,
            stacklevel=2,
        )
    if not pairs:
        raise DataFormatError(f"{path}: no preference pairs")
    return pairs


# ------------------------------------------------------------------ demo task

_REQUESTS = [
    "Say something about", "Write a short note about", "Tell me about", "Give me your view of",
    "Describe",
]  # fmt: skip
_SUBJECTS = [
    "the garden", "my bike", "a recipe", "the weather", "our trip", "this book", "the song",
    "a movie", "the class", "my plan", "the project", "a letter", "the game", "our team",
    "the city", "a puzzle", "the market", "my code", "the river", "a lesson",
]  # fmt: skip
_AUDIENCES = [
    "my friend", "my boss", "the kids", "a neighbor", "my teacher", "the team", "a stranger",
    "my sister",
]  # fmt: skip
_GOOD = [
    "kind", "clear", "helpful", "honest", "careful", "patient", "bright", "calm", "gentle",
    "useful", "friendly", "thoughtful", "warm", "precise", "safe", "fair",
]  # fmt: skip
_BAD = [
    "rude", "vague", "useless", "false", "sloppy", "hasty", "dull", "angry", "harsh",
    "wrong", "hostile", "careless", "cold", "messy", "risky", "unfair",
]  # fmt: skip


def synthetic_pairs(n: int, seed: int) -> list[PreferencePair]:
    """The demo task: HH-style prompts asking for a note about a subject for someone
    (5 requests x 20 subjects x 8 audiences = 800 distinct prompts); the chosen answer
    is built from considerate words, the rejected one from rude words, in the same
    sentence frame. A tiny model learns it in a few hundred steps. Prompts repeat
    (2,000 pairs hold about 730 of them), so hold out by prompt (split_by_prompt) to
    evaluate on prompts never seen in training."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        request = rng.choice(_REQUESTS)
        subject = rng.choice(_SUBJECTS)
        audience = rng.choice(_AUDIENCES)
        good = rng.sample(_GOOD, 2)
        bad = rng.sample(_BAD, 2)
        prompt = f"\n\nHuman: {request} {subject} for {audience}.{HH_ASSISTANT}"
        frame = " I think {s} is {a} and {b}."
        pairs.append(
            PreferencePair(
                prompt,
                frame.format(s=subject, a=good[0], b=good[1]),
                frame.format(s=subject, a=bad[0], b=bad[1]),
            )
        )
    return pairs


def split_by_prompt(
    pairs: Sequence[PreferencePair], eval_fraction: float, seed: int
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, eval) with whole prompts held out: no eval pair's prompt text occurs in
    a training pair (pairs sharing a prompt, such as several responses to one HH
    question, stay together). The distinct prompts are shuffled by a generator of
    their own, seeded with the string "decpo-split:<seed>" (so the split never
    shares a stream with the training seed's generators), and taken into eval until
    it holds at least max(1, int(eval_fraction * len(pairs))) pairs; at least one
    prompt always stays in training. Both lists keep the input order."""
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    groups: dict[str, list[int]] = {}
    for i, pair in enumerate(pairs):
        groups.setdefault(pair.prompt, []).append(i)
    if len(groups) < 2:
        raise ValueError(
            f"pairs: {len(groups)} distinct prompt(s); a split held out by prompt needs at least 2"
        )
    prompts = list(groups)
    random.Random(f"decpo-split:{seed}").shuffle(prompts)
    target = max(1, int(len(pairs) * eval_fraction))
    held: set[str] = set()
    count = 0
    for prompt in prompts[:-1]:
        if count >= target:
            break
        held.add(prompt)
        count += len(groups[prompt])
    train = [p for p in pairs if p.prompt not in held]
    evaluation = [p for p in pairs if p.prompt in held]
    return train, evaluation


def demo_corpus() -> list[str]:
    """Text the demo tokenizer is trained on: every word the demo task can use."""
    pairs = synthetic_pairs(2000, seed=12345)
    return [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]


# ------------------------------------------------------------------ tokenization


@dataclass
class TokenizedPair:
    chosen_ids: list[int]
    chosen_labels: list[int]
    rejected_ids: list[int]
    rejected_labels: list[int]
    # Reference-model sequence log-probs (chosen, rejected), when precomputed.
    ref_logps: tuple[float, float] | None = None
    prompt_len: int = 0  # tokens of the (possibly truncated) prompt, BOS included


def tokenize_pairs(
    pairs: Sequence[PreferencePair], tokenizer: Any, max_length: int
) -> tuple[list[TokenizedPair], int]:
    """Tokenize (prompt + response + eos); prompt tokens get label IGNORE_INDEX.

    Truncation keeps each response whole and cuts the prompt from the left so that
    both sequences fit max_length; a pair whose longer response (plus at least one
    prompt token) cannot fit is skipped. Returns (tokenized pairs, number skipped).
    """
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out: list[TokenizedPair] = []
    skipped = 0
    for pair in pairs:
        prompt = tokenizer(pair.prompt, add_special_tokens=False)["input_ids"]
        if getattr(tokenizer, "bos_token_id", None) is not None:
            prompt = [tokenizer.bos_token_id, *prompt]
        chosen = tokenizer(pair.chosen, add_special_tokens=False)["input_ids"] + eos
        rejected = tokenizer(pair.rejected, add_special_tokens=False)["input_ids"] + eos
        room = max_length - max(len(chosen), len(rejected))
        if room < 1 or not prompt:
            skipped += 1
            continue
        prompt = prompt[-room:]
        ignore = [IGNORE_INDEX] * len(prompt)
        out.append(
            TokenizedPair(
                prompt + chosen,
                ignore + chosen,
                prompt + rejected,
                ignore + rejected,
                prompt_len=len(prompt),
            )
        )
    return out, skipped


def collate(batch: Sequence[TokenizedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows, right-padded: input_ids, labels, attention_mask
    of shape (2B, T)."""
    sequences = [(p.chosen_ids, p.chosen_labels) for p in batch] + [
        (p.rejected_ids, p.rejected_labels) for p in batch
    ]
    length = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, (ids, labs) in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        attention_mask[row, : len(ids)] = 1
    out = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    if all(p.ref_logps is not None for p in batch):  # (2B,) chosen then rejected
        out["ref_logps"] = torch.tensor(
            [p.ref_logps[0] for p in batch] + [p.ref_logps[1] for p in batch], dtype=torch.float64
        )
    return out


# ------------------------------------------------------------------ packing and length grouping


def pack_sequences(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Rows of sequence indices whose lengths sum to at most `capacity` each: first fit
    over the sequences sorted longest first (ties in index order), so a row never
    exceeds the capacity and the rows come out in a deterministic order. A sequence
    longer than `capacity` gets a row of its own."""
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    rows: list[list[int]] = []
    free: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for row, room in enumerate(free):
            if lengths[index] <= room:
                rows[row].append(index)
                free[row] -= lengths[index]
                break
        else:
            rows.append([index])
            free.append(capacity - lengths[index])
    return rows


def collate_packed(
    batch: Sequence[TokenizedPair], pad_id: int, capacity: int | None = None
) -> dict[str, torch.Tensor]:
    """The 2B sequences of a micro-batch (chosen i is sequence i, rejected i is B + i)
    packed without padding between them into rows of at most `capacity` tokens
    (pack_sequences); rows are right-padded to the longest row only.

    capacity None (what decpo.train uses) is the batch's longest sequence, the width
    collate() pads to. Attention without a variable-length kernel (sdpa, eager) costs
    rows x width^2 whatever the mask, so rows no wider than the padded batch make
    every term of the cost, per-token (rows x width) and attention, at most the
    padded batch's, and both shrink by the same factor (2B / rows); wider rows
    would save the tail padding but pay width^2 attention for each.

    Returns
    - input_ids, labels (R, T): labels IGNORE_INDEX on prompts, on padding and on each
      sequence's first token, so no token is predicted across a sequence boundary;
    - position_ids (R, T): restarting at 0 for every sequence (and for the padding run
      at a row's end), which is how transformers recognizes packed rows and confines
      attention to each sequence;
    - sequence_ids (R, T): the sequence of each token, -1 on padding;
    - unpack (2B, L): for sequence s, the flat index (row * T + column) of each of its
      tokens in order, -1 past its length; L is the longest sequence, so gathering
      with it gives the padded layout that collate() would have built;
    - ref_logps (2B,) when every pair has them, as in collate()."""
    sequences = [(p.chosen_ids, p.chosen_labels) for p in batch] + [
        (p.rejected_ids, p.rejected_labels) for p in batch
    ]
    lengths = [len(ids) for ids, _ in sequences]
    longest = max(lengths)
    rows = pack_sequences(lengths, longest if capacity is None else max(capacity, longest))
    width = max(sum(lengths[s] for s in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    sequence_ids = torch.full((len(rows), width), -1, dtype=torch.long)
    unpack = torch.full((len(sequences), longest), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for s in row:
            ids, labs = sequences[s]
            end = start + len(ids)
            input_ids[r, start:end] = torch.tensor(ids)
            labels[r, start:end] = torch.tensor(labs)
            labels[r, start] = IGNORE_INDEX  # nothing before it in its own sequence
            position_ids[r, start:end] = torch.arange(len(ids))
            sequence_ids[r, start:end] = s
            unpack[s, : len(ids)] = torch.arange(r * width + start, r * width + end)
            start = end
        position_ids[r, start:] = torch.arange(width - start)  # padding: its own block
    out = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
           "sequence_ids": sequence_ids, "unpack": unpack}  # fmt: skip
    if all(p.ref_logps is not None for p in batch):  # (2B,) chosen then rejected
        out["ref_logps"] = torch.tensor(
            [p.ref_logps[0] for p in batch] + [p.ref_logps[1] for p in batch], dtype=torch.float64
        )
    return out


def unpack_tokens(values: torch.Tensor, unpack: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Per-token values of packed rows (R, T) in the padded layout (2B, L) that
    collate() gives: out[s, p] = values at sequence s's token p, `fill` past its end.
    Differentiable (a gather)."""
    flat = values.reshape(-1)  # (R * T,)
    valid = unpack >= 0  # (2B, L)
    gathered = flat[unpack.clamp_min(0)]  # (2B, L)
    return torch.where(valid, gathered, torch.full_like(gathered, fill))


def group_by_length(
    order: Sequence[int], lengths: Sequence[int], group: int, window: int, rng: random.Random
) -> list[int]:
    """`order` rearranged so that consecutive groups of `group` indices hold similar
    lengths: every run of window x group indices (the last run may be shorter) is sorted
    by length, longest first (ties keep their order), cut into groups, and the groups
    of each run are shuffled with `rng`. Indices move only within their run, so a
    seeded permutation stays random at the scale of runs; len(order) must be a multiple
    of `group`."""
    if group < 1 or window < 1:
        raise ValueError(f"group and window must be >= 1, got {group} and {window}")
    if len(order) % group:
        raise ValueError(f"len(order) {len(order)} is not a multiple of group {group}")
    out: list[int] = []
    span = group * window
    for start in range(0, len(order), span):
        run = sorted(order[start : start + span], key=lambda i: -lengths[i])
        groups = [run[g : g + group] for g in range(0, len(run), group)]
        rng.shuffle(groups)
        out.extend(i for g in groups for i in g)
    return out
