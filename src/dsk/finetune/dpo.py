"""Direct Preference Optimization (Rafailov et al. 2023) against a frozen reference model.

For a prompt x with a preferred answer y_w and a rejected one y_l, with log-probabilities
summed over the answer tokens only:

    margin = beta * ((log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)))
    loss   = -log sigmoid(margin)

``beta * (log pi - log ref)`` is the implicit reward; we log the mean reward margin and the
share of pairs with a positive margin (preference accuracy).

    >>> objective = DPOObjective(reference=sft_model, beta=0.1)
    >>> loss, stats = objective(policy, x, y)     # x, y: B chosen rows over B rejected rows
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dsk.evaluation.tasks import sequence_logps


def dpo_loss(pi_chosen: torch.Tensor, pi_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict[str, float]]:
    chosen_reward = beta * (pi_chosen - ref_chosen)
    rejected_reward = beta * (pi_rejected - ref_rejected)
    margin = chosen_reward - rejected_reward
    loss = -F.logsigmoid(margin).mean()
    stats = {
        "reward_margin": float(margin.detach().mean()),
        "reward_acc": float((margin.detach() > 0).float().mean()),
        "chosen_reward": float(chosen_reward.detach().mean()),
        "rejected_reward": float(rejected_reward.detach().mean()),
    }
    return loss, stats


class DPOObjective:
    """The loop's loss hook for DPO: ``(model, x, y) -> (loss, stats)``.

    ``x``/``y`` hold B chosen rows followed by the same B prompts' rejected rows
    (:class:`dsk.finetune.data.PreferenceData`). The reference never trains.
    """

    def __init__(self, reference: nn.Module, beta: float):
        self.reference = reference.eval()
        for p in self.reference.parameters():
            p.requires_grad_(False)
        self.beta = beta

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        B = x.shape[0] // 2
        with torch.no_grad():
            self.reference.to(x.device)
            ref = sequence_logps(self.reference(x).logits, y)
        pi = sequence_logps(model(x).logits, y)
        loss, stats = dpo_loss(pi[:B], pi[B:], ref[:B], ref[B:], self.beta)
        return loss, stats
