"""The linear probe: a logistic regression on frozen clip embeddings, scored like every task.

`ssamba label-efficiency` reads frozen encoders (and the hand-crafted filterbank
statistics) with it: features are standardised with the mean and standard deviation of
the *training* rows only, then an L2-regularised multinomial logistic regression is fitted
to convergence with L-BFGS (deterministic: no batches, no learning-rate schedule, no
seed), and the test rows are scored with the accuracy of `ssamba.tasks.metrics`, the metric
`ClassifyTask` scores its test set with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssamba.tasks.metrics import classification_metrics


def fit_linear_probe(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weight (dim, classes), bias (classes,), mean (dim,), std (dim,)) of a logistic
    regression on `x` (rows, dim) standardised with its own mean and std; y: (rows,) long."""
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp(min=1e-6)
    x = (x - mean) / std
    weight = torch.zeros(x.shape[1], num_classes, requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    optimiser = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=200, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + l2 * weight.square().sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    return weight.detach(), bias.detach(), mean, std


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    l2: float,
) -> float:
    """Fit on the training rows (rows, dim), score the test rows: test accuracy."""
    weight, bias, mean, std = fit_linear_probe(train_x, train_y, num_classes, l2)
    logits = (test_x - mean) / std @ weight + bias
    accuracy = classification_metrics(num_classes, multilabel=False, prefix="test/")["acc"]
    accuracy.update(logits, test_y)
    return float(accuracy.compute())
