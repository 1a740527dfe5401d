#include "host_stream.h"

#include <chrono>
#include <thread>

namespace sy::host {

void Marker::complete(Error e) {
  const int64_t now =
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count();
  std::lock_guard<std::mutex> l(mu);
  done_ns = now;
  done = true;
  error = std::move(e);
  cv.notify_all();
}

bool Marker::wait(Deadline deadline, Error* out) {
  std::unique_lock<std::mutex> l(mu);
  while (!done) {
    double left = deadline.remaining_seconds();
    if (left <= 0) return false;
    cv.wait_for(l, std::chrono::duration<double>(left));
  }
  *out = error;
  return true;
}

namespace {

void worker_loop(std::shared_ptr<StreamState> st) {
  for (;;) {
    QueuedTask task;
    {
      std::unique_lock<std::mutex> l(st->mu);
      st->work_cv.wait(l, [&] { return !st->queue.empty() || st->closing; });
      if (st->queue.empty()) return;  // closing and drained
      task = std::move(st->queue.front());
      st->queue.pop_front();
    }
    Error e = task.run(*st);
    if (e && task.status) task.status->fail(e);
    std::lock_guard<std::mutex> l(st->mu);
    if (e && !task.status && st->pending.ok()) st->pending = e;
    st->completed += 1;
    st->idle_cv.notify_all();
  }
}

Error stream_timeout(int rank, double waited, const char* what) {
  core::WaitFailure w;
  w.rank = rank;
  w.role = core::WaitRole::Stream;
  w.waited_seconds = waited;
  return timeout_error(w, what);
}

}  // namespace

HostStream::HostStream(std::shared_ptr<GroupCore> g, int rank, int64_t timeout_ms)
    : Stream(std::move(g), rank), st_(std::make_shared<StreamState>()) {
  st_->rank = rank;
  st_->timeout_ms = timeout_ms;
  // Detached: the worker owns its state and ends once the queue is drained after close. Joining
  // here could block the caller for as long as a queued wait's deadline.
  std::thread(worker_loop, st_).detach();
}

HostStream::~HostStream() {
  std::lock_guard<std::mutex> l(st_->mu);
  st_->closing = true;
  st_->work_cv.notify_all();
}

void HostStream::enqueue(Task task, std::shared_ptr<OpStatus> status) {
  std::lock_guard<std::mutex> l(st_->mu);
  st_->queue.push_back(QueuedTask{std::move(task), std::move(status)});
  st_->submitted += 1;
  st_->work_cv.notify_one();
}

Error HostStream::wait_event(Event& event) {
  auto* he = dynamic_cast<HostEvent*>(&event);
  if (he == nullptr) return fail(SY_ERROR_WRONG_HANDLE, "event: not a host-backend event", "event");
  std::shared_ptr<Marker> m = he->marker();
  if (!m) return ok();
  int64_t timeout_ms = outer_timeout_ms(st_->timeout_ms);
  int rank = st_->rank;
  enqueue([m, timeout_ms, rank](StreamState&) -> Error {
    Deadline d = Deadline::after_ms(timeout_ms);
    Error e;
    if (!m->wait(d, &e)) {
      core::WaitFailure w;
      w.rank = rank;
      w.role = core::WaitRole::Event;
      w.waited_seconds = double(timeout_ms) / 1000.0;
      return timeout_error(w, "a stream waited for an event that never completed");
    }
    return ok();  // the event's operation reports its own failure; this stream goes on
  });
  return ok();
}

Error HostStream::synchronize(Deadline deadline) {
  std::unique_lock<std::mutex> l(st_->mu);
  uint64_t target = st_->submitted;
  double start = now_seconds();
  while (st_->completed < target) {
    double left = deadline.remaining_seconds();
    if (left <= 0) return stream_timeout(rank, now_seconds() - start, "stream synchronize");
    st_->idle_cv.wait_for(l, std::chrono::duration<double>(left));
  }
  Error e = st_->pending;
  st_->pending = ok();
  return e;
}

Error HostStream::run_and_wait(std::function<Error()> fn, Deadline deadline) {
  auto m = std::make_shared<Marker>();
  enqueue([m, fn = std::move(fn)](StreamState& s) -> Error {
    Error pending;
    {
      std::lock_guard<std::mutex> l(s.mu);
      pending = s.pending;
      s.pending = ok();
    }
    std::lock_guard<std::mutex> l(m->mu);
    if (m->cancelled) return pending;  // nobody is waiting: leave the failure on the stream
    Error e = pending ? pending : fn();
    m->done = true;
    m->error = e;
    m->cv.notify_all();
    return ok();  // reported to the waiter, not left on the stream
  });
  double start = now_seconds();
  Error e;
  if (!m->wait(deadline, &e)) {
    // Once this returns, the caller's memory may be gone: a copy still queued must not run.
    std::lock_guard<std::mutex> l(m->mu);
    if (!m->done) {
      m->cancelled = true;
      return stream_timeout(rank, now_seconds() - start, "a copy");
    }
    return m->error;
  }
  return e;
}

Error HostEvent::record(Stream& stream, std::shared_ptr<OpStatus> status) {
  auto* hs = dynamic_cast<HostStream*>(&stream);
  if (hs == nullptr) return fail(SY_ERROR_WRONG_HANDLE, "stream: not a host-backend stream", "stream");
  auto m = std::make_shared<Marker>();
  {
    std::lock_guard<std::mutex> l(mu_);
    marker_ = m;
  }
  hs->enqueue([m, status](StreamState&) -> Error {
    m->complete(status ? status->result() : ok());
    return ok();
  });
  return ok();
}

Error HostEvent::query() {
  std::shared_ptr<Marker> m = marker();
  if (!m) return ok();
  std::lock_guard<std::mutex> l(m->mu);
  if (!m->done) return fail(SY_NOT_READY, "event: not complete yet");
  return m->error;
}

Error HostEvent::synchronize(Deadline deadline) {
  std::shared_ptr<Marker> m = marker();
  if (!m) return ok();
  double start = now_seconds();
  Error e;
  if (!m->wait(deadline, &e)) {
    core::WaitFailure w;
    w.rank = rank;
    w.role = core::WaitRole::Event;
    w.waited_seconds = now_seconds() - start;
    return timeout_error(w, "event synchronize");
  }
  return e;
}

Error HostEvent::elapsed_ms(Event& end, double* ms) {
  auto* other = dynamic_cast<HostEvent*>(&end);
  if (other == nullptr) return fail(SY_ERROR_WRONG_HANDLE, "end: not a host-backend event", "end");
  const std::shared_ptr<Marker> a = marker(), b = other->marker();
  if (!a || !b) return invalid(a ? "end" : "start", std::string(a ? "end" : "start") + ": never recorded");
  int64_t from = 0, to = 0;
  for (auto [m, at] : {std::pair{a.get(), &from}, std::pair{b.get(), &to}}) {
    std::lock_guard<std::mutex> l(m->mu);
    if (!m->done) return fail(SY_NOT_READY, "event: not complete yet");
    *at = m->done_ns;
  }
  *ms = double(to - from) * 1e-6;
  return ok();
}

}  // namespace sy::host
