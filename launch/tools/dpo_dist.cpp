// dpo_dist: DPO (default) or SFT (--stage sft) training of LoRA adapters on a
// frozen 4-bit Llama, alone, under mpirun, or under srun. docs/usage.md.
#include <unistd.h>

#include <cstdio>
#include <memory>

#include "dist/mpi_communicator.h"
#include "dist/signals.h"
#include "launch/cli.h"
#include "launch/tensor_cache.h"
#include "launch/threads.h"
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
    limit_heap_retention();
    install_tensor_cache();  // large activations reuse their mappings step after step
    mpi = std::make_unique<MpiSession>(&argc, &argv);
    comm = make_communicator(o.backend, o.device == "cuda");
    const int threads = configure_threads(static_cast<int>(o.threads), comm->local_size());
    if (comm->rank() == 0) {
      std::printf("dpo_dist %s: %d rank(s) (%s backend), %d compute thread(s) per rank (%s)\n", dpo_version(),
                  comm->world_size(), comm->name().c_str(), threads, describe_threads().c_str());
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
