"""The ops: one name per op, found in the same four places.

Each op module holds its Triton kernels (shared building blocks in ``_triton_common.py``), its
launchers in one mapping ``{"triton": ..., "cpu": ..., "cuda": ...}`` that ``rlhf_fast._backend``
reads, its autograd Function (if it has a gradient), its public function (typed, taking
``backend: str | None = None``) and the pure-PyTorch ``*_ref`` that defines it.

Paths: Python under rlhf_fast/ops/, csrc under csrc/, tests under tests/ops/, benchmarks under benchmarks/.

=================  ===================  =========================  ======================  ==================
op                 Python               csrc                       test                    benchmark
=================  ===================  =========================  ======================  ==================
token_logprobs     logprobs.py          cpu/logprobs.cpp,          test_logprobs.py        bench_logprobs.py
                                        cuda/logprobs.cu
kl_penalty         kl.py                cpu/kl.cpp                 test_kl.py              bench_kl.py
full_kl            full_kl.py           cpu/kl.cpp                 test_kl.py              bench_kl.py
kl_shaped_rewards  gae.py               cpu/gae.cpp                test_gae.py             bench_gae.py
gae                gae.py               cpu/gae.cpp, cuda/gae.cu   test_gae.py             bench_gae.py
ppo_advantages     gae.py (+ whiten)    cpu/gae.cpp, whiten.cpp    test_gae.py             bench_gae.py
masked_whiten      whiten.py            cpu/whiten.cpp             test_whiten.py          bench_whiten.py
group_advantages   group_advantages.py  cpu/group_advantages.cpp   test_group_advantages   bench_group_advantages.py
ppo_policy_loss    policy_loss.py,      (the logprobs kernels)     test_policy_loss.py,    bench_policy_loss.py
                   policy_objectives.py                            test_policy_loss_modes
value_loss         value_loss.py        -- (plain torch)           test_losses.py          --
reward_model_loss  preference_losses    -- (plain torch)           test_losses.py          --
dpo_loss           preference_losses    -- (plain torch)           test_losses.py          --
linear_token_
  logprobs         linear_logprobs.py   (logprobs kernels + BLAS)  test_linear_logprobs    bench_linear_logprobs
linear_ppo_
  policy_loss      linear_policy_loss   (logprobs kernels + BLAS)  test_linear_policy_loss bench_linear_logprobs
linear_cross_
  entropy          linear_policy_loss   (logprobs kernels + BLAS)  test_linear_policy_loss bench_linear_logprobs
linear_full_kl     linear_kl.py         (kl kernels + BLAS)        test_linear_kl.py       --
impl="fused" of    linear_triton.py,    (Triton GEMM + softmax)    test_linear_triton      bench_linear_logprobs
  the three above  linear_triton_losses
=================  ===================  =========================  ======================  ==================

Shared by every op: ``_checks.py`` (argument checks; errors name the argument), ``_common.py``
(the ``Rows`` view of (..., V) tensors and the layout adapters ``as_rows`` / ``rows_arg`` /
``flat_arg`` every launcher passes its tensors through), ``_triton_common.py`` (online softmax,
KL estimators). Cross-op tests in tests/ops/: test_bad_inputs.py (every op family's argument
errors), test_strides.py (every op x argument x strided view), test_nonfinite.py (NaN / inf rule),
test_autograd_safety.py (inplace_backward, double backward), test_dispatch.py (backend=).
The nn.Modules are in rlhf_fast/losses.py.

Rules every op keeps:
  * non-finite: a NaN / +inf / all -inf logit row that is valid gives NaN out (as torch); a masked
    row never reaches the loss or the gradient (backward writes 0 where the upstream grad is 0);
  * layouts: any strides / offsets / broadcasts, via the layout adapters (one copy at most);
  * inplace_backward=True: ignored for overlapping logits; one backward only (a second raises);
  * kernel backwards are first-order: create_graph=True raises (backend="torch" supports it);
  * statistics (whitening, group advantages) are shifted / two-pass in fp64.
"""
from rlhf_fast.ops.full_kl import full_kl, full_kl_ref
from rlhf_fast.ops.gae import gae, gae_ref, kl_shaped_rewards, kl_shaped_rewards_ref, ppo_advantages, ppo_advantages_ref
from rlhf_fast.ops.group_advantages import group_advantages, group_advantages_ref
from rlhf_fast.ops.kl import kl_penalty, kl_penalty_ref
from rlhf_fast.ops.linear_kl import linear_full_kl, linear_full_kl_ref
from rlhf_fast.ops.linear_logprobs import linear_token_logprobs, linear_token_logprobs_ref
from rlhf_fast.ops.linear_policy_loss import (
    linear_cross_entropy,
    linear_cross_entropy_ref,
    linear_ppo_policy_loss,
    linear_ppo_policy_loss_ref,
)
from rlhf_fast.ops.logprobs import token_logprobs, token_logprobs_ref
from rlhf_fast.ops.policy_loss import (
    LOSS_AGGS,
    aggregation_weights,
    policy_stats,
    policy_terms,
    ppo_policy_loss,
    ppo_policy_loss_ref,
)
from rlhf_fast.ops.preference_losses import dpo_loss, reward_model_loss
from rlhf_fast.ops.value_loss import value_loss
from rlhf_fast.ops.whiten import masked_whiten, masked_whiten_ref

__all__ = [
    "token_logprobs", "token_logprobs_ref", "kl_penalty", "kl_penalty_ref", "full_kl", "full_kl_ref",
    "kl_shaped_rewards", "kl_shaped_rewards_ref", "gae", "gae_ref", "ppo_advantages", "ppo_advantages_ref",
    "masked_whiten", "masked_whiten_ref", "group_advantages", "group_advantages_ref",
    "ppo_policy_loss", "ppo_policy_loss_ref", "policy_terms", "policy_stats", "aggregation_weights", "LOSS_AGGS",
    "value_loss", "reward_model_loss", "dpo_loss",
    "linear_token_logprobs", "linear_token_logprobs_ref", "linear_ppo_policy_loss", "linear_ppo_policy_loss_ref",
    "linear_cross_entropy", "linear_cross_entropy_ref", "linear_full_kl", "linear_full_kl_ref",
]
