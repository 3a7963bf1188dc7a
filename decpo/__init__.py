"""decpo: fast, trustworthy DecPO (DPO + feature decorrelation) training.

Public API (docs/design.md, "Public API"): decorrelation_penalty, token_logprobs,
logprobs_from_logits, dpo_loss; plus sequence_logprobs (per-sequence sum and mean).
Every op takes backend="auto" | "torch" | "triton" | "native".
"""

from decpo.backend import BackendUnavailableError
from decpo.losses import DPOLossOutput, SequenceLogprobs, dpo_loss, sequence_logprobs
from decpo.ops.decorrelation import decorrelation_penalty
from decpo.ops.logprobs import TokenStats, logprobs_from_logits, token_logprobs

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "DPOLossOutput",
    "SequenceLogprobs",
    "TokenStats",
    "decorrelation_penalty",
    "dpo_loss",
    "logprobs_from_logits",
    "sequence_logprobs",
    "token_logprobs",
]
