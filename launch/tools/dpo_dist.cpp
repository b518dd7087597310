// dpo_dist: DPO (default) or SFT (--stage sft) training of LoRA adapters on a
// frozen 4-bit Llama, alone, under mpirun, or under srun. docs/usage.md.
#include <unistd.h>

#include <cstdio>
#include <memory>

#include "dist/mpi_communicator.h"
#include "dist/signals.h"
#include "dist/watchdog.h"
#include "launch/cli.h"
#include "runtime/tensor_cache.h"
#include "launch/plan.h"
#include "runtime/threads.h"
#include "launch/train_options.h"
#include "launch/trainer.h"

using namespace dpo;

int main(int argc, char** argv) {
  std::unique_ptr<MpiSession> mpi;
  std::unique_ptr<Communicator> comm;
  int rc = run_main("dpo_dist", [&] {
    Cli cli("dpo_dist",
            "Train LoRA adapters on a frozen 4-bit Llama with DPO (or SFT), on one process or many "
            "(mpirun -np N dpo_dist ..., srun dpo_dist ...).");
    add_train_options(cli);
    if (!cli.parse(argc, argv)) return 0;
    TrainOptions o = train_options_from(cli);
    if (o.dry_run) {
      // The plan only: MPI for the process layout, the HDF5 offsets and config.json; no model.
      if (o.backend == "fake") {
        std::fputs(dry_run_plan(o, 1, 1).c_str(), stdout);
        return 0;
      }
      mpi = std::make_unique<MpiSession>(&argc, &argv);
      comm = make_communicator("mpi", false);
      if (comm->rank() == 0) {
        std::fputs(dry_run_plan(o, comm->world_size(), comm->local_size()).c_str(), stdout);
        std::fflush(stdout);
      }
      return 0;
    }
    limit_heap_retention();
    install_tensor_cache();  // large activations reuse their mappings step after step
    mpi = std::make_unique<MpiSession>(&argc, &argv);
    {
      // Creating the communicator runs collectives too (MPI_Comm_dup, MPI_Comm_split_type):
      // a peer that never arrives must not hang this rank for good.
      Watchdog startup("rank " + std::to_string(MpiSession::world_rank()) + " on host " + this_host(),
                       [](const std::string& message) {
                         std::fprintf(stderr, "%s\n", message.c_str());
                         std::fflush(stderr);
                         mpi_abort_job(kExitWatchdog);
                       });
      auto guard = startup.arm("communicator set-up (MPI_Comm_dup, MPI_Comm_split_type)", o.collective_timeout);
      comm = make_communicator(o.backend, o.device == "cuda");
    }
    // Every later collective (the trainer's set-up barriers included) is under the watchdog.
    comm->set_timeout(o.collective_timeout);
    int hosts = 1;
    if (comm->world_size() > 1) {
      comm->enable_peer_probe();
      hosts = static_cast<int>(comm->allreduce_sum(comm->local_rank() == 0 ? 1.0 : 0.0));
    }
    const int threads = configure_threads(static_cast<int>(o.threads), comm->local_size());
    if (comm->rank() == 0) {
      std::printf("dpo_dist %s: %d rank(s) on %d host(s) (%s backend), %d compute thread(s) per rank (%s)\n",
                  dpo_version(), comm->world_size(), hosts, comm->name().c_str(), threads, describe_threads().c_str());
      std::fflush(stdout);
    }
    try {
      return train(o, *comm);
    } catch (const std::exception& e) {
      if (comm->world_size() > 1) {
        // Take every rank down now rather than leaving peers in a collective.
        std::string msg = e.what();
        auto nl = msg.find("\nException raised from");
        if (nl != std::string::npos) msg = msg.substr(0, nl);
        comm->abort(1, "dpo_dist: error: " + msg);
      }
      throw;
    }
  });
  // A signal-triggered stop is collective and orderly (every rank returns it together).
  if (rc != 0 && rc != kExitPreempted && mpi) mpi->skip_finalize();
  comm.reset();
  mpi.reset();
  return rc;
}
