// Whole-job behaviour through a real mpirun (label mpi): each test starts
// `mpirun -np 2 dist_abort_probe --mode X` as a child process, optionally signals mpirun
// once rank 0 prints READY, and checks the job's exit status, elapsed time and output.
// These are the failure paths a trainer relies on: one rank aborting, throwing or hanging
// must end the whole job quickly; SIGUSR1 must reach every rank and stop them together.
#include <gtest/gtest.h>

#include "tests/test_util.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <cstring>
#include <regex>
#include <set>
#include <string>
#include <vector>

#ifndef DPO_MPIEXEC
#error "DPO_MPIEXEC (the mpirun path) must be defined by tests/dist/dist.cmake"
#endif
// The probe sits next to this test in <build>/tests.
const std::string kProbe = dpo::testutil::binary_dir() + "/tests/dist_abort_probe";

namespace {

struct JobResult {
  int exit_code = -1;   // exit status, or 128 + signal if killed
  double seconds = 0;   // wall time until mpirun ended
  std::string output;   // stdout + stderr
  bool timed_out = false;
};

// Runs argv; when `signal_on_ready` != 0, sends it to the child once "READY" appears.
// The child gets its own process group so a hung job can be killed whole at `limit_s`.
JobResult run_job(const std::vector<std::string>& args, int signal_on_ready = 0,
                  double limit_s = 60.0) {
  int fds[2];
  if (pipe(fds) != 0) throw std::runtime_error("pipe failed");
  const auto t0 = std::chrono::steady_clock::now();
  const pid_t pid = fork();
  if (pid == 0) {
    setpgid(0, 0);
    dup2(fds[1], STDOUT_FILENO);
    dup2(fds[1], STDERR_FILENO);
    close(fds[0]);
    close(fds[1]);
    std::vector<char*> argv;
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    execv(argv[0], argv.data());
    _exit(127);
  }
  setpgid(pid, pid);
  close(fds[1]);
  JobResult res;
  bool signalled = false;
  char buf[4096];
  for (;;) {
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (elapsed > limit_s) {
      res.timed_out = true;
      kill(-pid, SIGKILL);
      break;
    }
    pollfd p{fds[0], POLLIN, 0};
    if (poll(&p, 1, 100) > 0) {
      const ssize_t n = read(fds[0], buf, sizeof buf);
      if (n <= 0) break;  // EOF: mpirun and every rank have closed the pipe
      res.output.append(buf, static_cast<size_t>(n));
    }
    if (signal_on_ready && !signalled && res.output.find("READY") != std::string::npos) {
      kill(pid, signal_on_ready);  // to mpirun only, as a batch script would
      signalled = true;
    }
  }
  close(fds[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  res.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (WIFEXITED(status)) res.exit_code = WEXITSTATUS(status);
  else if (WIFSIGNALED(status)) res.exit_code = 128 + WTERMSIG(status);
  return res;
}

std::vector<std::string> mpirun(int np, const std::vector<std::string>& probe_args,
                                const std::vector<std::string>& extra = {}) {
  std::vector<std::string> a{DPO_MPIEXEC, "--allow-run-as-root", "--oversubscribe", "--bind-to", "none"};
  a.insert(a.end(), extra.begin(), extra.end());
  a.insert(a.end(), {"-np", std::to_string(np), kProbe});
  a.insert(a.end(), probe_args.begin(), probe_args.end());
  return a;
}

bool has(const std::string& out, const std::string& s) { return out.find(s) != std::string::npos; }

TEST(DistLaunch, HealthyJobExitsZero) {
  const auto r = run_job(mpirun(2, {"--mode", "ok"}));
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(has(r.output, "probe ok rank 0 of 2 (launcher: mpirun)")) << r.output;
  EXPECT_TRUE(has(r.output, "probe ok rank 1 of 2 (launcher: mpirun)")) << r.output;
}

TEST(DistLaunch, SingletonWithoutMpirunIsAWorldOfOne) {
  const auto r = run_job({kProbe, "--mode", "ok"});
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(has(r.output, "probe ok rank 0 of 1 (launcher: none)")) << r.output;
}

TEST(DistLaunch, AbortOnOneRankEndsTheJobWithItsCode) {
  const auto r = run_job(mpirun(2, {"--mode", "abort"}));
  EXPECT_FALSE(r.timed_out) << r.output;
  EXPECT_EQ(r.exit_code, 3) << r.output;  // mpirun returns the MPI_Abort code
  EXPECT_LT(r.seconds, 20.0);
  EXPECT_TRUE(std::regex_search(r.output, std::regex("rank 1 on host \\S+: probe abort: shard file missing")))
      << r.output;
}

TEST(DistLaunch, ExceptionOnOneRankEndsTheJobInsteadOfHanging) {
  const auto r = run_job(mpirun(2, {"--mode", "throw"}));
  EXPECT_FALSE(r.timed_out) << r.output;
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_LT(r.seconds, 20.0);
  EXPECT_TRUE(has(r.output, "dist_abort_probe: probe throw: bad batch on this rank")) << r.output;
}

TEST(DistLaunch, WatchdogAbortsAHungCollective) {
  const auto r = run_job(mpirun(2, {"--mode", "watchdog", "--timeout", "1"}));
  EXPECT_FALSE(r.timed_out) << r.output;
  EXPECT_EQ(r.exit_code, 124) << r.output;  // kExitWatchdog
  EXPECT_LT(r.seconds, 20.0);               // rank 1 would sleep 60 s
  EXPECT_TRUE(std::regex_search(
      r.output, std::regex("rank 0 on host \\S+: barrier did not complete within 1 s; aborting the job")))
      << r.output;
}

TEST(DistLaunch, WatchdogAbortsAStuckTrainingStep) {
  const auto r = run_job(mpirun(2, {"--mode", "step_watchdog", "--timeout", "1.5"}));
  EXPECT_FALSE(r.timed_out) << r.output;
  EXPECT_EQ(r.exit_code, 124) << r.output;
  EXPECT_LT(r.seconds, 20.0);
  EXPECT_TRUE(std::regex_search(
      r.output, std::regex("rank 0 on host \\S+: training step 7 did not complete within 1.5 s; aborting the job")))
      << r.output;
}

// Every "rank R stopped at step S on signal N" line, as (R, S, N).
std::vector<std::array<int, 3>> stops(const std::string& out) {
  std::vector<std::array<int, 3>> v;
  std::regex re("rank (\\d+) stopped at step (\\d+) on signal (\\d+)");
  for (auto it = std::sregex_iterator(out.begin(), out.end(), re); it != std::sregex_iterator(); ++it) {
    v.push_back({std::stoi((*it)[1]), std::stoi((*it)[2]), std::stoi((*it)[3])});
  }
  return v;
}

TEST(DistLaunch, Sigusr1ReachesEveryRankAndTheyStopAtTheSameStep) {
  const auto r = run_job(mpirun(3, {"--mode", "signal"}), SIGUSR1);
  EXPECT_FALSE(r.timed_out) << r.output;
  EXPECT_EQ(r.exit_code, 75) << r.output;  // kExitPreempted, passed through by mpirun
  const auto s = stops(r.output);
  ASSERT_EQ(s.size(), 3u) << r.output;
  std::set<int> ranks;
  for (const auto& x : s) {
    ranks.insert(x[0]);
    EXPECT_EQ(x[1], s[0][1]) << "ranks stopped at different steps:\n" << r.output;
    EXPECT_EQ(x[2], SIGUSR1) << r.output;  // every rank got the forwarded signal
  }
  EXPECT_EQ(ranks.size(), 3u);
}

TEST(DistLaunch, SigtermToMpirunIsForwardedAsSigtermThenTheJobIsKilled) {
  // Open MPI 4.1: mpirun sends SIGCONT, waits odls_base_sigkill_timeout (T) s, sends
  // SIGTERM, waits T s, sends SIGKILL, and exits 1 whatever the ranks return. With T = 3
  // the ranks have 3 s to run their stop path.
  const auto r = run_job(mpirun(2, {"--mode", "signal"}, {"--mca", "odls_base_sigkill_timeout", "3"}),
                         SIGTERM);
  EXPECT_FALSE(r.timed_out) << r.output;
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_GE(r.seconds, 3.0);  // the first wait of T s
  EXPECT_LT(r.seconds, 20.0);
  const auto s = stops(r.output);
  ASSERT_EQ(s.size(), 2u) << r.output;
  for (const auto& x : s) EXPECT_EQ(x[2], SIGTERM) << r.output;
}

}  // namespace
