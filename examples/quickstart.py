"""A short tour of decpo's API: fused log-probs, DPO loss, and the DecPO regularizer."""

import torch

import decpo
from decpo import native_backend

torch.manual_seed(0)
batch, seq_len, dim, vocab = 4, 64, 256, 8000

# Last hidden states of chosen (rows 0-1) and rejected (rows 2-3) responses.
hidden = torch.randn(batch, seq_len, dim, requires_grad=True)
lm_head = torch.randn(vocab, dim) / dim**0.5  # frozen, as with LoRA
targets = torch.randint(0, vocab, (batch, seq_len))
targets[:, :16] = -100  # prompt tokens are not scored

logp = decpo.token_logprobs(hidden, lm_head, targets)  # (B, T), no logits materialized
seq_logp = logp.sum(-1)
with torch.no_grad():
    ref_logp = decpo.token_logprobs(hidden * 0.9, lm_head, targets).sum(-1)

losses, chosen_rewards, rejected_rewards = decpo.dpo_loss(
    seq_logp[:2], seq_logp[2:], ref_logp[:2], ref_logp[2:], beta=0.1
)
# DecPO: decorrelate the last real token's activations of each sequence.
penalty = decpo.decorrelation_penalty(hidden[:, -1])
loss = losses.mean() + 0.01 * penalty
loss.backward()

print(f"DPO loss      {losses.mean().item():.4f}")
print(f"penalty       {penalty.item():.4f}")
print(f"reward margin {(chosen_rewards - rejected_rewards).mean().item():.4f}")
print(f"|grad hidden| {hidden.grad.norm().item():.4f}")
print(f"native library available: {native_backend.is_available()}")
