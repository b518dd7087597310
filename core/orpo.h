// ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference
// Model", arXiv 2403.07691) as TRL's ORPOTrainer computes it (trl/experimental/orpo,
// v1.16, odds_ratio_loss + get_batch_loss_metrics): no reference model; the loss of a
// micro-batch is its token-mean NLL over prompt + chosen minus beta (the paper's lambda)
// times the mean log sigmoid of the log odds ratio of the length-averaged log-probs.
// docs/objective.md has the formulas. The metrics' sums are core/reference_free.h.
//
// Legend: B = preference pairs.
#pragma once
#include <torch/types.h>

namespace dpo {

/// log(1 - exp(x)) for x < 0, TRL's log1mexp: log1p(-exp(x)) below -ln 2, else
/// log(-expm1(x)) (no cancellation on either side). Differentiable.
torch::Tensor log1mexp(const torch::Tensor& x);

struct OrpoOutput {
  torch::Tensor losses;            // (B) -beta * log sigmoid(log_odds), differentiable
  torch::Tensor log_odds;          // (B) detached: log odds(y_w) - log odds(y_l)
  torch::Tensor ratio;             // (B) detached: log sigmoid(log_odds) (TRL's log_odds_ratio)
  torch::Tensor chosen_rewards;    // (B) detached: beta * avg_c
  torch::Tensor rejected_rewards;  // (B) detached: beta * avg_r
};

/// The odds-ratio term of ORPO per pair. avg_c / avg_r: the policy's log-probs of the
/// answers AVERAGED over their tokens (so each is log of a per-token probability, < 0).
/// Computed in float32 as TRL does (fp64 stays fp64). The micro-batch's ORPO loss is
/// nll + mean(losses) (TRL: policy_nll_loss - (beta * ratio).mean()).
OrpoOutput orpo_loss(const torch::Tensor& avg_c,  // (B) length-averaged policy logps, chosen
                     const torch::Tensor& avg_r,  // (B) same, rejected
                     double beta);

}  // namespace dpo
