// Streams and events of the host backend: a stream is a worker thread running tasks in order,
// an event is a marker completed by a task. A failed task of an operation records the failure
// in the operation's status (its outputs and event report it); a failed task of the stream's
// own (a wait that timed out) is reported by the stream's next synchronize, once.
#pragma once

#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>

#include "../abi/objects.h"

namespace sy::host {

struct StreamState;
using Task = std::function<Error(StreamState&)>;

struct QueuedTask {
  Task run;
  std::shared_ptr<OpStatus> status;  // the operation it belongs to, if any
};

struct StreamState {
  int rank = 0;
  int64_t timeout_ms = 0;
  std::mutex mu;
  std::condition_variable work_cv;
  std::condition_variable idle_cv;
  std::deque<QueuedTask> queue;
  uint64_t submitted = 0;
  uint64_t completed = 0;
  Error pending;
  bool closing = false;
};

// Completion of one recorded point of a stream.
struct Marker {
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  bool cancelled = false;  // the waiter gave up; a task must not touch the waiter's memory
  int64_t done_ns = 0;     // steady clock at completion (event timing)
  Error error;
  void complete(Error e);
  // False on timeout.
  bool wait(Deadline deadline, Error* out);
};

class HostStream final : public Stream {
 public:
  HostStream(std::shared_ptr<GroupCore> g, int rank, int64_t timeout_ms);
  ~HostStream() override;
  void enqueue(Task task, std::shared_ptr<OpStatus> status = nullptr);
  Error wait_event(Event& event) override;
  Error synchronize(Deadline deadline) override;
  // Runs `fn` on the worker in stream order and waits for it. `fn` sees the stream's pending
  // error first: a pending failure is reported (and cleared) instead of running `fn`.
  Error run_and_wait(std::function<Error()> fn, Deadline deadline);
  std::shared_ptr<StreamState> state() const { return st_; }

 private:
  std::shared_ptr<StreamState> st_;
};

class HostEvent final : public Event {
 public:
  using Event::Event;
  Error record(Stream& stream, std::shared_ptr<OpStatus> status = nullptr) override;
  Error query() override;
  Error synchronize(Deadline deadline) override;
  Error elapsed_ms(Event& end, double* ms) override;
  std::shared_ptr<Marker> marker() {
    std::lock_guard<std::mutex> l(mu_);
    return marker_;
  }

 private:
  std::mutex mu_;
  std::shared_ptr<Marker> marker_;  // null until recorded: waiting on it is a no-op (as in CUDA)
};

}  // namespace sy::host
