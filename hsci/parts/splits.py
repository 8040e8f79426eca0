"""How a split that a dataset lacks is carved from another: `carve`, scikit-learn's `train_test_split` (stratified:
its StratifiedShuffleSplit) index for index, with NumPy alone.

hsci has carved its validation and test splits with scikit-learn since its first run, and a saved run must see
the same images when it resumes or is evaluated again. Importing scikit-learn costs a run's start nearly two
seconds (it imports SciPy), so the same draws are made here, from NumPy's RandomState(seed) as scikit-learn makes
them; tests/test_data.py checks them against scikit-learn on many label sets.
"""

import logging
import math

import numpy as np

from hsci import UserError

log = logging.getLogger("hsci")


def carve(labels, fraction: float, seed: int, stratify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held out), each sorted, with `fraction` of the samples held out; stratified by label, the
    held-out part has a sample of every class. Too few samples per class to stratify: an unstratified split."""
    if not 0 < fraction < 1:
        raise UserError(f"a split fraction must lie strictly between 0 and 1, got {fraction}: "
                        "set data.val_fraction / data.test_fraction to e.g. 0.1")
    labels = np.asarray(labels)
    n = len(labels)
    if stratify:
        classes, members, counts = np.unique(labels, return_inverse=True, return_counts=True)
        held = max(math.ceil(fraction * n), len(classes))
        if held < n and counts.min() >= 2 and n - held >= len(classes):
            return _stratified(members.reshape(-1), counts, held, seed)
        log.warning("split of %d samples: too few per class to stratify, splitting at random", n)
    held = math.ceil(fraction * n)
    if held >= n:
        raise UserError(f"cannot hold out {fraction} of {n} samples and keep any: the dataset is too small; add "
                        "samples or lower data.val_fraction / data.test_fraction")
    order = np.random.RandomState(seed).permutation(n)
    return np.sort(order[held:]), np.sort(order[:held])


def _stratified(members: np.ndarray, counts: np.ndarray, held: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """StratifiedShuffleSplit's draw: how many of each class each side gets, then a permutation per class.
    (scikit-learn then shuffles each side once more, which sorting undoes.)"""
    rng = np.random.RandomState(seed)
    kept_n = _shares(counts, len(members) - held, rng)
    held_n = _shares(counts - kept_n, held, rng)
    kept, out = [], []
    by_class = np.split(np.argsort(members, kind="stable"), np.cumsum(counts)[:-1])
    for c, indices in enumerate(by_class):
        shuffled = indices.take(rng.permutation(counts[c]))
        kept.extend(shuffled[:kept_n[c]])
        out.extend(shuffled[kept_n[c]:kept_n[c] + held_n[c]])
    return np.sort(np.array(kept, dtype=np.int64)), np.sort(np.array(out, dtype=np.int64))


def _shares(counts: np.ndarray, draws: int, rng: np.random.RandomState) -> np.ndarray:
    """How many of `draws` samples each class gets, in proportion to `counts`: the floors, then one more for
    the classes with the largest remainders, ties drawn at random."""
    exact = counts / counts.sum() * draws
    shares = np.floor(exact)
    missing = int(draws - shares.sum())
    remainder = exact - shares
    for value in np.sort(np.unique(remainder))[::-1] if missing > 0 else ():
        (tied,) = np.where(remainder == value)
        take = min(len(tied), missing)
        shares[rng.choice(tied, size=take, replace=False)] += 1
        missing -= take
        if missing == 0:
            break
    return shares.astype(int)
