// Who stopped answering? A tiny TCP responder per rank, and a probe that the watchdog
// runs before it aborts a hung collective, so the message names the ranks and hosts
// that no longer answer ("no answer from rank 2 on host n17") instead of only saying
// that this rank waited too long.
//
// Protocol (no MPI; plain sockets, IPv4):
//  1. Every rank starts a PeerResponder: a thread accepting on an ephemeral port of
//     every interface; each connection gets one byte ('k') and is closed.
//  2. endpoint() = "<host> <port> <addr>[,<addr>...]" (this host's IPv4 addresses,
//     loopback last). The ranks exchange endpoints once at start-up (allgather).
//  3. On a timeout, probe_peers() connects to every other rank's addresses in parallel
//     (non-blocking, one deadline for all) and reads the byte. A rank that answers on
//     no address within the deadline "stopped answering" (host down, link down, or
//     the process is gone: connection refused).
// A process that is alive but stuck in a collective still answers (the responder is
// its own thread): the probe separates "unreachable" from "slow".
#pragma once
#include <memory>
#include <string>
#include <vector>

namespace dpo {

class PeerResponder {
 public:
  /// Listens on an ephemeral TCP port of every IPv4 interface. Throws std::runtime_error
  /// when no socket can be opened.
  PeerResponder();
  ~PeerResponder();  // stops the thread, closes the socket
  PeerResponder(const PeerResponder&) = delete;
  PeerResponder& operator=(const PeerResponder&) = delete;

  /// "<host> <port> <addr>[,<addr>...]": what peers need to probe this rank.
  std::string endpoint() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// The ranks (indices into endpoints, other than self) that did not answer within
/// timeout_s, as "rank R on host H" strings. Malformed endpoints count as not answering.
std::vector<std::string> probe_peers(const std::vector<std::string>& endpoints, int self, double timeout_s);

}  // namespace dpo
