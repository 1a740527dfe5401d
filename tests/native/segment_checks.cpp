// A peer's shared-memory segment is mapped only if it is a plain file of this user with mode
// 0600 (csrc/host/shared_memory.cpp, open_segment): one that another local user made, or that
// was opened up, could be written by someone outside the job. Segments are planted here with
// the prefix, the size and the mode an attacker would choose. Prints one line per case; exits
// non-zero on a failure.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <string>

#include "../../csrc/host/shared_memory.h"

namespace {

int failures = 0;

void check(bool ok, const std::string& what) {
  std::printf("%s: %s\n", ok ? "ok" : "FAILED", what.c_str());
  if (!ok) failures += 1;
}

// A segment named like a Switchyard one, `bytes` long, with `mode` (and owner `uid` when root).
std::string plant(const char* tag, mode_t mode, uid_t uid) {
  const std::string name = "/switchyard-" + std::to_string(getpid()) + "-planted-" + tag;
  shm_unlink(name.c_str());
  const int fd = shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  if (fd < 0 || ftruncate(fd, 1 << 16) != 0 || fchmod(fd, mode) != 0) std::perror("plant");
  if (uid != geteuid() && fchown(fd, uid, uid) != 0) std::perror("fchown");
  close(fd);
  return name;
}

}  // namespace

int main() {
  std::shared_ptr<sy::Memory> m;
  {
    const std::string name = plant("open", 0666, geteuid());
    const sy::Error e = sy::host::open_segment(name, 4096, &m);
    check(e.status == SY_ERROR_INVALID_ARGUMENT && e.message.find("mode 0666") != std::string::npos,
          "a segment anyone may write is refused: " + e.message);
    shm_unlink(name.c_str());
  }
  {
    const std::string name = plant("readable", 0640, geteuid());
    const sy::Error e = sy::host::open_segment(name, 4096, &m);
    check(e.status == SY_ERROR_INVALID_ARGUMENT, "a segment the group may read is refused: " + e.message);
    shm_unlink(name.c_str());
  }
  if (geteuid() == 0) {  // only root can give a segment to another user
    const std::string name = plant("foreign", 0600, 65534);
    const sy::Error e = sy::host::open_segment(name, 4096, &m);
    check(e.status == SY_ERROR_INVALID_ARGUMENT && e.message.find("uid 65534") != std::string::npos,
          "another user's segment is refused: " + e.message);
    shm_unlink(name.c_str());
  } else {
    std::printf("skipped: another user's segment (needs root to plant)\n");
  }
  {
    const std::string name = plant("fine", 0600, geteuid());
    const sy::Error e = sy::host::open_segment(name, 4096, &m);
    check(e.ok() && m && m->ptr != nullptr, "this user's 0600 segment is mapped: " + e.message);
    m.reset();
    shm_unlink(name.c_str());
  }
  {
    std::shared_ptr<sy::Memory> mine;
    const sy::Error e = sy::host::create_segment(4096, &mine);
    const std::string name = e.ok() ? mine->share_name : "";
    const size_t tail = name.rfind('-');
    check(e.ok() && tail != std::string::npos && name.size() - tail - 1 >= 32,
          "a new segment's name ends in 128 random bits: " + name);
    if (e.ok()) (void)sy::host::unlink_segment(*mine);
  }
  std::printf("segment_checks: %s\n", failures == 0 ? "every case passed" : "FAILED");
  return failures == 0 ? 0 : 1;
}
