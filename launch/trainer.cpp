#include "launch/trainer.h"

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "core/dpo.h"
#include "core/modules_to_save.h"
#include "core/optim.h"
#include "core/safetensors.h"
#include "core/schedule.h"
#include "data/collate.h"
#include "data/preference_h5.h"
#include "data/sampler.h"
#include "dist/grad_sync.h"
#include "dist/signals.h"
#include "launch/dpo_step.h"
#include "launch/metrics_log.h"
#include "launch/model_setup.h"
#include "launch/rng_state.h"
#include "launch/run_dir.h"
#include "launch/scoring.h"
#include "util/fs.h"
#include "util/json_read.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace dpo {

namespace {

// The four log-prob columns of this rank's pairs that aot / aot_unpaired sort over
// the global batch: policy chosen / rejected, reference chosen / rejected.
struct PairColumns {
  std::vector<double> pc, pr, rc, rr;
  // pol_c, pol_r (B); ref (2B) = [chosen; rejected]
  void add(const torch::Tensor& pol_c, const torch::Tensor& pol_r, const torch::Tensor& ref) {
    const int64_t B = pol_c.size(0);
    const torch::Tensor c = pol_c.to(torch::kCPU, torch::kFloat64).contiguous();
    const torch::Tensor j = pol_r.to(torch::kCPU, torch::kFloat64).contiguous();
    const torch::Tensor r = ref.to(torch::kCPU, torch::kFloat64).contiguous();
    for (int64_t i = 0; i < B; ++i) {
      pc.push_back(c.data_ptr<double>()[i]);
      pr.push_back(j.data_ptr<double>()[i]);
      rc.push_back(r.data_ptr<double>()[i]);
      rr.push_back(r.data_ptr<double>()[B + i]);
    }
  }
};

// dpo_dist's own resume record in a checkpoint (trainer_state.json keeps HF's fields).
constexpr const char* kResumeRecord = "dpo_dist_state.json";

using Clock = std::chrono::steady_clock;


// The settings a checkpoint must agree on to be resumed (docs/usage.md, "Resuming").
json compat_record(const TrainOptions& o, const LoadedModel& m, int64_t global_batch) {
  const auto& c = m.model->config();
  return json{{"stage", o.stage},
              {"hidden_size", c.hidden_size},
              {"num_hidden_layers", c.num_hidden_layers},
              {"vocab_size", c.vocab_size},
              {"tokenizer_sha256", m.tokenizer_sha256},
              {"lora_r", o.lora_r},
              {"lora_alpha", o.lora_alpha},
              {"use_rslora", o.use_rslora},
              {"lora_target_modules", o.lora_target_modules},
              {"modules_to_save", o.modules_to_save},
              {"global_batch", global_batch},
              {"load_in_4bit", o.load_in_4bit}};
}

std::string compat_diff(const json& saved, const json& now) {
  std::string diff;
  for (auto it = now.begin(); it != now.end(); ++it) {
    if (it.value().is_null()) continue;
    if (!saved.contains(it.key())) continue;
    if (saved[it.key()] != it.value())
      diff += (diff.empty() ? "" : "; ") + it.key() + ": checkpoint " + saved[it.key()].dump() + ", now " + it.value().dump();
  }
  return diff;
}

class Trainer {
 public:
  Trainer(const TrainOptions& o, Communicator& comm) : o_(o), comm_(comm), rank_(comm.rank()), world_(comm.world_size()) {}
  int run();

 private:
  void say(const std::string& msg) const {
    if (rank_ == 0) {
      if (progress_) progress_->finish();
      std::fprintf(stdout, "%s\n", msg.c_str());
      std::fflush(stdout);
    }
  }
  void setup();
  void resume(const std::string& dir);
  void maybe_precompute_ref(const std::string& path, std::unique_ptr<PreferenceReader>& reader);
  void train_step();
  void set_reference_mode(bool on);
  torch::Tensor reference_logps(const ModelBatch& b);
  torch::Tensor reference_logps(const torch::Tensor& ids, const torch::Tensor& mask, const torch::Tensor& lmask);
  DpoStepLoss batch_dpo_loss(const std::vector<PreferenceExample>& ex, int64_t pad_id, int64_t* tokens, double* flops,
                             torch::Tensor* ref_out = nullptr);
  DpoMetrics micro_dpo(const std::vector<int64_t>& idx, double scale, int64_t* tokens);
  DpoMetrics step_dpo_global(const std::vector<std::vector<int64_t>>& micro_batches, double scale, int64_t* tokens);
  DpoGlobalTerms global_terms(const PairColumns& local, size_t* offset);
  SftMetrics micro_sft(const std::vector<int64_t>& idx, double scale, int64_t* tokens);
  void log_train();
  void evaluate();
  std::string save_checkpoint();
  void save_final();
  json trainer_state() const;
  json resume_record() const;

  const TrainOptions& o_;
  Communicator& comm_;
  const int rank_, world_;

  LoadedModel m_;
  LoraConfig lora_cfg_;
  std::vector<std::pair<std::string, torch::Tensor>> params_;  // PEFT name -> LoRA parameter
  std::unique_ptr<AdamW> opt_;
  std::unique_ptr<GradSync> grad_sync_;
  std::unique_ptr<PreferenceReader> train_, eval_;
  std::unique_ptr<ShardSampler> sampler_;
  std::unique_ptr<MetricsLog> log_;
  std::unique_ptr<ProgressLine> progress_;
  DpoOptions dpo_opts_;
  BcoRunningMean bco_;  // bco_pair's reward mean over the steps so far (all ranks)
  DpoStepOptions step_opts_;
  double peak_gflops_ = 0;  // fp32 matmul peak of a rank, averaged over ranks (train_mfu)
  bool global_terms_ = false;
  ScheduleOptions sched_;

  int64_t global_batch_ = 0, steps_per_epoch_ = 0, total_steps_ = 0, global_step_ = 0;
  double last_grad_norm_ = 0, last_lr_ = 0;
  // Log window (since the last log event), already reduced over ranks.
  DpoMetrics win_dpo_;
  SftMetrics win_sft_;
  double win_tokens_ = 0, win_seconds_ = 0, win_grad_norm_sum_ = 0, win_flops_ = 0;
  int64_t win_steps_ = 0;
  int64_t last_saved_step_ = -1;
  double step_flops_ = 0;  // executed FLOPs of this rank's current step
  RankGenerators rng_;  // LoRA dropout's generators (CPU, + this rank's GPU on --device cuda)
  std::vector<json> history_;
};

void Trainer::setup() {
  // Every collective from here on, the set-up barriers included, is under the watchdog.
  comm_.set_timeout(o_.collective_timeout);
  // 1. options that depend on the process layout
  global_batch_ = o_.per_device_train_batch_size * o_.gradient_accumulation_steps * world_;
  dpo_opts_ = o_.dpo_options();
  validate_dpo_options(dpo_opts_);
  step_opts_.share_prompt = o_.prefix_sharing;
  step_opts_.padding_free = o_.padding_free;
  // aot / aot_unpaired sort over the whole global batch: train_step gathers every
  // rank's log-ratios and adds those terms itself (docs/objective.md).
  global_terms_ = o_.stage == "dpo" && dpo_has_global_terms(dpo_opts_);
  dpo_opts_.skip_global_terms = global_terms_;

  // 2. output dir (rank 0 creates; everyone checks it exists after a barrier)
  if (rank_ == 0) {
    std::error_code ec;
    fs::create_directories(o_.output_dir, ec);
    if (ec) throw std::runtime_error("cannot create --output_dir " + o_.output_dir + ": " + ec.message());
    int removed = remove_incomplete_checkpoints(o_.output_dir);
    if (removed) say("removed " + std::to_string(removed) + " incomplete checkpoint director" + (removed == 1 ? "y" : "ies") + " from an interrupted save");
  }
  comm_.barrier();

  // 3. model + adapters
  ModelSetupOptions mo;
  mo.model_dir = o_.model_name_or_path;
  mo.load_in_4bit = o_.load_in_4bit;
  mo.double_quant = o_.bnb_4bit_use_double_quant;
  mo.compute_dtype = o_.bnb_4bit_compute_dtype;
  mo.device = o_.device;
  auto t0 = Clock::now();
  m_ = load_model(mo);
  lora_cfg_.r = o_.lora_r;
  lora_cfg_.alpha = o_.lora_alpha;
  lora_cfg_.dropout = o_.lora_dropout;
  lora_cfg_.target_modules = o_.lora_target_modules;
  lora_cfg_.use_rslora = o_.use_rslora;
  lora_cfg_.modules_to_save = o_.modules_to_save;
  lora_cfg_.ensure_weight_tying = !o_.modules_to_save.empty() && m_.model->config().tie_word_embeddings;
  lora_attach(m_.projections, lora_cfg_, static_cast<uint64_t>(o_.seed));
  m_.model->set_gradient_checkpointing(o_.gradient_checkpointing);
  m_.model->set_mlp_tile_tokens(o_.tiled_mlp_tokens);
  // The chunked attention kernel with the packed path; the plain path stays TRL's.
  m_.model->set_attention_kernel(o_.padding_free || o_.prefix_sharing ? AttentionKernel::kChunked
                                                                      : AttentionKernel::kDense);
  m_.model->train();
  params_ = lora_parameters(m_.projections);
  // modules_to_save: full fp32 copies, trained, synced and saved with the adapters.
  for (auto& p : modules_to_save_attach(m_.model, o_.modules_to_save)) params_.push_back(p);
  int64_t n_params = 0;
  for (auto& p : params_) n_params += p.second.numel();
  say("model " + o_.model_name_or_path + " loaded in " +
      std::to_string(std::chrono::duration<double>(Clock::now() - t0).count()).substr(0, 5) + " s (" +
      (o_.load_in_4bit ? "NF4" : "dense") + "), LoRA r=" + std::to_string(o_.lora_r) + " on " +
      std::to_string(lora_parameters(m_.projections).size() / 2) + " projections" +
      (o_.modules_to_save.empty() ? std::string() : " + modules_to_save " + json(o_.modules_to_save).dump()) + ": " +
      std::to_string(n_params) + " trainable parameters");

  // 4. data
  train_ = std::make_unique<PreferenceReader>(o_.train_file);
  check_data_matches_model(m_, o_.train_file, train_->attrs().tokenizer_sha256, train_->attrs().vocab_size);
  llama_check_max_length(m_.model->config(), train_->attrs().max_length, o_.train_file + " on " + o_.model_name_or_path);
  if (!o_.eval_file.empty()) {
    eval_ = std::make_unique<PreferenceReader>(o_.eval_file);
    check_data_matches_model(m_, o_.eval_file, eval_->attrs().tokenizer_sha256, eval_->attrs().vocab_size);
    llama_check_max_length(m_.model->config(), eval_->attrs().max_length, o_.eval_file + " on " + o_.model_name_or_path);
  }
  if (train_->size() == 0) throw std::runtime_error(o_.train_file + " holds no examples");
  std::vector<int64_t> lengths;
  if (o_.group_by_length) lengths = train_->example_lengths();
  sampler_ = std::make_unique<ShardSampler>(train_->size(), o_.per_device_train_batch_size, o_.gradient_accumulation_steps,
                                            world_, rank_, static_cast<uint64_t>(o_.seed), o_.group_by_length,
                                            o_.group_by_length ? &lengths : nullptr);
  steps_per_epoch_ = sampler_->steps_per_epoch();
  total_steps_ = o_.max_steps > 0 ? o_.max_steps
                                  : static_cast<int64_t>(std::ceil(o_.num_train_epochs * static_cast<double>(steps_per_epoch_)));
  if (o_.stage == "dpo" && o_.precompute_ref_log_probs) {
    maybe_precompute_ref(o_.train_file, train_);
    if (eval_) maybe_precompute_ref(o_.eval_file, eval_);
  }

  // 5. optimizer + schedule
  AdamWOptions ao;
  ao.beta1 = o_.adam_beta1;
  ao.beta2 = o_.adam_beta2;
  ao.eps = o_.adam_epsilon;
  ao.weight_decay = o_.weight_decay;
  opt_ = std::make_unique<AdamW>(params_, ao);
  sched_.type = o_.lr_scheduler_type;
  sched_.base_lr = o_.learning_rate;
  sched_.total_steps = total_steps_;
  sched_.warmup_steps = warmup_steps_from(o_.warmup_steps, o_.warmup_ratio, total_steps_);
  std::vector<torch::Tensor> ps;
  for (auto& p : params_) ps.push_back(p.second);
  grad_sync_ = std::make_unique<GradSync>(comm_, ps);
  // train_mfu = executed FLOPs / (this peak x ranks x seconds).
  peak_gflops_ = comm_.allreduce_sum(measure_matmul_gflops(1024, 3)) / world_;

  // 6. dropout RNG: distinct per rank, reproducible from the seed (manual_seed seeds the
  // CPU generator and every visible GPU's)
  torch::manual_seed(static_cast<uint64_t>(o_.seed) * 1000003ULL + static_cast<uint64_t>(rank_));
  rng_ = default_rank_generators(m_.device);

  // 7. resume
  std::string resume_dir;
  if (rank_ == 0) resume_dir = resolve_resume(o_.resume_from_checkpoint, o_.output_dir);
  comm_.broadcast_string(resume_dir, 0);
  if (!resume_dir.empty()) resume(resume_dir);

  if (rank_ == 0) {
    if (!resume_dir.empty() && o_.report_to != "none") {
      // Events logged after the checkpoint by a run that died are replayed by this
      // one: metrics.jsonl restarts from the checkpoint's log_history (as HF's Trainer).
      std::string text;
      for (const auto& ev : history_) text += ev.dump() + "\n";
      write_file_atomic(o_.output_dir + "/metrics.jsonl", text);
    }
    log_ = std::make_unique<MetricsLog>(o_.output_dir, o_.report_to);
    log_->set_history(history_);
    json args;
    for (const auto& [k, v] : o_.dump) args[k] = v;
    args["world_size"] = world_;
    write_file_atomic(o_.output_dir + "/training_args.json", args.dump(2) + "\n");
  }
  say(std::string(o_.stage == "dpo" ? "DPO" : "SFT") + " on " + std::to_string(train_->size()) + " examples, " +
      std::to_string(world_) + " rank(s) x " + std::to_string(o_.per_device_train_batch_size) + " x " +
      std::to_string(o_.gradient_accumulation_steps) + " accumulation = global batch " + std::to_string(global_batch_) +
      "; " + std::to_string(steps_per_epoch_) + " steps/epoch, " + std::to_string(total_steps_) + " steps" +
      (global_step_ > 0 ? ", resuming at step " + std::to_string(global_step_) : ""));
}

void Trainer::maybe_precompute_ref(const std::string& path, std::unique_ptr<PreferenceReader>& reader) {
  if (reader->has_ref_logps()) {
    say(path + ": using the reference log-probs stored in the file");
    return;
  }
  say(path + ": precomputing reference log-probs (adapters off) for " + std::to_string(reader->size()) + " examples");
  // Each rank scores a contiguous slice; one allreduce assembles the columns.
  const int64_t n = reader->size();
  const int64_t lo = n * rank_ / world_, hi = n * (rank_ + 1) / world_;
  std::vector<int64_t> idx;
  for (int64_t i = lo; i < hi; ++i) idx.push_back(i);
  auto scores = score_examples(m_, *reader, idx, o_.per_device_eval_batch_size, /*adapters=*/false);
  torch::Tensor cols = torch::zeros({2, n}, torch::kFloat64);
  auto acc = cols.accessor<double, 2>();
  for (size_t k = 0; k < idx.size(); ++k) {
    acc[0][idx[k]] = scores[k].chosen_logps;
    acc[1][idx[k]] = scores[k].rejected_logps;
  }
  comm_.allreduce_sum(cols);
  reader.reset();  // close before rank 0 rewrites the file
  comm_.barrier();
  if (rank_ == 0) {
    std::vector<double> c(cols[0].data_ptr<double>(), cols[0].data_ptr<double>() + n);
    std::vector<double> r(cols[1].data_ptr<double>(), cols[1].data_ptr<double>() + n);
    write_ref_logps(path, c, r);
  }
  comm_.barrier();
  reader = std::make_unique<PreferenceReader>(path);
  if (!reader->has_ref_logps()) throw std::runtime_error(path + ": reference log-probs were not stored");
}

// trainer_state.json: exactly the fields of Hugging Face's TrainerState (transformers
// trainer_callback.py), so TrainerState.load_from_json reads it; dpo_dist's own resume
// record is resume_record() in dpo_dist_state.json.
json Trainer::trainer_state() const {
  json j;
  j["epoch"] = static_cast<double>(global_step_) / static_cast<double>(steps_per_epoch_);
  j["global_step"] = global_step_;
  j["max_steps"] = total_steps_;
  j["logging_steps"] = o_.logging_steps;
  j["eval_steps"] = o_.eval_steps;
  j["save_steps"] = o_.save_steps;
  j["train_batch_size"] = o_.per_device_train_batch_size;
  j["num_train_epochs"] = (total_steps_ + steps_per_epoch_ - 1) / steps_per_epoch_;
  j["num_input_tokens_seen"] = 0;  // HF counts them only with include_num_input_tokens_seen
  j["total_flos"] = 0.0;
  j["log_history"] = log_ ? log_->history() : history_;
  j["best_metric"] = nullptr;
  j["best_global_step"] = nullptr;
  j["best_model_checkpoint"] = nullptr;
  j["is_local_process_zero"] = true;  // written by rank 0
  j["is_world_process_zero"] = true;
  j["is_hyper_param_search"] = false;
  j["trial_name"] = nullptr;
  j["trial_params"] = nullptr;
  j["stateful_callbacks"] = json::object();
  return j;
}

json Trainer::resume_record() const {
  json d;
  d["compat"] = compat_record(o_, m_, global_batch_);
  d["world_size"] = world_;
  d["steps_per_epoch"] = steps_per_epoch_;
  d["data_position"] = {{"epoch", global_step_ / steps_per_epoch_}, {"step_in_epoch", global_step_ % steps_per_epoch_}};
  d["scheduler"] = {{"type", sched_.type}, {"base_lr", sched_.base_lr}, {"warmup_steps", sched_.warmup_steps},
                    {"total_steps", sched_.total_steps}, {"last_lr", last_lr_}};
  d["bco_running_mean"] = {{"reward_sum", bco_.reward_sum}, {"count", bco_.count}};
  d["log_window"] = {{"dpo", win_dpo_.to_vector()},     {"sft", win_sft_.to_vector()},
                     {"tokens", win_tokens_},          {"seconds", win_seconds_},
                     {"grad_norm_sum", win_grad_norm_sum_}, {"steps", win_steps_}, {"flops", win_flops_}};
  return d;
}

void Trainer::resume(const std::string& dir) {
  const std::string st_path = dir + "/trainer_state.json", rec_path = dir + "/" + kResumeRecord;
  json st = json_parse(json_read_file(st_path, kJsonConfigMaxBytes), st_path);
  // dpo_dist 0.1 kept its record in trainer_state.json's "dpo_dist" section.
  json d;
  if (std::filesystem::exists(rec_path)) d = json_parse(json_read_file(rec_path, kJsonConfigMaxBytes), rec_path);
  else if (st.contains("dpo_dist")) d = st["dpo_dist"];
  else throw std::runtime_error(dir + ": no " + std::string(kResumeRecord) +
                                "; not a checkpoint written by dpo_dist (it cannot be resumed)");
  std::string diff = compat_diff(d["compat"], compat_record(o_, m_, global_batch_));
  if (!diff.empty())
    throw std::runtime_error("cannot resume from " + dir + ": it was written with different settings (" + diff +
                             "); use the original settings, or a new --output_dir to start fresh");
  lora_load_peft(m_.projections, dir);
  modules_to_save_load(m_.model, o_.modules_to_save, dir);
  SafetensorsFile opt_file(dir + "/optimizer.safetensors");
  std::vector<std::pair<std::string, torch::Tensor>> state;
  for (const auto& n : opt_file.names()) state.emplace_back(n, opt_file.get(n).clone());
  opt_->load_state(state);
  global_step_ = st["global_step"].get<int64_t>();
  last_lr_ = d["scheduler"].value("last_lr", 0.0);
  history_ = st["log_history"].get<std::vector<json>>();
  const json& w = d["log_window"];
  win_dpo_ = DpoMetrics::from_vector(w["dpo"].get<std::vector<double>>());
  std::vector<double> sft = w["sft"].get<std::vector<double>>();
  sft.resize(SftMetrics::kNumFields, 0.0);  // 0.1 checkpoints had no token-accuracy field
  win_sft_ = SftMetrics::from_vector(sft);
  win_tokens_ = w["tokens"];
  win_seconds_ = w["seconds"];
  win_grad_norm_sum_ = w["grad_norm_sum"];
  win_steps_ = w["steps"];
  win_flops_ = w.value("flops", 0.0);
  if (d.contains("bco_running_mean")) {  // absent in older checkpoints: bco_pair had no reward mean then
    bco_.reward_sum = d["bco_running_mean"]["reward_sum"].get<double>();
    bco_.count = d["bco_running_mean"]["count"].get<double>();
    dpo_opts_.bco_delta = bco_.mean();
  }
  // Every rank's dropout generators (CPU, and CUDA on --device cuda) continue where they
  // stopped; with another world size the ranks' streams cannot map one to one, and without
  // the file (deleted to change --device: launch/rng_state.h) there is nothing to continue:
  // then they are reseeded.
  const std::string rng_path = dir + "/rng_state.safetensors";
  const bool have_rng = fs::exists(rng_path);
  if (d["world_size"].get<int>() == world_ && have_rng) {
    rng_restore(rng_, rng_load_rank(rng_path, rank_, rng_.device_type));
  } else {
    torch::manual_seed(static_cast<uint64_t>(o_.seed) * 1000003ULL + static_cast<uint64_t>(rank_) +
                       7919ULL * static_cast<uint64_t>(global_step_));
    if (rank_ == 0)
      say(have_rng ? "note: world size changed since the checkpoint; dropout streams reseeded"
                   : "note: " + rng_path + " is absent; dropout streams reseeded");
  }
  last_saved_step_ = global_step_;
  say("resumed from " + dir + " at step " + std::to_string(global_step_));
}

// The reference model: the same 4-bit base with the LoRA adapters and the
// modules_to_save copies off (PEFT's disable_adapter); on = back to the policy.
void Trainer::set_reference_mode(bool on) {
  lora_set_enabled(m_.projections, !on);
  m_.model->set_modules_to_save_enabled(!on);
}

// Summed answer log-probs of the reference, no grad: packed layout ...
torch::Tensor Trainer::reference_logps(const ModelBatch& b) {
  torch::NoGradGuard ng;
  set_reference_mode(true);
  torch::Tensor ref = model_answer_logps(m_.model, b, step_opts_.chunked_logps).logps.to(torch::kFloat64);
  set_reference_mode(false);
  return ref;
}

// ... or padded [chosen; rejected] rows (the plain path).
torch::Tensor Trainer::reference_logps(const torch::Tensor& ids, const torch::Tensor& mask, const torch::Tensor& lmask) {
  torch::NoGradGuard ng;
  set_reference_mode(true);
  torch::Tensor ref = sequence_logps(m_.model->forward(ids, mask), ids, lmask).logps.to(torch::kFloat64);
  set_reference_mode(false);
  return ref;
}

// A micro-batch's DPO loss: the plain path (TRL's: two padded rows per pair, full
// logits, dense attention) or the packed layout (launch/dpo_step.h) with
// --prefix_sharing / --padding_free. Adds the TRL-counted tokens and the executed
// FLOPs; ref_out (optional) receives the reference log-probs used (2B).
DpoStepLoss Trainer::batch_dpo_loss(const std::vector<PreferenceExample>& ex, int64_t pad_id, int64_t* tokens,
                                    double* flops, torch::Tensor* ref_out) {
  PackedPairs p = collate_packed(ex, pad_id, step_opts_.share_prompt, step_opts_.padding_free);
  if (tokens) *tokens += p.trl_tokens;
  const bool ckpt = o_.gradient_checkpointing && torch::GradMode::is_enabled();
  if (!step_opts_.share_prompt && !step_opts_.padding_free) {
    if (flops) *flops += dpo_step_flops(m_.model->config(), p, DpoStepOptions{false, false, false}, true,
                                        !p.ref_logps.defined(), ckpt);
    PreferenceBatch pb = collate_pairs(ex, pad_id);
    auto ids = pb.input_ids.to(m_.device), mask = pb.attention_mask.to(m_.device), lm = pb.loss_mask.to(m_.device);
    torch::Tensor ref = pb.ref_logps.defined() ? pb.ref_logps : reference_logps(ids, mask, lm);
    if (ref_out) *ref_out = ref;
    return dpo_batch_loss(m_.model->forward(ids, mask), ids, lm, ref.to(m_.device), dpo_opts_);
  }
  ModelBatch b = model_batch(p, m_.device);
  const bool dense = m_.model->attention_kernel() == AttentionKernel::kDense || m_.model->compute_dtype() != torch::kFloat32 ||
                     !m_.device.is_cpu();
  if (flops) *flops += dpo_step_flops(m_.model->config(), p, step_opts_, dense, !p.ref_logps.defined(), ckpt);
  torch::Tensor ref = p.ref_logps.defined() ? p.ref_logps : reference_logps(b);
  if (ref_out) *ref_out = ref;
  return dpo_batch_loss(model_answer_logps(m_.model, b, step_opts_.chunked_logps,
                                           policy_logps_options(dpo_opts_, b.target_sequence, b.sequences)),
                        ref.to(m_.device), dpo_opts_);
}

DpoMetrics Trainer::micro_dpo(const std::vector<int64_t>& idx, double scale, int64_t* tokens) {
  DpoMetrics met;
  if (idx.empty()) return met;
  std::vector<PreferenceExample> ex;
  ex.reserve(idx.size());
  for (int64_t i : idx) ex.push_back(train_->get(i));
  DpoStepLoss l = batch_dpo_loss(ex, train_->attrs().pad_id, tokens, &step_flops_);
  // scale = world / global pairs of the step: after the gradient average over ranks
  // this is the mean over every pair of the global batch.
  (l.losses.sum() * scale).backward();
  return l.metrics;
}

// Every rank gets the terms over all ranks' pairs (rank order) and its own offset;
// a rank sends its columns as [pol_c..., pol_r..., ref_c..., ref_r...] (4n doubles).
DpoGlobalTerms Trainer::global_terms(const PairColumns& mine, size_t* offset) {
  std::vector<double> local = mine.pc;
  local.insert(local.end(), mine.pr.begin(), mine.pr.end());
  local.insert(local.end(), mine.rc.begin(), mine.rc.end());
  local.insert(local.end(), mine.rr.begin(), mine.rr.end());
  const auto all = comm_.allgather_string(std::string(reinterpret_cast<const char*>(local.data()), local.size() * sizeof(double)));
  std::vector<double> pc, pr, rc, rr;
  for (int r = 0; r < world_; ++r) {
    const size_t n = all[r].size() / sizeof(double) / 4;
    if (r == rank_) *offset = pc.size();
    std::vector<double> v(4 * n);
    std::memcpy(v.data(), all[r].data(), v.size() * sizeof(double));
    pc.insert(pc.end(), v.begin(), v.begin() + n);
    pr.insert(pr.end(), v.begin() + n, v.begin() + 2 * n);
    rc.insert(rc.end(), v.begin() + 2 * n, v.begin() + 3 * n);
    rr.insert(rr.end(), v.begin() + 3 * n, v.end());
  }
  return dpo_global_terms(pc, pr, rc, rr, dpo_opts_);
}

// A step whose loss sorts over the global batch (aot, aot_unpaired). Pass 1: every
// micro-batch's reference and policy log-probs without grad (the dropout RNG state
// before each policy forward is kept). The gathered pairs give each pair's
// d(global terms)/d(policy logps). Pass 2: each micro-batch again with the same
// dropout draws, back-propagating its local terms + those coefficients. Costs one
// extra policy forward per micro-batch; holds one micro-batch's graph at a time.
DpoMetrics Trainer::step_dpo_global(const std::vector<std::vector<int64_t>>& micro_batches, double scale, int64_t* tokens) {
  struct Micro {
    torch::Tensor ids, mask, lmask, ref;
    RankRngState rng;  // dropout generators before the policy forward
    int64_t pairs = 0;
  };
  std::vector<Micro> mbs;
  PairColumns cols;
  for (const auto& idx : micro_batches) {
    if (idx.empty()) continue;
    std::vector<PreferenceExample> ex;
    for (int64_t i : idx) ex.push_back(train_->get(i));
    PreferenceBatch b = collate_pairs(ex, train_->attrs().pad_id);
    Micro m;
    m.ids = b.input_ids.to(m_.device);
    m.mask = b.attention_mask.to(m_.device);
    m.lmask = b.loss_mask.to(m_.device);
    m.pairs = b.num_pairs;
    *tokens += b.attention_mask.sum().item<int64_t>();
    m.ref = (b.ref_logps.defined() ? b.ref_logps : reference_logps(m.ids, m.mask, m.lmask)).to(torch::kFloat64);
    m.rng = rng_capture(rng_);
    torch::Tensor pol;
    {
      torch::NoGradGuard ng;
      pol = sequence_logps(m_.model->forward(m.ids, m.mask), m.ids, m.lmask).logps.to(torch::kCPU, torch::kFloat64);
    }
    cols.add(pol.narrow(0, 0, m.pairs), pol.narrow(0, m.pairs, m.pairs), m.ref);
    mbs.push_back(std::move(m));
  }
  size_t off = 0;
  const DpoGlobalTerms g = global_terms(cols, &off);
  DpoMetrics met;
  if (rank_ == 0) met.loss_sum += g.loss_sum;  // the global sum, counted once over ranks
  for (const auto& m : mbs) {
    rng_restore(rng_, m.rng);
    auto logits = m_.model->forward(m.ids, m.mask);
    DpoStepLoss l = dpo_batch_loss(logits, m.ids, m.lmask, m.ref.to(m_.device), dpo_opts_);
    std::vector<double> coef(2 * m.pairs);
    for (int64_t i = 0; i < m.pairs; ++i) {
      coef[i] = g.grad_c[off + i];
      coef[m.pairs + i] = g.grad_r[off + i];
    }
    off += static_cast<size_t>(m.pairs);
    const torch::Tensor c = torch::tensor(coef, torch::kFloat64).to(l.policy_logps.options());
    ((l.losses.sum() + (l.policy_logps * c).sum()) * scale).backward();
    met += l.metrics;
  }
  return met;
}

SftMetrics Trainer::micro_sft(const std::vector<int64_t>& idx, double scale, int64_t* tokens) {
  if (idx.empty()) return {};
  std::vector<PreferenceExample> ex;
  for (int64_t i : idx) ex.push_back(train_->get(i));
  SftBatch b = collate_sft(ex, train_->attrs().pad_id);
  auto ids = b.input_ids.to(m_.device), mask = b.attention_mask.to(m_.device), lmask = b.loss_mask.to(m_.device);
  *tokens += b.attention_mask.sum().item<int64_t>();
  auto logits = m_.model->forward(ids, mask);
  SftLoss l = sft_loss(logits, ids, lmask);
  (l.nll_sum * scale).backward();
  return SftMetrics::of(l, static_cast<int64_t>(idx.size()));
}

void Trainer::train_step() {
  const auto t0 = Clock::now();
  const int64_t epoch = global_step_ / steps_per_epoch_, in_epoch = global_step_ % steps_per_epoch_;
  StepPlan plan = sampler_->plan(epoch, in_epoch);
  m_.model->train();
  int64_t tokens = 0;
  step_flops_ = 0;
  DpoMetrics dm;
  SftMetrics sm;
  if (o_.stage == "dpo") {
    const double scale = static_cast<double>(world_) / static_cast<double>(plan.global_examples);
    if (global_terms_) {
      dm = step_dpo_global(plan.micro_batches, scale, &tokens);
    } else {
      for (const auto& mb : plan.micro_batches) dm += micro_dpo(mb, scale, &tokens);
    }
  } else {
    // SFT normalises by the answer tokens of the whole global step: count them first.
    double local = 0;
    for (const auto& mb : plan.micro_batches)
      for (int64_t i : mb) local += static_cast<double>(train_->lengths(i).chosen);
    const double global = comm_.allreduce_sum(local);
    const double scale = global > 0 ? static_cast<double>(world_) / global : 0.0;
    for (const auto& mb : plan.micro_batches) sm += micro_sft(mb, scale, &tokens);
  }
  // 3. one fused allreduce of the adapter gradients, averaged over ranks
  grad_sync_->sync();
  // 4. clip (norm before clipping is logged), step
  std::vector<torch::Tensor> ps;
  for (auto& p : params_) ps.push_back(p.second);
  last_grad_norm_ = clip_grad_norm(ps, o_.max_grad_norm);
  // 5. metrics: one small allreduce (sums), identical on every rank afterwards
  std::vector<double> v = dm.to_vector();
  std::vector<double> sv = sm.to_vector();
  v.insert(v.end(), sv.begin(), sv.end());
  v.push_back(step_flops_);
  v.push_back(static_cast<double>(tokens));
  comm_.allreduce_sum(v);
  DpoMetrics gdm = DpoMetrics::from_vector(std::vector<double>(v.begin(), v.begin() + DpoMetrics::kNumFields));
  SftMetrics gsm = SftMetrics::from_vector(
      std::vector<double>(v.begin() + DpoMetrics::kNumFields, v.begin() + DpoMetrics::kNumFields + SftMetrics::kNumFields));
  const double step_tokens = v.back();
  const double step_flops = v[v.size() - 2];
  const double step_loss = o_.stage == "dpo" ? gdm.loss_sum / std::max(1.0, gdm.pairs) : gsm.nll_sum / std::max(1.0, gsm.tokens);
  if (!std::isfinite(step_loss) || !std::isfinite(last_grad_norm_)) {
    throw std::runtime_error("non-finite " + std::string(std::isfinite(step_loss) ? "gradient norm" : "loss") + " at step " +
                             std::to_string(global_step_ + 1) + " (loss " + std::to_string(step_loss) + ", grad_norm " +
                             std::to_string(last_grad_norm_) +
                             "); stopped before the optimizer step, no adapter with NaN/Inf was saved. "
                             "Try a lower --learning_rate or --max_grad_norm, or check the data");
  }
  // bco_pair's reward mean: the next step (and evaluation) shifts by the steps so far.
  bco_.add(gdm.rewards_chosen_sum, gdm.rewards_rejected_sum, gdm.pairs);
  dpo_opts_.bco_delta = bco_.mean();
  last_lr_ = lr_at(sched_, global_step_);
  opt_->step(last_lr_);
  opt_->zero_grad();
  ++global_step_;
  const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
  win_dpo_ += gdm;
  win_sft_ += gsm;
  win_tokens_ += step_tokens;
  win_flops_ += step_flops;
  win_seconds_ += secs;
  win_grad_norm_sum_ += last_grad_norm_;
  ++win_steps_;
  if (progress_)
    // DPO: reward accuracy of the pairs; SFT: answer-token accuracy.
    progress_->update(global_step_, step_loss,
                      o_.stage == "dpo" ? (gdm.pairs > 0 ? gdm.rewards_accuracies_sum / gdm.pairs : NAN)
                                        : (gsm.tokens > 0 ? gsm.correct / gsm.tokens : NAN),
                      step_tokens / std::max(secs, 1e-9));
}

void Trainer::log_train() {
  if (win_steps_ == 0) return;
  if (rank_ == 0) {
    json ev;
    ev["step"] = global_step_;
    ev["epoch"] = static_cast<double>(global_step_) / static_cast<double>(steps_per_epoch_);
    if (o_.stage == "dpo") {
      for (const auto& [k, val] : win_dpo_.averages("")) ev[k] = val;
    } else {
      for (const auto& [k, val] : win_sft_.averages("")) ev[k] = val;
    }
    ev["learning_rate"] = last_lr_;
    // The mean over the window's steps (like loss); HF logs the last step's norm, which
    // is the same with logging_steps 1.
    ev["grad_norm"] = win_grad_norm_sum_ / static_cast<double>(win_steps_);
    ev["tokens_per_second"] = win_tokens_ / std::max(win_seconds_, 1e-9);
    if (win_flops_ > 0 && peak_gflops_ > 0)
      ev["train_mfu"] = win_flops_ / (std::max(win_seconds_, 1e-9) * peak_gflops_ * 1e9 * world_);
    log_->log(ev);
    if (!progress_->active()) {
      char buf[256];
      const double grad_norm = ev["grad_norm"].get<double>(), tps = ev["tokens_per_second"].get<double>();
      if (o_.stage == "dpo") {
        std::snprintf(buf, sizeof buf, "step %lld/%lld  loss %.4f  acc %.3f  margin %.4f  lr %.3g  grad_norm %.3f  %.0f tok/s",
                      (long long)global_step_, (long long)total_steps_, ev["loss"].get<double>(),
                      ev.value("rewards/accuracies", NAN), ev.value("rewards/margins", NAN), last_lr_, grad_norm, tps);
      } else {
        std::snprintf(buf, sizeof buf, "step %lld/%lld  loss %.4f  token_acc %.3f  lr %.3g  grad_norm %.3f  %.0f tok/s",
                      (long long)global_step_, (long long)total_steps_, ev["loss"].get<double>(),
                      ev.value("mean_token_accuracy", NAN), last_lr_, grad_norm, tps);
      }
      say(buf);
    }
  }
  win_dpo_ = DpoMetrics{};
  win_sft_ = SftMetrics{};
  win_tokens_ = win_seconds_ = win_grad_norm_sum_ = win_flops_ = 0;
  win_steps_ = 0;
}

void Trainer::evaluate() {
  if (!eval_) return;
  torch::NoGradGuard ng;
  m_.model->eval();
  const int64_t n = eval_->size();
  const int64_t lo = n * rank_ / world_, hi = n * (rank_ + 1) / world_;
  DpoMetrics dm;
  SftMetrics sm;
  PairColumns cols;  // global terms: this rank's eval pairs
  for (int64_t s = lo; s < hi; s += o_.per_device_eval_batch_size) {
    std::vector<PreferenceExample> ex;
    for (int64_t i = s; i < std::min(hi, s + o_.per_device_eval_batch_size); ++i) ex.push_back(eval_->get(i));
    if (o_.stage == "dpo") {
      torch::Tensor ref;
      DpoStepLoss l = batch_dpo_loss(ex, eval_->attrs().pad_id, nullptr, nullptr, &ref);
      dm += l.metrics;
      if (global_terms_) cols.add(l.chosen_logps, l.rejected_logps, ref);
    } else {
      SftBatch b = collate_sft(ex, eval_->attrs().pad_id);
      auto ids = b.input_ids.to(m_.device);
      SftLoss l = sft_loss(m_.model->forward(ids, b.attention_mask.to(m_.device)), ids, b.loss_mask.to(m_.device));
      sm += SftMetrics::of(l, static_cast<int64_t>(ex.size()));
    }
  }
  if (global_terms_) {
    // aot / aot_unpaired over the whole eval set (sorted across ranks)
    size_t off = 0;
    const DpoGlobalTerms g = global_terms(cols, &off);
    if (rank_ == 0) dm.loss_sum += g.loss_sum;
  }
  std::vector<double> v = o_.stage == "dpo" ? dm.to_vector() : sm.to_vector();
  comm_.allreduce_sum(v);
  m_.model->train();
  if (rank_ != 0) return;
  json ev;
  ev["step"] = global_step_;
  ev["epoch"] = static_cast<double>(global_step_) / static_cast<double>(steps_per_epoch_);
  auto avg = o_.stage == "dpo" ? DpoMetrics::from_vector(v).averages("eval_") : SftMetrics::from_vector(v).averages("eval_");
  for (const auto& [k, val] : avg) ev[k] = val;
  log_->log(ev);
  char buf[256];
  if (o_.stage == "dpo")
    std::snprintf(buf, sizeof buf, "eval step %lld: loss %.4f  rewards/accuracies %.3f  rewards/margins %.4f",
                  (long long)global_step_, ev.value("eval_loss", NAN), ev.value("eval_rewards/accuracies", NAN),
                  ev.value("eval_rewards/margins", NAN));
  else
    std::snprintf(buf, sizeof buf, "eval step %lld: loss %.4f", (long long)global_step_, ev.value("eval_loss", NAN));
  say(buf);
}

std::string Trainer::save_checkpoint() {
  // Every rank contributes its RNG states; rank 0 writes.
  const RankRngState mine = rng_capture(rng_);
  std::vector<std::string> cpu_states = comm_.allgather_string(rng_state_bytes(mine.cpu));
  std::vector<std::string> dev_states;
  if (mine.device.defined()) dev_states = comm_.allgather_string(rng_state_bytes(mine.device));
  std::string path;
  if (rank_ == 0) {
    json st = trainer_state(), rec = resume_record();
    json args;
    for (const auto& [k, v] : o_.dump) args[k] = v;
    path = checkpoint_commit(o_.output_dir, global_step_, [&](const std::string& tmp) {
      lora_save_peft(m_.projections, lora_cfg_, tmp, o_.model_name_or_path, modules_to_save_state(m_.model, o_.modules_to_save));
      safetensors_save(tmp + "/optimizer.safetensors", opt_->state(), {{"format", "dpo_dist AdamW"}});
      std::vector<RankRngState> all(cpu_states.size());
      for (size_t i = 0; i < all.size(); ++i) {
        all[i].cpu = rng_state_from_bytes(cpu_states[i]);
        if (!dev_states.empty()) all[i].device = rng_state_from_bytes(dev_states[i]);
      }
      rng_save(tmp + "/rng_state.safetensors", rng_.device_type, all);
      write_file_atomic(tmp + "/training_args.json", args.dump(2) + "\n");
      write_file_atomic(tmp + "/" + kResumeRecord, rec.dump(2) + "\n");
      // trainer_state.json last: its presence marks the checkpoint complete.
      write_file_atomic(tmp + "/trainer_state.json", st.dump(2) + "\n");
    });
    rotate_checkpoints(o_.output_dir, o_.save_total_limit, path);
    say("saved " + path);
  }
  last_saved_step_ = global_step_;
  comm_.barrier();
  return path;
}

void Trainer::save_final() {
  if (rank_ != 0) return;
  lora_save_peft(m_.projections, lora_cfg_, o_.output_dir, o_.model_name_or_path,
                 modules_to_save_state(m_.model, o_.modules_to_save));
  write_file_atomic(o_.output_dir + "/trainer_state.json", trainer_state().dump(2) + "\n");
}

int Trainer::run() {
  setup();
  if (rank_ == 0) progress_ = std::make_unique<ProgressLine>(total_steps_, global_step_, o_.progress);
  else progress_ = std::make_unique<ProgressLine>(total_steps_, global_step_, "off");
  install_stop_signal_handlers();
  if (global_step_ == 0 && eval_ && o_.eval_steps > 0) evaluate();
  while (global_step_ < total_steps_) {
    bool stop;
    {
      // A step that hangs (a dead or stuck peer) aborts the whole job.
      auto guard = comm_.watch("training step " + std::to_string(global_step_ + 1), o_.collective_timeout);
      train_step();
      stop = comm_.any(stop_requested());
    }
    if (global_step_ % o_.logging_steps == 0) log_train();
    if (o_.eval_steps > 0 && global_step_ % o_.eval_steps == 0 && global_step_ < total_steps_) evaluate();
    if (o_.save_steps > 0 && global_step_ % o_.save_steps == 0 && global_step_ < total_steps_) save_checkpoint();
    if (stop) {
      say("stop signal received (" + std::string(stop_signal() ? strsignal(stop_signal()) : "on another rank") +
          "): checkpointing at step " + std::to_string(global_step_));
      if (last_saved_step_ != global_step_) save_checkpoint();
      return kExitPreempted;
    }
  }
  log_train();
  evaluate();
  if (last_saved_step_ != global_step_) save_checkpoint();
  save_final();
  if (progress_) progress_->finish();
  say("done: adapter " + o_.output_dir + "/adapter_model.safetensors, metrics " + o_.output_dir + "/metrics.jsonl, checkpoints " +
      o_.output_dir + "/checkpoint-*");
  return 0;
}

}  // namespace

int train(const TrainOptions& opts, Communicator& comm) {
  Trainer t(opts, comm);
  return t.run();
}

}  // namespace dpo
