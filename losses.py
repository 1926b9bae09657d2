"""Losses of Iterative RPO (arXiv 2404.19733v3) and sDPO (arXiv 2403.19270v1). Torch only: copy this file freely.

Every function is pure and returns per-example values (shape (batch_size,)); the caller reduces.
Naming follows the DPO reference implementation: {policy,reference}_{chosen,rejected}_logps.

How the two papers use these functions
--------------------------------------
Iterative RPO, iteration t = 1 … T: `rpo_loss` with the policy initialised from M_{t-1} and the reference fixed to
M_{t-1}, training M_t (the paper numbers the same step M_t → M_{t+1}; rpo.py and this file count from 1).

sDPO needs no loss of its own. Its objective (arXiv 2403.19270v1, Sec. 2.2) is

    L_sDPO = sum_t L_DPO(pi_theta_t, pi_theta_{t-1})

one ordinary `dpo_loss` per data chunk D_t, where the reference of step t is the model aligned at step t-1
(pi_theta_0 = the SFT model) and the target pi_theta_t is initialised from pi_theta_{t-1} as well.
The only thing that changes between steps is which log-probabilities are passed as `reference_*_logps`.

γ_ref (gamma_ref), the reference margin, is

    γ_ref = log pi_ref(y_w|x) - log pi_ref(y_l|x)      # = reference_chosen_logps - reference_rejected_logps

Rewriting the DPO loss as -log σ(β·[(log pi_θ(y_w|x) - log pi_θ(y_l|x)) - γ_ref]) shows that γ_ref is the margin
the policy must beat before the loss drops below log 2. A better-aligned reference has a larger γ_ref, so later
sDPO steps are harder: the paper's easy-to-hard curriculum (its Fig. 2 plots mean γ_ref per step).
"""
import torch
import torch.nn.functional as F


def sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log-probabilities of the labelled tokens of each sequence: log pi(y|x) = sum_t log pi(y_t|x, y_<t).

    `labels` follows the Hugging Face convention: same positions as `input_ids`, with prompt and padding set to
    `ignore_index`. The one-token shift (logits at t predict the token at t+1) happens here.

    Computed in float32 whatever the dtype of `logits` (fp16/bf16 log-softmax loses the small differences DPO
    lives on). log p = logit[label] - logsumexp(logits) avoids a full (B, T, V) log-softmax output, and
    the float32 cast is done one sequence at a time, so no more than one (T, V) float32 temporary is alive beyond
    what autograd keeps for the backward pass.

    Args:
        logits: model output. Shape: (batch_size, seq_len, vocab_size).
        labels: target token ids, `ignore_index` where not scored. Shape: (batch_size, seq_len).
        ignore_index: label value of positions that are not scored.

    Returns:
        logps: sum of the scored tokens' log-probabilities, float32. Shape: (batch_size,).
        lengths: number of scored tokens. Shape: (batch_size,).
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} differ in (B, T)")
    logits = logits[:, :-1, :]  # (B, T-1, V): position t predicts token t+1
    labels = labels[:, 1:]  # (B, T-1)
    mask = labels != ignore_index
    safe_labels = torch.where(mask, labels, torch.zeros_like(labels))
    picked = torch.gather(logits, 2, safe_labels.unsqueeze(-1)).squeeze(-1).float()  # (B, T-1)
    log_norm = torch.stack([torch.logsumexp(row.float(), dim=-1) for row in logits])  # (B, T-1)
    token_logps = (picked - log_norm) * mask
    return token_logps.sum(-1), mask.sum(-1)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO loss (Rafailov et al., arXiv 2305.18290v3, Eq. 7), the first term of Eq. 1 of arXiv 2404.19733v3:

        L_DPO = -log σ( β·log[pi_θ(y_w|x)/pi_ref(y_w|x)] - β·log[pi_θ(y_l|x)/pi_ref(y_l|x)] )

    Each log-probability is summed over the response tokens (chain of thought and answer), not normalised.
    `F.logsigmoid` keeps the loss finite for margins of any size (−log σ(z) = softplus(−z)).

    Args:
        policy_chosen_logps: log pi_θ(y_w|x). Shape: (batch_size,).
        policy_rejected_logps: log pi_θ(y_l|x). Shape: (batch_size,).
        reference_chosen_logps: log pi_ref(y_w|x). Shape: (batch_size,).
        reference_rejected_logps: log pi_ref(y_l|x). Shape: (batch_size,).
        beta: β, the strength of the implicit KL penalty (0.1 in both papers).

    Returns:
        losses: per-pair loss. Shape: (batch_size,).
        chosen_rewards: β·(log pi_θ(y_w|x) − log pi_ref(y_w|x)), detached. Shape: (batch_size,).
        rejected_rewards: β·(log pi_θ(y_l|x) − log pi_ref(y_l|x)), detached. Shape: (batch_size,).
    """
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    losses = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def length_normalized_nll(policy_chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """The NLL term of Eq. 1 of arXiv 2404.19733v3, per pair: −log pi_θ(c_w, y_w|x) / (|c_w| + |y_w|).

    Normalised by the winner's own response length (chain of thought + answer tokens; the prompt is not
    counted), sequence by sequence. TRL's `loss_type=["sigmoid", "sft"]` instead averages over all chosen tokens of
    the batch, which weighs long winners more. This is also the SFT-on-chosen (STaR) loss.

    Args:
        policy_chosen_logps: log pi_θ(c_w, y_w|x), summed over response tokens. Shape: (batch_size,).
        chosen_lengths: |c_w| + |y_w|, the winner's response length in tokens. Shape: (batch_size,).

    Returns:
        nll: per-pair length-normalised negative log-likelihood. Shape: (batch_size,).
    """
    return -policy_chosen_logps / chosen_lengths.clamp(min=1).to(policy_chosen_logps.dtype)


def rpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    beta: float,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO + NLL loss of Iterative RPO, Eq. 1 of arXiv 2404.19733v3:

        L_DPO+NLL = L_DPO − α · log M_θ(c_w, y_w|x) / (|c_w| + |y_w|)

    with the reference M_{t-1}, the model of the previous iteration. α = 1 and β = 0.1 in the paper; α = 0 is exactly
    `dpo_loss` (the paper's "DPO without NLL" ablation).

    Differences from other texts of the same idea:
    - v1 of the paper (arXiv 2404.19733v1) wrote α on the DPO term instead of the NLL term; v3 puts it on NLL.
    - TRL's `loss_type=["sigmoid", "sft"]` normalises the NLL by the token count of the whole batch; here each pair's
      NLL is normalised by its own winner's length, as Eq. 1 is written.

    Args:
        policy_chosen_logps: log M_θ(c_w, y_w|x). Shape: (batch_size,).
        policy_rejected_logps: log M_θ(c_l, y_l|x). Shape: (batch_size,).
        reference_chosen_logps: log M_{t-1}(c_w, y_w|x). Shape: (batch_size,).
        reference_rejected_logps: log M_{t-1}(c_l, y_l|x). Shape: (batch_size,).
        chosen_lengths: |c_w| + |y_w| in tokens. Shape: (batch_size,).
        beta: β of the DPO term.
        alpha: α, weight of the NLL term.

    Returns:
        losses: per-pair L_DPO+NLL. Shape: (batch_size,).
        chosen_rewards, rejected_rewards: as in `dpo_loss`, detached. Shape: (batch_size,).
        dpo_losses: the DPO term alone, per pair (what is logged as loss/dpo). Shape: (batch_size,).
        nll_losses: the NLL term alone, per pair, before α (loss/nll; with SFT, the loss). Shape: (batch_size,).
    """
    dpo_losses, chosen_rewards, rejected_rewards = dpo_loss(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
    )
    nll_losses = length_normalized_nll(policy_chosen_logps, chosen_lengths)
    losses = dpo_losses + alpha * nll_losses if alpha else dpo_losses  # α = 0: exactly the DPO loss
    return losses, chosen_rewards, rejected_rewards, dpo_losses, nll_losses
