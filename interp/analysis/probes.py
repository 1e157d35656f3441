"""Linear probes: can a logistic regression read a value from one (layer, position) residual?

One probe per (layer, position, target): scikit-learn `LogisticRegression` on standardized
residuals, each distinct value one class, trained on a fixed-seed split of the problems and
scored on the held-out rest. Two baselines on the same split:
- `control_accuracy`: the same probe trained and scored on labels randomly permuted across the
  problems (a control task in the sense of Hewitt & Liang 2019, with every problem its own type:
  the labels keep their distribution and lose their link to the input). selectivity =
  accuracy - control_accuracy.
- `majority`: the held-out accuracy of always answering the most frequent training label.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits  # a scikit-learn dependency

from interp.analysis.activations import Activations

TEST_FRACTION = 0.3
C = 0.1  # inverse L2 strength: regularized probes (Hewitt & Liang), and fast to fit


def split(n: int, test_fraction: float = TEST_FRACTION, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices) of a seeded permutation of range(n); at least one of each."""
    if n < 2:
        raise ValueError(f"a probe needs at least 2 problems, got {n}")
    order = np.random.default_rng(seed).permutation(n)
    n_test = min(n - 1, max(1, round(n * test_fraction)))
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def probe_accuracy(x: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray, seed: int = 0) -> float:
    """Held-out accuracy of a logistic regression on x [n, d] with labels y [n]."""
    if len(set(y[train].tolist())) < 2:  # one class: the probe can only answer it
        return float(np.mean(y[test] == y[train][0]))
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=1000, random_state=seed))
    probe.fit(x[train], y[train])
    return float(np.mean(probe.predict(x[test]) == y[test]))


def majority_accuracy(y: np.ndarray, train: np.ndarray, test: np.ndarray) -> float:
    """Held-out accuracy of answering the most frequent training label."""
    label = Counter(y[train].tolist()).most_common(1)[0][0]
    return float(np.mean(y[test] == label))


def probe_row(x: np.ndarray, y: np.ndarray, test_fraction: float = TEST_FRACTION, seed: int = 0) -> dict[str, float]:
    """accuracy, control_accuracy, selectivity, majority, n_train, n_test for features x [n, d], labels y [n]."""
    train, test = split(len(y), test_fraction, seed)
    control = np.random.default_rng(seed + 1).permutation(y)
    accuracy, control_accuracy = probe_accuracy(x, y, train, test, seed), probe_accuracy(x, control, train, test, seed)
    return {
        "accuracy": accuracy,
        "control_accuracy": control_accuracy,
        "selectivity": accuracy - control_accuracy,
        "majority": majority_accuracy(y, train, test),
        "n_train": len(train),
        "n_test": len(test),
    }


def probe_rows(
    acts: Activations,
    *,
    layers: Sequence[int] | None = None,
    positions: Sequence[str] | None = None,
    targets: Sequence[str] | None = None,
    test_fraction: float = TEST_FRACTION,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Rows {layer, position, target, accuracy, control_accuracy, selectivity, majority, n_train,
    n_test} for every (layer, position, target) chosen (default: all). A target's probe uses the
    problems that have it; targets that fewer than 4 problems have, or that take one value, are skipped."""
    with threadpool_limits(1):  # BLAS threads on these small fits only contend with torch's (7x slower on 2 cores)
        return _probe_rows(acts, layers, positions, targets, test_fraction, seed)


def _probe_rows(acts: Activations, layers, positions, targets, test_fraction: float, seed: int) -> list[dict[str, Any]]:
    names = targets if targets is not None else list(dict.fromkeys(t for p in acts.problems for t in p.targets))
    rows = []
    for target in names:
        have = [i for i, p in enumerate(acts.problems) if target in p.targets]
        y = np.array([f"{acts.problems[i].targets[target]:g}" for i in have])
        if len(have) < 4 or len(set(y.tolist())) < 2:
            continue
        for li, layer in enumerate(acts.layers):
            if layers is not None and layer not in layers:
                continue
            for pi, position in enumerate(acts.positions):
                if positions is not None and position not in positions:
                    continue
                x = acts.resid[have, li, pi].double().numpy()
                rows.append({"layer": layer, "position": position, "target": target, **probe_row(x, y, test_fraction, seed)})
    return rows
