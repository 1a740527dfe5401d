#include "shared_memory.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <random>

namespace sy::host {

namespace {

constexpr const char* kPrefix = "switchyard-";

std::string errno_text() { return std::strerror(errno); }

// Removes segments left by processes of this machine that no longer exist.
void remove_stale_segments() {
  DIR* dir = opendir("/dev/shm");
  if (dir == nullptr) return;
  while (dirent* e = readdir(dir)) {
    const char* n = e->d_name;
    if (std::strncmp(n, kPrefix, std::strlen(kPrefix)) != 0) continue;
    long pid = std::strtol(n + std::strlen(kPrefix), nullptr, 10);
    if (pid <= 0 || pid == long(getpid())) continue;
    if (kill(pid_t(pid), 0) == 0 || errno != ESRCH) continue;  // alive (or not ours to judge)
    std::string path = "/";
    path += n;
    shm_unlink(path.c_str());
  }
  closedir(dir);
}

Error map_segment(int fd, const std::string& name, uint64_t bytes, std::shared_ptr<Memory>* out) {
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (p == MAP_FAILED) {
    return fail(SY_ERROR_OUT_OF_MEMORY, "mapping shared segment " + name + " (" + std::to_string(bytes) +
                                            " bytes) failed: " + errno_text());
  }
  auto m = std::make_shared<Memory>();
  m->ptr = p;
  m->bytes = bytes;
  m->device = -1;
  m->share_name = name;
  m->release = [bytes](void* q) { munmap(q, bytes); };
  *out = std::move(m);
  return ok();
}

}  // namespace

Error create_segment(uint64_t bytes, std::shared_ptr<Memory>* out) {
  static std::once_flag cleaned;
  std::call_once(cleaned, remove_stale_segments);
  static std::atomic<uint32_t> counter{0};
  std::random_device rd;
  std::string name = "/";
  name += kPrefix;
  name += std::to_string(getpid());
  name += "-";
  name += std::to_string(counter++);
  name += "-";
  // 128 random bits: the name is published only to authenticated peers, so nobody else can
  // guess it to open the segment, or squat on it before it exists.
  static const char* hex = "0123456789abcdef";
  for (int i = 0; i < 4; ++i) {
    const uint32_t word = rd();
    for (int b = 28; b >= 0; b -= 4) name += hex[(word >> b) & 15u];
  }
  const uint64_t size = core::align_up(bytes, 4096);
  int fd = shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  if (fd < 0) return fail(SY_ERROR_OUT_OF_MEMORY, "creating shared segment " + name + " failed: " + errno_text());
  if (ftruncate(fd, off_t(size)) != 0) {
    Error e = fail(SY_ERROR_OUT_OF_MEMORY, "sizing shared segment " + name + " to " + std::to_string(size) +
                                               " bytes failed: " + errno_text() +
                                               " (is /dev/shm large enough? see switchyard doctor)");
    close(fd);
    shm_unlink(name.c_str());
    return e;
  }
  Error e = map_segment(fd, name, size, out);
  if (e) {
    shm_unlink(name.c_str());
    return e;
  }
  // Unlink on release too, in case the buffer goes before it was sealed.
  std::string owned = name;
  (*out)->release = [size, owned](void* q) {
    munmap(q, size);
    shm_unlink(owned.c_str());  // ENOENT after sealing: fine
  };
  return ok();
}

Error open_segment(const std::string& name, uint64_t bytes, std::shared_ptr<Memory>* out) {
  std::string prefix = "/";
  prefix += kPrefix;
  if (name.rfind(prefix, 0) != 0 || name.find('/', 1) != std::string::npos) {
    return invalid("share", "share: '" + name + "' is not a Switchyard segment name");
  }
  int fd = shm_open(name.c_str(), O_RDWR, 0);
  if (fd < 0) return fail(SY_ERROR_INVALID_ARGUMENT, "opening shared segment " + name + " failed: " + errno_text(), "share");
  struct stat st;
  if (fstat(fd, &st) != 0) {
    close(fd);
    return fail(SY_ERROR_INVALID_ARGUMENT, "share: inspecting segment " + name + " failed: " + errno_text(), "share");
  }
  // Only a segment of our own user that nobody else can open: anything else was made (or
  // opened up) by someone who could write into this rank's buffer.
  if (st.st_uid != geteuid() || (st.st_mode & 0777) != 0600 || !S_ISREG(st.st_mode)) {
    close(fd);
    char mode[8];
    std::snprintf(mode, sizeof mode, "%04o", unsigned(st.st_mode & 07777));
    return invalid("share", "share: segment " + name + " belongs to uid " + std::to_string(st.st_uid) + " with mode " +
                                mode + "; a peer's buffer must belong to this user (uid " +
                                std::to_string(geteuid()) + ") with mode 0600");
  }
  if (uint64_t(st.st_size) < bytes) {
    close(fd);
    return invalid("share", "share: segment " + name + " holds " + std::to_string(uint64_t(st.st_size)) +
                                " bytes, the plan needs " + std::to_string(bytes));
  }
  return map_segment(fd, name, core::align_up(bytes, 4096), out);
}

Error unlink_segment(Memory& memory) {
  if (!memory.share_name.empty() && shm_unlink(memory.share_name.c_str()) != 0 && errno != ENOENT) {
    return fail(SY_ERROR_INTERNAL, "removing shared segment " + memory.share_name + " failed: " + errno_text());
  }
  return ok();
}

}  // namespace sy::host
