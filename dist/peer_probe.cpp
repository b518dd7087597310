// PeerResponder and probe_peers (peer_probe.h): poll(2)-driven, no MPI, no libtorch.
#include "dist/peer_probe.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <thread>

namespace dpo {

struct PeerResponder::Impl {
  int fd = -1;
  int wake[2] = {-1, -1};  // a pipe: writing to it ends the thread
  int port = 0;
  std::thread thread;
};

namespace {

std::string this_host() {
  char buf[256] = {0};
  if (gethostname(buf, sizeof buf - 1) != 0) return "unknown";
  return buf;
}

// IPv4 addresses of the interfaces that are up, loopback last.
std::vector<std::string> local_addresses() {
  std::vector<std::string> out, loop;
  ifaddrs* ifs = nullptr;
  if (getifaddrs(&ifs) == 0) {
    for (ifaddrs* i = ifs; i != nullptr; i = i->ifa_next) {
      if (i->ifa_addr == nullptr || i->ifa_addr->sa_family != AF_INET || !(i->ifa_flags & IFF_UP)) continue;
      char text[INET_ADDRSTRLEN] = {0};
      inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(i->ifa_addr)->sin_addr, text, sizeof text);
      ((i->ifa_flags & IFF_LOOPBACK) ? loop : out).push_back(text);
    }
    freeifaddrs(ifs);
  }
  out.insert(out.end(), loop.begin(), loop.end());
  return out;
}

struct Endpoint {
  std::string host;
  int port = 0;
  std::vector<std::string> addrs;
};

bool parse_endpoint(const std::string& s, Endpoint* e) {
  std::istringstream in(s);
  std::string addrs;
  if (!(in >> e->host >> e->port >> addrs) || e->port <= 0 || e->port > 65535) return false;
  std::stringstream as(addrs);
  std::string a;
  while (std::getline(as, a, ','))
    if (!a.empty()) e->addrs.push_back(a);
  return !e->addrs.empty();
}

}  // namespace

PeerResponder::PeerResponder() : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (m.fd < 0) throw std::runtime_error(std::string("peer probe: socket: ") + std::strerror(errno));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_ANY);
  a.sin_port = 0;
  socklen_t len = sizeof a;
  if (::bind(m.fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 || ::listen(m.fd, 64) != 0 ||
      ::getsockname(m.fd, reinterpret_cast<sockaddr*>(&a), &len) != 0 || ::pipe2(m.wake, O_CLOEXEC) != 0) {
    const std::string why = std::strerror(errno);
    ::close(m.fd);
    throw std::runtime_error("peer probe: cannot listen on a TCP port: " + why);
  }
  m.port = ntohs(a.sin_port);
  m.thread = std::thread([&m] {
    for (;;) {
      pollfd p[2] = {{m.fd, POLLIN, 0}, {m.wake[0], POLLIN, 0}};
      if (::poll(p, 2, -1) < 0) {
        if (errno == EINTR) continue;
        return;
      }
      if (p[1].revents) return;
      if (p[0].revents & POLLIN) {
        const int c = ::accept4(m.fd, nullptr, nullptr, SOCK_CLOEXEC);
        if (c >= 0) {
          (void)!::write(c, "k", 1);
          ::close(c);
        }
      }
    }
  });
}

PeerResponder::~PeerResponder() {
  Impl& m = *impl_;
  if (m.wake[1] >= 0) (void)!::write(m.wake[1], "x", 1);
  if (m.thread.joinable()) m.thread.join();
  for (int fd : {m.fd, m.wake[0], m.wake[1]})
    if (fd >= 0) ::close(fd);
}

std::string PeerResponder::endpoint() const {
  std::string addrs;
  for (const auto& a : local_addresses()) addrs += (addrs.empty() ? "" : ",") + a;
  if (addrs.empty()) addrs = "127.0.0.1";
  return this_host() + " " + std::to_string(impl_->port) + " " + addrs;
}

std::vector<std::string> probe_peers(const std::vector<std::string>& endpoints, int self, double timeout_s) {
  struct Try {
    int rank;
    int fd;
    bool connected = false;
  };
  std::vector<Endpoint> eps(endpoints.size());
  std::vector<bool> valid(endpoints.size()), answered(endpoints.size(), false);
  std::vector<Try> tries;
  for (size_t r = 0; r < endpoints.size(); ++r) {
    if (static_cast<int>(r) == self) continue;
    valid[r] = parse_endpoint(endpoints[r], &eps[r]);
    if (!valid[r]) continue;
    for (const auto& addr : eps[r].addrs) {
      sockaddr_in a{};
      a.sin_family = AF_INET;
      a.sin_port = htons(static_cast<uint16_t>(eps[r].port));
      if (inet_pton(AF_INET, addr.c_str(), &a.sin_addr) != 1) continue;
      // Loopback reaches this host only: use it only for a peer on this host.
      if ((ntohl(a.sin_addr.s_addr) >> 24) == 127 && eps[r].host != this_host()) continue;
      const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
      if (fd < 0) continue;
      if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 && errno != EINPROGRESS) {
        ::close(fd);
        continue;
      }
      tries.push_back({static_cast<int>(r), fd});
    }
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  for (;;) {
    std::vector<pollfd> p;
    std::vector<size_t> idx;
    for (size_t i = 0; i < tries.size(); ++i) {
      if (tries[i].fd < 0 || answered[tries[i].rank]) continue;
      p.push_back({tries[i].fd, static_cast<short>(tries[i].connected ? POLLIN : POLLOUT), 0});
      idx.push_back(i);
    }
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (p.empty() || left.count() <= 0) break;
    if (::poll(p.data(), p.size(), static_cast<int>(left.count())) < 0 && errno != EINTR) break;
    for (size_t k = 0; k < p.size(); ++k) {
      Try& t = tries[idx[k]];
      if (p[k].revents == 0) continue;
      if (!t.connected) {
        int err = 0;
        socklen_t len = sizeof err;
        ::getsockopt(t.fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err == 0 && (p[k].revents & POLLOUT)) {
          t.connected = true;
          continue;
        }
      } else {
        char b = 0;
        if (::read(t.fd, &b, 1) == 1 && b == 'k') answered[t.rank] = true;
      }
      ::close(t.fd);
      t.fd = -1;
    }
  }
  for (auto& t : tries)
    if (t.fd >= 0) ::close(t.fd);
  std::vector<std::string> silent;
  for (size_t r = 0; r < endpoints.size(); ++r) {
    if (static_cast<int>(r) == self || answered[r]) continue;
    silent.push_back("rank " + std::to_string(r) + " on host " + (valid[r] ? eps[r].host : "?"));
  }
  return silent;
}

}  // namespace dpo
