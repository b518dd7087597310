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

#include "core/modules_to_save.h"
#include "core/optim.h"
#include "core/safetensors.h"
#include "core/schedule.h"
#include "data/preference_h5.h"
#include "data/sampler.h"
#include "dist/grad_sync.h"
#include "dist/signals.h"
#include "launch/dpo_step.h"
#include "launch/metrics_log.h"
#include "launch/model_setup.h"
#include "launch/objective.h"
#include "launch/rng_state.h"
#include "launch/run_dir.h"
#include "launch/scoring.h"
#include "util/fs.h"
#include "util/json_read.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace dpo {

namespace {

// dpo_dist's own resume record in a checkpoint (trainer_state.json keeps HF's fields).
constexpr const char* kResumeRecord = "dpo_dist_state.json";

using Clock = std::chrono::steady_clock;


// The settings a checkpoint must agree on to be resumed (docs/usage.md, "Resuming").
json compat_record(const TrainOptions& o, const LoadedModel& m, const Objective& obj, int64_t global_batch) {
  const auto& c = m.model->config();
  json j{{"hidden_size", c.hidden_size},
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
  j.update(obj.compat());
  return j;
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
  std::vector<std::string> saved_modules_;  // modules_to_save as the adapter records them (tied: both tables)
  std::vector<std::pair<std::string, torch::Tensor>> params_;  // PEFT name -> LoRA parameter
  std::unique_ptr<AdamW> opt_;
  std::unique_ptr<GradSync> grad_sync_;
  std::unique_ptr<PreferenceReader> train_, eval_;
  std::unique_ptr<ShardSampler> sampler_;
  std::unique_ptr<MetricsLog> log_;
  std::unique_ptr<ProgressLine> progress_;
  std::unique_ptr<Objective> objective_;  // --stage: the loss, its metrics, its state
  double peak_gflops_ = 0;  // fp32 matmul peak of a rank, averaged over ranks (train_mfu)
  ScheduleOptions sched_;

  int64_t global_batch_ = 0, steps_per_epoch_ = 0, total_steps_ = 0, global_step_ = 0;
  double last_grad_norm_ = 0, last_lr_ = 0;
  // Log window (since the last log event), already reduced over ranks; the metric
  // sums are the objective's window.
  double win_tokens_ = 0, win_seconds_ = 0, win_grad_norm_sum_ = 0, win_flops_ = 0;
  int64_t win_steps_ = 0;
  int64_t last_saved_step_ = -1;
  RankGenerators rng_;  // LoRA dropout's generators (CPU, + this rank's GPU on --device cuda)
  std::vector<json> history_;
};

void Trainer::setup() {
  // Every collective from here on, the set-up barriers included, is under the watchdog.
  comm_.set_timeout(o_.collective_timeout);
  // 1. options that depend on the process layout
  global_batch_ = o_.per_device_train_batch_size * o_.gradient_accumulation_steps * world_;

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
  saved_modules_ = modules_to_save_recorded(o_.modules_to_save, m_.model->config().tie_word_embeddings);
  lora_cfg_.modules_to_save = saved_modules_;
  lora_cfg_.ensure_weight_tying = !o_.modules_to_save.empty() && m_.model->config().tie_word_embeddings;
  lora_attach(m_.projections, lora_cfg_, static_cast<uint64_t>(o_.seed));
  m_.model->set_gradient_checkpointing(o_.gradient_checkpointing);
  m_.model->set_mlp_tile_tokens(o_.tiled_mlp_tokens);
  // The chunked attention kernel with the packed path; the plain path stays TRL's.
  m_.model->set_attention_kernel(o_.padding_free || o_.prefix_sharing ? AttentionKernel::kChunked
                                                                      : AttentionKernel::kDense);
  m_.model->train();
  objective_ = make_objective(ObjectiveEnv{o_, m_, comm_, rng_});
  params_ = lora_parameters(m_.projections);
  // modules_to_save: full fp32 copies, trained, synced and saved with the adapters.
  for (auto& p : modules_to_save_attach(m_.model, saved_modules_)) params_.push_back(p);
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
  if (objective_->needs_reference() && o_.precompute_ref_log_probs) {
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
  say(objective_->title() + " on " + std::to_string(train_->size()) + " examples, " +
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
  d["compat"] = compat_record(o_, m_, *objective_, global_batch_);
  d["world_size"] = world_;
  d["steps_per_epoch"] = steps_per_epoch_;
  d["data_position"] = {{"epoch", global_step_ / steps_per_epoch_}, {"step_in_epoch", global_step_ % steps_per_epoch_}};
  d["scheduler"] = {{"type", sched_.type}, {"base_lr", sched_.base_lr}, {"warmup_steps", sched_.warmup_steps},
                    {"total_steps", sched_.total_steps}, {"last_lr", last_lr_}};
  d["log_window"] = {{"tokens", win_tokens_},  {"seconds", win_seconds_}, {"grad_norm_sum", win_grad_norm_sum_},
                     {"steps", win_steps_}, {"flops", win_flops_}};
  objective_->save_state(d);  // its log window, running statistics (bco_pair's mean)
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
  std::string diff = compat_diff(d["compat"], compat_record(o_, m_, *objective_, global_batch_));
  if (!diff.empty())
    throw std::runtime_error("cannot resume from " + dir + ": it was written with different settings (" + diff +
                             "); use the original settings, or a new --output_dir to start fresh");
  lora_load_peft(m_.projections, dir);
  modules_to_save_load(m_.model, saved_modules_, dir);
  SafetensorsFile opt_file(dir + "/optimizer.safetensors");
  std::vector<std::pair<std::string, torch::Tensor>> state;
  for (const auto& n : opt_file.names()) state.emplace_back(n, opt_file.get(n).clone());
  opt_->load_state(state);
  global_step_ = st["global_step"].get<int64_t>();
  last_lr_ = d["scheduler"].value("last_lr", 0.0);
  history_ = st["log_history"].get<std::vector<json>>();
  const json& w = d["log_window"];
  objective_->load_state(d);
  win_tokens_ = w["tokens"];
  win_seconds_ = w["seconds"];
  win_grad_norm_sum_ = w["grad_norm_sum"];
  win_steps_ = w["steps"];
  win_flops_ = w.value("flops", 0.0);
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

void Trainer::train_step() {
  const auto t0 = Clock::now();
  const int64_t epoch = global_step_ / steps_per_epoch_, in_epoch = global_step_ % steps_per_epoch_;
  StepPlan plan = sampler_->plan(epoch, in_epoch);
  m_.model->train();
  // 1-2. this rank's micro-batches: forward, loss, backward (the objective)
  StepCounters counters;
  std::vector<double> v = objective_->step(*train_, plan.micro_batches, plan.global_examples, &counters);
  // 3. one fused allreduce of the adapter gradients, averaged over ranks
  grad_sync_->sync();
  // 4. clip (norm before clipping is logged), step
  std::vector<torch::Tensor> ps;
  for (auto& p : params_) ps.push_back(p.second);
  last_grad_norm_ = clip_grad_norm(ps, o_.max_grad_norm);
  // 5. metrics: one small allreduce (sums), identical on every rank afterwards
  const size_t n_sums = v.size();
  v.push_back(counters.flops);
  v.push_back(static_cast<double>(counters.tokens));
  comm_.allreduce_sum(v);
  const double step_tokens = v.back();
  const double step_flops = v[n_sums];
  v.resize(n_sums);
  const StepSummary sum = objective_->summarize(v);
  if (!std::isfinite(sum.loss) || !std::isfinite(last_grad_norm_)) {
    throw std::runtime_error("non-finite " + std::string(std::isfinite(sum.loss) ? "gradient norm" : "loss") + " at step " +
                             std::to_string(global_step_ + 1) + " (loss " + std::to_string(sum.loss) + ", grad_norm " +
                             std::to_string(last_grad_norm_) +
                             "); stopped before the optimizer step, no adapter with NaN/Inf was saved. "
                             "Try a lower --learning_rate or --max_grad_norm, or check the data");
  }
  objective_->finish_step(v);  // its log window, and what the next step depends on
  last_lr_ = lr_at(sched_, global_step_);
  opt_->step(last_lr_);
  opt_->zero_grad();
  ++global_step_;
  const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
  win_tokens_ += step_tokens;
  win_flops_ += step_flops;
  win_seconds_ += secs;
  win_grad_norm_sum_ += last_grad_norm_;
  ++win_steps_;
  if (progress_) progress_->update(global_step_, sum.loss, sum.accuracy, step_tokens / std::max(secs, 1e-9));
}

void Trainer::log_train() {
  if (win_steps_ == 0) return;
  if (rank_ == 0) {
    json ev;
    ev["step"] = global_step_;
    ev["epoch"] = static_cast<double>(global_step_) / static_cast<double>(steps_per_epoch_);
    for (const auto& [k, val] : objective_->averages(objective_->window(), "")) ev[k] = val;
    ev["learning_rate"] = last_lr_;
    // The mean over the window's steps (like loss); HF logs the last step's norm, which
    // is the same with logging_steps 1.
    ev["grad_norm"] = win_grad_norm_sum_ / static_cast<double>(win_steps_);
    ev["tokens_per_second"] = win_tokens_ / std::max(win_seconds_, 1e-9);
    if (win_flops_ > 0 && peak_gflops_ > 0)
      ev["train_mfu"] = win_flops_ / (std::max(win_seconds_, 1e-9) * peak_gflops_ * 1e9 * world_);
    log_->log(ev);
    if (!progress_->active()) {
      char head[96], tail[96];
      std::snprintf(head, sizeof head, "step %lld/%lld  loss %.4f", (long long)global_step_, (long long)total_steps_,
                    ev["loss"].get<double>());
      std::snprintf(tail, sizeof tail, "  lr %.3g  grad_norm %.3f  %.0f tok/s", last_lr_, ev["grad_norm"].get<double>(),
                    ev["tokens_per_second"].get<double>());
      say(head + objective_->console_metrics(ev, /*eval=*/false) + tail);
    }
  }
  objective_->reset_window();
  win_tokens_ = win_seconds_ = win_grad_norm_sum_ = win_flops_ = 0;
  win_steps_ = 0;
}

void Trainer::evaluate() {
  if (!eval_) return;
  torch::NoGradGuard ng;
  m_.model->eval();
  const int64_t n = eval_->size();
  const int64_t lo = n * rank_ / world_, hi = n * (rank_ + 1) / world_;
  std::vector<double> v = objective_->evaluate(*eval_, lo, hi, o_.per_device_eval_batch_size);
  comm_.allreduce_sum(v);
  m_.model->train();
  if (rank_ != 0) return;
  json ev;
  ev["step"] = global_step_;
  ev["epoch"] = static_cast<double>(global_step_) / static_cast<double>(steps_per_epoch_);
  for (const auto& [k, val] : objective_->averages(v, "eval_")) ev[k] = val;
  log_->log(ev);
  char head[96];
  std::snprintf(head, sizeof head, "eval step %lld: loss %.4f", (long long)global_step_, ev.value("eval_loss", NAN));
  say(head + objective_->console_metrics(ev, /*eval=*/true));
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
      lora_save_peft(m_.projections, lora_cfg_, tmp, o_.model_name_or_path, modules_to_save_state(m_.model, saved_modules_));
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
                 modules_to_save_state(m_.model, saved_modules_));
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
