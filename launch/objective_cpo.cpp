// CPO / SimPO / AlphaPO (--stage cpo), TRL's CPOTrainer (trl/experimental/cpo/
// cpo_trainer.py, v1.16): per micro-batch, loss = mean(per-pair loss) + cpo_alpha * NLL
// where the per-pair loss reads the answers' log-probs averaged over their tokens for
// ipo and simpo (alphapo = simpo with cpo_alpha 0), summed otherwise (core/cpo.h), and
// NLL is the token-mean cross-entropy of the chosen ANSWERS (prompt excluded; not
// computed and logged as 0 when cpo_alpha is 0). Metrics as TRL logs them: rewards/*,
// logps/* (as fed to the loss), logits/* (mean over every padded position of the chosen /
// rejected rows, the last included), nll_loss.
#include <memory>

#include "core/cpo.h"
#include "launch/objective_reference_free.h"

namespace dpo {

namespace {

CpoOptions cpo_options_of(const TrainOptions& t) {
  const CpoOptions o = t.cpo_options();
  validate_cpo_options(o);
  return cpo_resolve(o);
}

class CpoObjective final : public RefFreeObjective {
 public:
  explicit CpoObjective(const ObjectiveEnv& env) : RefFreeObjective(env, "cpo", "CPO"), o_(cpo_options_of(env.opts)) {}

  RefFreeLoss pair_loss(const torch::Tensor& logits, const torch::Tensor& ids, const torch::Tensor& /*attention*/,
                        const torch::Tensor& answers, int64_t B) override {
    const SeqLogps a = sequence_logps(logits, ids, answers);
    const torch::Tensor lp = cpo_averages_logps(o_.loss_type) ? average_by_length(a.logps, a.token_counts) : a.logps;
    const CpoOutput c = cpo_loss(lp.narrow(0, 0, B), lp.narrow(0, B, B), o_);
    // CPO's L_NLL on the chosen answers (token mean over the micro-batch).
    const torch::Tensor nll = o_.cpo_alpha == 0 ? torch::zeros({}, a.logps.options())
                                                : token_mean_nll(a.logps.narrow(0, 0, B), a.token_counts.narrow(0, 0, B));
    RefFreeLoss l;
    l.loss = c.losses.mean() + o_.cpo_alpha * nll;
    RefFreeMetrics& m = l.metrics;
    m.batches = 1;
    m.loss_sum = l.loss.item<double>();
    m.nll_sum = nll.item<double>();
    add_pairs(m, c.chosen_rewards, c.rejected_rewards, lp.narrow(0, 0, B), lp.narrow(0, B, B));
    // TRL: all_logits[:len_chosen].mean() (every padded position, the last included).
    m.logits_chosen_sum = logits.narrow(0, 0, B).detach().mean().item<double>();
    m.logits_rejected_sum = logits.narrow(0, B, B).detach().mean().item<double>();
    return l;
  }

 private:
  CpoOptions o_;  // resolved (alphapo -> simpo, cpo_alpha 0)
};

}  // namespace

std::unique_ptr<Objective> make_cpo_objective(const ObjectiveEnv& env) { return std::make_unique<CpoObjective>(env); }

}  // namespace dpo
