"""DecPOTrainer(dec_compat="official") against the paper's official code, transcribed.

The official code is not imported (it parses command-line arguments and loads a 7B
model at import time). The functions below are transcriptions, made by reading the
code, of hanqi-qi/Revisit_monosemanticity at commit 2da99fb:

- models/llama_hook.py, lines 3-24: HookTool and get_feas_by_hook (a forward hook on
  `mlp.up_proj` of every layer in target_layers, in layer order).
- DPOTrainer.py, lines 54-70: CustomDPOTrainer.dpo_loss (the sigmoid DPO loss, no
  label smoothing).
- DPOTrainer.py, lines 110-156: concatenated_forward, which scores both sequences with
  the inherited TRL DPOTrainer.get_batch_logps and average_log_prob=True (line 145).
  get_batch_logps itself is TRL's of that time (TRL 0.7-0.8, trl/trainer/dpo_trainer.py,
  the static method with label_pad_token_id and is_encoder_decoder arguments).
- DPOTrainer.py, lines 158-225: get_batch_loss_metrics: hooks (line 167), the policy
  and reference passes, then lines 199-210 and 225:
      out_feats.append(torch.abs(act_nlayer.fea[:,-1,:]))   # per hooked layer
      out_feats_final = torch.stack(out_feats,dim=0)
      chosen_act = out_feats_final[0,0::2,:]                 # first hooked layer only
      sparsity_loss = (torch.matmul(chosen_act,chosen_act.T)-torch.eye(...)).mean(dim=0)
      losses += 0.001*sparsity_loss
      return losses.mean(), metrics

Two things differ from running the official script, neither affecting the numbers:
the reference model there is a separate copy of the base model (so its forward never
reaches the policy's hooks); here it is the same PEFT model with its adapters
disabled, and the transcription removes its hooks before that pass. The official code
also never removes its hooks (one more per step); the transcription removes them.
The batch is TRL 1.16's concatenated [chosen; rejected] batch, with labels -100 outside
the completions as the official TRL version built them.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("trl")

from decpo import data, models
from decpo.integrations.trl import DecPOConfig, DecPOTrainer

OFFICIAL_WEIGHT = 0.001  # DPOTrainer.py line 210
LAYERS = [1, 3]


# ---------------------------------------------------------------- the transcription


class HookTool:  # models/llama_hook.py lines 3-8
    def __init__(self):
        self.fea = None

    def hook_fun(self, module, fea_in, fea_out):
        self.fea = fea_out


def get_feas_by_hook(model, target_acts, target_layers, handles):  # lines 10-24
    fea_hooks = {}
    for target_act in target_acts:
        fea_hooks[target_act] = []
    try:
        model = model.base_model.model
    except AttributeError:
        model = model
    for i in range(len(model.model.layers)):
        for n, m in model.model.layers[i].named_modules():
            if n in target_acts and i in target_layers:
                cur_hook = HookTool()
                handles.append(m.register_forward_hook(cur_hook.hook_fun))  # kept to remove
                fea_hooks[n].append(cur_hook)
    return fea_hooks


def get_batch_logps(logits, labels, average_log_prob=False, label_pad_token_id=-100):
    """TRL 0.7-0.8 DPOTrainer.get_batch_logps (decoder-only branch)."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            "Logits (batch and sequence length dim) and labels must have the same shape."
        )
    labels = labels[:, 1:].clone()
    logits = logits[:, :-1, :]
    loss_mask = labels != label_pad_token_id
    labels[labels == label_pad_token_id] = 0
    per_token_logps = torch.gather(
        logits.log_softmax(-1), dim=2, index=labels.unsqueeze(2)
    ).squeeze(2)
    if average_log_prob:
        return (per_token_logps * loss_mask).sum(-1) / loss_mask.sum(-1)
    return (per_token_logps * loss_mask).sum(-1)


def dpo_loss(beta, policy_chosen_logps, policy_rejected_logps, ref_pos_logps, ref_neg_logps):
    """DPOTrainer.py lines 54-70."""
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = ref_pos_logps - ref_neg_logps
    logits = pi_logratios - ref_logratios
    losses = -F.logsigmoid(beta * logits)
    return losses


def official_loss(model, batch, beta, act_layers, average_log_prob=True):
    """get_batch_loss_metrics (DPOTrainer.py lines 158-225), on one TRL batch."""
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    len_chosen = labels.shape[0] // 2
    handles: list = []
    fea_hooks = get_feas_by_hook(model, ["mlp.up_proj"], act_layers, handles)
    all_logits = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                       use_cache=False).logits  # fmt: skip
    for handle in handles:  # the official reference model is another module
        handle.remove()
    all_logps = get_batch_logps(all_logits.float(), labels, average_log_prob=average_log_prob)
    policy_chosen_logps, policy_rejected_logps = all_logps[:len_chosen], all_logps[len_chosen:]
    with torch.no_grad(), model.disable_adapter():
        ref_logits = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                           use_cache=False).logits  # fmt: skip
        ref_logps = get_batch_logps(ref_logits.float(), labels, average_log_prob=average_log_prob)
    losses = dpo_loss(beta, policy_chosen_logps, policy_rejected_logps, ref_logps[:len_chosen],
                      ref_logps[len_chosen:])  # fmt: skip
    out_feats = []
    for act_nlayer in fea_hooks["mlp.up_proj"]:
        out_feats.append(torch.abs(act_nlayer.fea[:, -1, :]))
    out_feats_final = torch.stack(out_feats, dim=0)
    chosen_act = out_feats_final[0, 0::2, :]
    sparsity_loss = (
        torch.matmul(chosen_act, chosen_act.T)
        - torch.eye(chosen_act.shape[0]).to(chosen_act.device)
    ).mean(dim=0)
    losses += OFFICIAL_WEIGHT * sparsity_loss
    # What the first-layer-only indexing leaves out, for the test's own sanity check.
    all_layers = torch.stack([(a @ a.T - torch.eye(a.shape[0])).mean() for a in
                              out_feats_final[:, 0::2, :]]).mean()  # fmt: skip
    return losses.mean(), sparsity_loss.mean(), all_layers


# ---------------------------------------------------------------- the test


@pytest.fixture(scope="module")
def tokenizer():
    return models.build_tokenizer(data.demo_corpus()[:300], vocab_size=300)


def _trainer(tmp_path, tokenizer, average_log_prob):
    from datasets import Dataset

    warnings.filterwarnings("ignore")
    pairs = data.synthetic_pairs(16, seed=3)
    dataset = Dataset.from_list(
        [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs]
    )
    model = models.build_tiny_model(tokenizer, seed=0)
    torch.manual_seed(0)
    model = models.add_lora(model, 4, None, ["q_proj", "v_proj", "up_proj", "down_proj"])
    args = DecPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_length=64,
        report_to="none", save_strategy="no", use_cpu=True, seed=0, dataloader_num_workers=0,
        dec_compat="official", dec_weight=OFFICIAL_WEIGHT, dec_layers=LAYERS,
        average_log_prob=average_log_prob, beta=0.1,
    )  # fmt: skip
    trainer = DecPOTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    # Non-zero LoRA B after TRL copied the initial (zero) adapter as its reference, so
    # the reference is the base model as in the official code, and differs from the policy.
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name and param.requires_grad:
                param.normal_(0, 0.05)
    return trainer


def _lora_grads(model) -> list[torch.Tensor]:
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("average_log_prob", [True, False])
def test_official_mode_equals_the_official_code(tmp_path, tokenizer, average_log_prob):
    trainer = _trainer(tmp_path, tokenizer, average_log_prob)
    assert trainer.args.loss_type == (["sigmoid_norm"] if average_log_prob else ["sigmoid"])
    batch = next(iter(trainer.get_train_dataloader()))
    model = trainer.model
    model.train()
    # The last column must hold a pad for some rows, as in the official batches.
    assert (batch["attention_mask"][:, -1] == 0).any()

    loss = trainer.compute_loss(model, batch)
    loss.backward()
    ours = _lora_grads(model)
    penalty = trainer._metrics["train"]["dec/penalty"][-1]

    expected, regularizer, all_layers = official_loss(
        model, batch, 0.1, LAYERS, average_log_prob=average_log_prob
    )
    expected.backward()
    theirs = _lora_grads(model)

    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-6)
    assert penalty == pytest.approx(regularizer.item(), rel=1e-5)
    # The test tells the first layer from the mean over layers (the old, wrong mode).
    assert abs(all_layers.item() - regularizer.item()) > 0.05 * abs(regularizer.item())
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_average_log_prob_needs_the_sigmoid_loss(tmp_path):
    with pytest.raises(ValueError, match="average_log_prob"):
        DecPOConfig(output_dir=str(tmp_path), average_log_prob=True, loss_type="ipo", use_cpu=True,
                    report_to="none")  # fmt: skip
    args = DecPOConfig(
        output_dir=str(tmp_path), average_log_prob=True, report_to="none", use_cpu=True
    )
    assert args.loss_type == ["sigmoid_norm"]
