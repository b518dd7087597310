#!/usr/bin/env bash
# Multi-host DPO training in network namespaces (tests/netns/netns_lib.sh): two hosts,
# each its own namespace, address and hostname, joined by veth + bridge; OpenMPI over
# TCP only, launched with an rsh agent that enters the host's namespace.
#  1. 2 hosts x 2 ranks == 1 host x 4 ranks: losses and final adapters within the tolerances
#     of two runs that differ only in the order of their sums (the allreduce over the hosts),
#     derived from the model's shape, the steps and the LR (tests/e2e/fp_bounds.py), 16
#     steps, constant LR, dropout 0.
#  2. Link failure: a 2x2 run with host 2's link limited to 4 Mbit/s (tc tbf) saves every
#     2 steps; once checkpoint-2 is complete, host 2's link goes down. The whole job
#     (scripts/dpo_mpirun) must exit non-zero within 60 s, a message must name a rank
#     and host, and every checkpoint left must be complete.
#  3. Elastic restart: the newest checkpoint resumes on host 1 alone with 2 ranks and
#     gradient_accumulation_steps 2 (same global batch 4) to step 16, and equals run 1's
#     1 x 4 result (same tolerances).
# Exit 77 (ctest: NOT RUN) when namespaces cannot be created (not root, no iproute2).
#   tests/netns/netns_train.sh [BIN_DIR]
e2e_name=netns_train
source "$(dirname "${BASH_SOURCE[0]}")/netns_lib.sh"
netns_require
source "$(dirname "${BASH_SOURCE[0]}")/../e2e/common.sh"
netns_up 2
h1=$netns_subnet.1
h2=$netns_subnet.2

steps=16
# A constant learning rate: the runs below stop at different max_steps and must agree.
mapfile -d '' base < <(with_opt lr_scheduler_type constant "${train_args[@]}")
mapfile -d '' base < <(with_opt warmup_steps 0 "${base[@]}")
common=("${base[@]}" --lora_dropout 0 --per_device_train_batch_size 1 --save_steps 0 --max_steps $steps)
# Rows of <= 48 tokens, learning rate 3e-3 (train_args); the loss tolerance of the last step
# holds for every earlier one (it grows with the step).
loss_tol=$(python3 "$src/tests/e2e/fp_bounds.py" loss_tolerance "$work/model/config.json" 48 $steps)
adapter_tol=$(python3 "$src/tests/e2e/fp_bounds.py" adapter_tolerance "$work/model/config.json" 48 $steps 3e-3)

# ---- 1. 2 hosts x 2 ranks == 1 host x 4 ranks -------------------------------------------------
t=$SECONDS
rc=0
run_bounded 180 "$work/one_host.log" "${mpi[@]}" -np 4 "$DPO_BIN/dpo_dist" "${common[@]}" --output_dir "$work/one_host" || rc=$?
[ $rc = 0 ] || { tail -n 20 "$work/one_host.log"; fail "1 host x 4 ranks exited $rc"; }
log "1 host x 4 ranks: $((SECONDS - t)) s"
t=$SECONDS
rc=0
netns_mpirun_cmd 1 -H "$h1:2,$h2:2" -np 4 "$DPO_BIN/dpo_dist" "${common[@]}" --output_dir "$work/two_hosts"
run_bounded 180 "$work/two_hosts.log" "${netns_cmd[@]}" || rc=$?
[ $rc = 0 ] || { tail -n 30 "$work/two_hosts.log"; fail "2 hosts x 2 ranks exited $rc"; }
grep -q "4 rank(s)" "$work/two_hosts.log" || fail "the 2x2 run did not report 4 ranks"
grep -q "2 host(s)" "$work/two_hosts.log" || fail "the 2x2 run did not see 2 hosts: $(grep -m1 'rank(s)' "$work/two_hosts.log")"
log "2 hosts x 2 ranks: $((SECONDS - t)) s"
cmp_losses_rel "$work/two_hosts/metrics.jsonl" "$work/one_host/metrics.jsonl" "$loss_tol"
cmp_adapters "$work/two_hosts/adapter_model.safetensors" "$work/one_host/adapter_model.safetensors" "$adapter_tol"
log "2x2 == 1x4"

# ---- 2. link failure mid-run ------------------------------------------------------------------
out=$work/cut
# tbf, not netem: this kernel has no sch_netem; a rate limit slows the steps down enough.
ip netns exec "${netns_ns[2]}" tc qdisc add dev eth0 root tbf rate 4mbit burst 32kbit latency 400ms ||
  fail "tc tbf on host 2 failed"
mapfile -d '' cut_base < <(with_opt collective_timeout 15 "${base[@]}")
args=("${cut_base[@]}" --lora_dropout 0 --per_device_train_batch_size 1 --save_steps 2 --output_dir "$out")
netns_mpirun_cmd 1 -H "$h1:2,$h2:2" -np 4 "$DPO_BIN/dpo_dist" "${args[@]}" --max_steps 100
start_bg pid "$work/cut.log" "${netns_cmd[@]}"
rc=0
wait_for "$pid" 120 test -f "$out/checkpoint-2/trainer_state.json" || rc=$?
[ $rc = 0 ] || { tail -n 20 "$work/cut.log"; fail "no checkpoint-2 (wait_for: $rc; 1 = the job ended, 2 = 120 s passed)"; }
t_cut=$SECONDS
netns_link 2 down
at=$(last_logged_step "$out/metrics.jsonl")
log "host 2's link down after step $at was logged"
finish_bg cut_rc "$pid" 120
took=$((SECONDS - t_cut))
[ "$cut_rc" != 0 ] || fail "the job exited 0 after host 2's link went down"
log "the job exited $cut_rc ${took} s after the link went down (limit 60 s)"
grep -E "rank [0-9]+ on host ${netns_tag}h[12]" "$work/cut.log" | head -n 4
[ "$took" -le 60 ] || fail "the job took ${took} s to end after the link failure (limit 60 s)"
grep -qE "rank [0-9]+ on host ${netns_tag}h[12]" "$work/cut.log" || fail "no message names a rank and its host: $(tail -n 5 "$work/cut.log")"
k=$(newest_checkpoint "$out")
[ -n "$k" ] || fail "no complete checkpoint left"
[ "$k" -lt $steps ] || fail "checkpoint-$k: the cut came too late to test the restart below step $steps"
for d in "$out"/checkpoint-*; do
  [ -f "$d/trainer_state.json" ] && [ -s "$d/adapter_model.safetensors" ] && [ -s "$d/optimizer.safetensors" ] ||
    fail "$d is a checkpoint-N dir without trainer_state.json/adapter/optimizer (a half-written checkpoint)"
done
log "newest complete checkpoint: checkpoint-$k"

# ---- 3. elastic restart on the surviving host ---------------------------------------------------
t=$SECONDS
rc=0
mapfile -d '' resume_args < <(with_opt gradient_accumulation_steps 2 "${args[@]}")
netns_mpirun_cmd 1 -H "$h1:2" -np 2 "$DPO_BIN/dpo_dist" "${resume_args[@]}" --max_steps $steps \
  --resume_from_checkpoint auto
run_bounded 180 "$work/resume.log" "${netns_cmd[@]}" || rc=$?
[ $rc = 0 ] || { tail -n 20 "$work/resume.log"; fail "the restart on host 1 (2 ranks, accumulation 2) exited $rc"; }
grep -q "resuming at step $k" "$work/resume.log" || fail "the restart did not resume at step $k: $(grep -m1 "global batch" "$work/resume.log")"
cmp_losses_rel "$out/metrics.jsonl" "$work/one_host/metrics.jsonl" "$loss_tol"
cmp_adapters "$out/adapter_model.safetensors" "$work/one_host/adapter_model.safetensors" "$adapter_tol"
log "restart from checkpoint-$k with 2 ranks x accumulation 2 == 1 host x 4 ranks ($((SECONDS - t)) s)"
log "PASS"
