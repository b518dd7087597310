// ORPO (--stage orpo), TRL's ORPOTrainer (trl/experimental/orpo/orpo_trainer.py, v1.16):
// per micro-batch, loss = NLL - mean(beta * log sigmoid(log_odds)) where
//   NLL      token-mean cross-entropy of the CHOSEN rows over prompt AND answer (every
//            attended token after the first: TRL's "orpo chosen nll loss is computed over
//            the full prompt and response"),
//   log_odds from the answers' log-probs AVERAGED over their tokens (core/orpo.h).
// Metrics as TRL logs them: rewards/* (beta * averaged logps), logps/*, logits/* (mean
// over the chosen / rejected rows' padded positions but the last), nll_loss,
// log_odds_ratio (mean log sigmoid(log_odds)), log_odds_chosen (mean log_odds).
#include <memory>

#include "core/orpo.h"
#include "launch/objective_reference_free.h"

namespace dpo {

namespace {

class OrpoObjective final : public RefFreeObjective {
 public:
  explicit OrpoObjective(const ObjectiveEnv& env) : RefFreeObjective(env, "orpo", "ORPO"), beta_(env.opts.beta) {}

  RefFreeLoss pair_loss(const torch::Tensor& logits, const torch::Tensor& ids, const torch::Tensor& attention,
                        const torch::Tensor& answers, int64_t B) override {
    const SeqLogps a = sequence_logps(logits, ids, answers);
    const torch::Tensor avg = average_by_length(a.logps, a.token_counts);  // TRL: average_log_prob=True
    const OrpoOutput o = orpo_loss(avg.narrow(0, 0, B), avg.narrow(0, B, B), beta_);
    // The chosen rows' prompt tokens (t >= 1, attended, not answer): with the answers, the
    // NLL's tokens.
    const torch::Tensor prompt = attention.narrow(0, 0, B).to(answers.scalar_type()) * (1 - answers.narrow(0, 0, B));
    const SeqLogps p = sequence_logps(logits.narrow(0, 0, B), ids.narrow(0, 0, B), prompt);
    const torch::Tensor n_tok = a.token_counts.narrow(0, 0, B).sum() + p.token_counts.sum();
    // ORPO Eq. (6): L_SFT + lambda * L_OR, L_SFT the token-mean NLL of the chosen rows.
    const torch::Tensor nll = -(a.logps.narrow(0, 0, B).sum() + p.logps.sum()) / n_tok.clamp_min(1).to(a.logps.dtype());
    RefFreeLoss l;
    l.loss = nll + o.losses.mean();
    RefFreeMetrics& m = l.metrics;
    m.batches = 1;
    m.loss_sum = l.loss.item<double>();
    m.nll_sum = nll.item<double>();
    add_pairs(m, o.chosen_rewards, o.rejected_rewards, avg.narrow(0, 0, B), avg.narrow(0, B, B));
    m.log_odds_ratio_sum = o.ratio.to(torch::kFloat64).sum().item<double>();
    m.log_odds_chosen_sum = o.log_odds.to(torch::kFloat64).sum().item<double>();
    // TRL: all_logits[:len_chosen, :-1, :].mean() (padding positions included).
    const int64_t T = logits.size(1);
    m.logits_chosen_sum = logits.narrow(0, 0, B).narrow(1, 0, T - 1).detach().mean().item<double>();
    m.logits_rejected_sum = logits.narrow(0, B, B).narrow(1, 0, T - 1).detach().mean().item<double>();
    return l;
  }

 private:
  double beta_;  // ORPO's lambda
};

}  // namespace

std::unique_ptr<Objective> make_orpo_objective(const ObjectiveEnv& env) {
  if (!(env.opts.beta > 0)) throw std::runtime_error("--stage orpo: --beta (ORPO's lambda) must be > 0");
  return std::make_unique<OrpoObjective>(env);
}

}  // namespace dpo
