"""Comparing numbers that a model computed along different paths.

The same float32 model gives slightly different values for the same query when the path differs:
the batch size, the thread count, the kernels a processor picks (AVX2 or AVX-512, oneDNN or not)
change the order of summation, and float32 rounding depends on that order. Such values are compared
with :data:`PATH_ATOL`, never bit for bit. Bit-for-bit comparisons are kept where identity is the
property (the same computation in the same batch shape, bytes read back from a store, weights that a
request must not touch), and say so in their message.
"""

from __future__ import annotations

from torch import Tensor

#: Probabilities and normalised maps (values in [0, 1]) of one query through two paths. Measured on
#: lenet-mnist: ≤ 4e-10 for probabilities and ≤ 1.2e-7 (one ulp of 1.0) for Grad-CAM maps, batch of 16
#: against batch of 2; cancellation in a map's weighted channel sum can amplify rounding tenfold. 1e-5
#: leaves that room and is still far below what a defense changes on purpose (≥ 1e-3) or what a lossy
#: encoding would lose (float16: ~5e-4), so a wrong answer still fails.
PATH_ATOL = 1e-5


def top1_margin(probabilities: Tensor) -> Tensor:
    """The lead of each row's top-1 probability over its runner-up, shape (N,). Labels (argmax) of two
    paths may be compared exactly when every margin is far above :data:`PATH_ATOL`: no rounding can flip them."""
    top2 = probabilities.topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


#: How far an answer must be from the victim's raw output to count as changed on purpose: relative to
#: each entry for probabilities (they span 1e-10 to 1), absolute for maps (in [0, 1]). The raw output
#: reaching the client along another path stays within ~1e-6 relative (measured 3e-7) and PATH_ATOL;
#: DeepDefense's probabilities differ by ≥ 0.1 relative even after 2 steps, its maps (and DD-I's) by
#: ≥ 0.07 absolute. 1e-3 lies between: a leak of the raw output fails, a defended answer passes.
CHANGED = 1e-3
