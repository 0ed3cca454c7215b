// Shared inner loops of the compiled CPU kernels (decode_model.cpp, prefill_kernels.cpp): AVX2 loads of fp32 and
// bf16, a vectorised exp, horizontal max and sum, dot products, axpy, one exp pass over a row, and the row-major
// GEMV (each weight row read once for several inputs, split over torch's threads when large). Every function has
// a scalar path for the tails and for CPUs without AVX2 + FMA (the build is -march=native).
#pragma once

#include <torch/extension.h>

#include <pybind11/stl.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define GLM_AVX2 1
#endif

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace glm_cpu {

using at::Tensor;

// Seconds spent per named part of a call, where profiling is on (DecodeModel.set_profiling): which parts of a
// decode step take the time, and which of them gain from more threads. Off, a part costs one branch.
struct Profile {
  bool on = false;
  std::map<std::string, double> seconds;
};

class Timed {  // adds the wall time of its scope to profile->seconds[name]
 public:
  Timed(Profile* profile, const char* name) : profile_(profile != nullptr && profile->on ? profile : nullptr),
                                              name_(name) {
    if (profile_ != nullptr) start_ = std::chrono::steady_clock::now();
  }
  ~Timed() {
    if (profile_ != nullptr)
      profile_->seconds[name_] += std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  }
  Timed(const Timed&) = delete;
  Timed& operator=(const Timed&) = delete;

 private:
  Profile* profile_;
  const char* name_;
  std::chrono::steady_clock::time_point start_;
};


// ---- Threads -------------------------------------------------------------------------------------------------
// One persistent pool of worker threads for every kernel here, with work claimed dynamically, chunk by chunk.
//
// Why not at::parallel_for: with torch's OpenMP backend it splits a range into one static slice per thread and
// ends in a barrier that waits for every thread of the team. A decode step runs a dozen such regions per layer;
// when a thread is late (the machine runs other processes, or the OS moves it), its whole slice waits for it, and
// a region that a late thread never needed still waits at the barrier for it to arrive: measured on a shared
// 2-core box, a 150K-element dtype cast that takes 0.1 ms on one thread took 4-11 ms on two. Here a job is many
// small chunks; each thread, the caller included, claims the next unclaimed chunk until none is left, and the
// caller waits only for chunks that were claimed, never for a thread that did not start: a late worker finds the
// job done and goes back to waiting. Nothing starts per job: workers spin briefly for the next job (a step's jobs
// come microseconds apart) and then sleep on a condition variable.
//
// Every chunk is computed by the same code whichever thread claims it, and no sum is split across threads, so a
// result is bitwise the same at any thread count.
//
// The number of threads is torch's (torch.set_num_threads; at::get_num_threads), read at each job. A job started
// from inside a job (or while another thread's job runs) runs inline on its caller's thread. After fork() the
// child has no workers: its jobs run on the caller alone until a fresh pool is made for it.
class ThreadPool {
 public:
  static ThreadPool& instance() {
    static std::atomic<ThreadPool*> pool{nullptr};
    static std::mutex made;
    ThreadPool* p = pool.load(std::memory_order_acquire);
    if (p == nullptr || p->pid_ != ::getpid()) {
      std::lock_guard<std::mutex> lock(made);
      p = pool.load(std::memory_order_acquire);
      // Never deleted: detached workers may still be waiting on it at exit (a fork's child leaks its parent's).
      if (p == nullptr || p->pid_ != ::getpid()) pool.store(p = new ThreadPool(), std::memory_order_release);
    }
    return *p;
  }

  // fn(chunk, thread) for every chunk in [0, chunks), over up to `threads` threads (thread 0 is the caller; a
  // thread index is below `threads`, for per-thread scratch). Returns when every chunk is done.
  void run(int64_t chunks, int threads, const std::function<void(int64_t, int)>& fn) {
    if (chunks <= 0) return;
    threads = static_cast<int>(std::min<int64_t>(std::max(threads, 1), std::min<int64_t>(chunks, kMaxThreads)));
    std::unique_lock<std::mutex> exclusive(run_mutex_, std::try_to_lock);
    if (threads == 1 || in_job() || !exclusive.owns_lock() || chunks >= kMaxChunks) {
      for (int64_t c = 0; c < chunks; ++c) fn(c, 0);
      return;
    }
    grow(threads - 1);
    fn_ = &fn;
    error_ = nullptr;
    wanted_.store(threads - 1, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    generation_ = (generation_ + 1) & kGenerationMask;
    state_.store(pack(generation_, chunks, 0), std::memory_order_seq_cst);  // publishes fn_, wanted_, done_
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      { std::lock_guard<std::mutex> lock(sleep_mutex_); }
      wake_.notify_all();
    }
    in_job() = true;
    work(generation_, 0);
    in_job() = false;
    // Wait for chunks that workers claimed and still compute: spin, then give the core away while waiting.
    for (int spins = 0; done_.load(std::memory_order_acquire) < chunks; ++spins) {
      if (spins < 4096) {
        pause();
      } else {
        std::this_thread::yield();
      }
    }
    if (error_) std::rethrow_exception(error_);  // a chunk's exception, on the caller's thread
  }

 private:
  // state_: generation (16 bits) | chunks (24 bits) | next unclaimed chunk (24 bits). One word, so that a claim
  // (a compare-and-swap) can only succeed for the job it read: a late worker cannot take a chunk of the next job
  // with the previous one's function.
  static constexpr int64_t kMaxChunks = int64_t{1} << 24;
  static constexpr uint64_t kGenerationMask = 0xffff;
  static constexpr int kMaxThreads = 256;
  static uint64_t pack(uint64_t generation, uint64_t chunks, uint64_t next) {
    return (generation << 48) | (chunks << 24) | next;
  }

  static void pause() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  }

  static bool& in_job() {
    static thread_local bool flag = false;
    return flag;
  }

  // Claims and runs chunks of job `generation` until none is left (or another job has replaced it).
  void work(uint64_t generation, int thread) {
    uint64_t state = state_.load(std::memory_order_acquire);
    for (;;) {
      const uint64_t chunks = (state >> 24) & 0xffffff, next = state & 0xffffff;
      if ((state >> 48) != generation || next >= chunks) return;
      if (!state_.compare_exchange_weak(state, state + 1, std::memory_order_acq_rel, std::memory_order_acquire))
        continue;  // `state` now holds the current value: try again
      try {
        (*fn_)(static_cast<int64_t>(next), thread);
      } catch (...) {  // kept for the caller (an exception must not leave a worker thread)
        std::lock_guard<std::mutex> lock(error_mutex_);
        if (!error_) error_ = std::current_exception();
      }
      done_.fetch_add(1, std::memory_order_acq_rel);
      state = state_.load(std::memory_order_acquire);
    }
  }

  void worker(int index) {
    in_job() = true;  // a job started from a chunk runs inline
    uint64_t seen = state_.load(std::memory_order_acquire) >> 48;
    for (;;) {
      // Spin a little for the next job, then sleep until one comes.
      uint64_t generation = state_.load(std::memory_order_acquire) >> 48;
      const auto start = std::chrono::steady_clock::now();
      for (int spins = 0; generation == seen; ++spins) {
        pause();
        if ((spins & 255) == 255 && std::chrono::steady_clock::now() - start > kSpin) {
          std::unique_lock<std::mutex> lock(sleep_mutex_);
          sleepers_.fetch_add(1, std::memory_order_seq_cst);
          wake_.wait(lock, [&] { return (state_.load(std::memory_order_seq_cst) >> 48) != seen; });
          sleepers_.fetch_sub(1, std::memory_order_relaxed);
        }
        generation = state_.load(std::memory_order_acquire) >> 48;
      }
      seen = generation;
      if (index < wanted_.load(std::memory_order_relaxed)) work(generation, index + 1);
    }
  }

  void grow(int workers) {
    while (static_cast<int>(workers_) < workers) {
      std::thread([this, index = static_cast<int>(workers_)] { worker(index); }).detach();
      ++workers_;
    }
  }

  ThreadPool() : pid_(::getpid()) {}

  static constexpr std::chrono::microseconds kSpin{100};
  const pid_t pid_;
  std::mutex run_mutex_;  // one job at a time
  std::atomic<uint64_t> state_{0};
  uint64_t generation_ = 0;  // the current job's (written by the caller under run_mutex_)
  const std::function<void(int64_t, int)>* fn_ = nullptr;
  std::atomic<int> wanted_{0};  // workers this job may use (worker i takes part if i < wanted_)
  std::atomic<int64_t> done_{0};
  std::mutex error_mutex_;
  std::exception_ptr error_;  // the job's first exception
  std::atomic<int> sleepers_{0};
  std::mutex sleep_mutex_;
  std::condition_variable wake_;
  size_t workers_ = 0;
};

// The number of threads kernels use: torch's (torch.set_num_threads).
inline int num_threads() { return std::max(1, at::get_num_threads()); }

// fn(chunk, thread) for chunk in [0, chunks) over torch's number of threads (see ThreadPool).
inline void parallel_chunks(int64_t chunks, const std::function<void(int64_t, int)>& fn) {
  ThreadPool::instance().run(chunks, num_threads(), fn);
}

// fn(begin, end) over [0, n) in chunks of `grain` (the last one shorter), over torch's number of threads.
inline void parallel_range(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  grain = std::max<int64_t>(grain, 1);
  const int64_t chunks = (n + grain - 1) / grain;
  if (chunks <= 1) {
    if (n > 0) fn(0, n);
    return;
  }
  parallel_chunks(chunks, [&](int64_t c, int) { fn(c * grain, std::min(n, (c + 1) * grain)); });
}

inline float silu(float x) { return x / (1.0f + std::exp(-x)); }

template <typename T>
inline T cast(float x) { return static_cast<T>(x); }  // one rounding to the model dtype, where torch rounds

#ifdef GLM_AVX2
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {  // bfloat16 is the top half of a float: widen and shift
  const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}
// e^x for x <= 0 (softmax after subtracting the row max): 2^n * e^r with n = round(x / ln 2), r in
// [-ln2/2, ln2/2], e^r by its Taylor polynomial to degree 7 (relative error < 2e-7, an ulp or two).
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));  // below this e^x is < 2^-125: keep 2^n a normal float
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln 2 in two parts (Cody-Waite)
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
  for (const float c : {1.0f / 720.0f, 1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f, 1.0f})
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  const __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(exponent));
}

inline float max8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

inline float sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// sum_d q[d] k[d] with k in the model dtype (a key of the cache), fp32 accumulation.
template <typename T>
inline float dot(const float* q, const T* k, int64_t n) {
  int64_t d = 0;
  float s = 0.0f;
#ifdef GLM_AVX2
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>) {
    __m256 acc = _mm256_setzero_ps();
    for (; d + 8 <= n; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8(k + d), acc);
    s = sum8(acc);
  }
#endif
  for (; d < n; ++d) s += q[d] * static_cast<float>(k[d]);
  return s;
}

// out[d] += w * v[d] with v in the model dtype (a value of the cache).
template <typename T>
inline void axpy(float w, const T* v, float* out, int64_t n) {
  int64_t d = 0;
#ifdef GLM_AVX2
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>) {
    const __m256 w8 = _mm256_set1_ps(w);
    for (; d + 8 <= n; d += 8) _mm256_storeu_ps(out + d, _mm256_fmadd_ps(w8, load8(v + d), _mm256_loadu_ps(out + d)));
  }
#endif
  for (; d < n; ++d) out[d] += w * static_cast<float>(v[d]);
}

// x[i] <- e^(x[i] - shift) for i < n; returns their sum (the softmax's denominator).
inline float exp_shifted(float* x, int64_t n, float shift) {
  int64_t i = 0;
  float total = 0.0f;
#ifdef GLM_AVX2
  const __m256 shift8 = _mm256_set1_ps(shift);
  __m256 total8 = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), shift8));
    _mm256_storeu_ps(x + i, e);
    total8 = _mm256_add_ps(total8, e);
  }
  total = sum8(total8);
#endif
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] - shift);
    total += x[i];
  }
  return total;
}

// y[b, n] = sum_k w[n, k] x[b, k] for output rows n in [first, last), `rows` inputs, and a matrix whose rows are
// contiguous (the checkpoints' [out, in] layout). Each group of four weight rows is read from memory once and used
// for every input row while it sits in L1; fp32 accumulation.
template <typename T>
void gemv_rows_range(const T* w, int64_t row_stride, const float* x, int64_t rows, int64_t n_in, int64_t n_out,
                     float* y, int64_t first, int64_t last) {
  int64_t r = first;
#ifdef GLM_AVX2
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>) {
    for (; r + 4 <= last; r += 4) {
      const T* w0 = w + r * row_stride;
      const T* w1 = w0 + row_stride;
      const T* w2 = w1 + row_stride;
      const T* w3 = w2 + row_stride;
      for (int64_t b = 0; b < rows; ++b) {
        const float* xb = x + b * n_in;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        int64_t k = 0;
        for (; k + 8 <= n_in; k += 8) {
          const __m256 xv = _mm256_loadu_ps(xb + k);
          a0 = _mm256_fmadd_ps(load8(w0 + k), xv, a0);
          a1 = _mm256_fmadd_ps(load8(w1 + k), xv, a1);
          a2 = _mm256_fmadd_ps(load8(w2 + k), xv, a2);
          a3 = _mm256_fmadd_ps(load8(w3 + k), xv, a3);
        }
        float s0 = sum8(a0), s1 = sum8(a1), s2 = sum8(a2), s3 = sum8(a3);
        for (; k < n_in; ++k) {
          s0 += static_cast<float>(w0[k]) * xb[k];
          s1 += static_cast<float>(w1[k]) * xb[k];
          s2 += static_cast<float>(w2[k]) * xb[k];
          s3 += static_cast<float>(w3[k]) * xb[k];
        }
        float* yb = y + b * n_out;
        yb[r] = s0;
        yb[r + 1] = s1;
        yb[r + 2] = s2;
        yb[r + 3] = s3;
      }
    }
  }
#endif
  for (; r < last; ++r) {
    const T* row = w + r * row_stride;
    for (int64_t b = 0; b < rows; ++b) {
      const float* xb = x + b * n_in;
      float s = 0.0f;
      for (int64_t k = 0; k < n_in; ++k) s += static_cast<float>(row[k]) * xb[k];
      y[b * n_out + r] = s;
    }
  }
}

// Bytes of weights per chunk of a decode-size job: small enough that two threads share a matrix evenly and a late
// thread holds up little (at ~10 GB/s a chunk is ~13 us), large enough that claiming one (an atomic
// compare-and-swap) costs nothing next to it.
constexpr int64_t kChunkBytes = int64_t{1} << 17;

// All output rows. MKL's gemv reads this layout 3x slower than the column-major one at decode sizes (measured: 1.2
// vs 0.35 ms for an 8192x256 fp32 matrix). Decode is memory-bound, and one core cannot draw a big model's weights
// from memory fast enough: chunks of rows (groups of four) are shared out over the threads (ThreadPool); a matrix
// of one chunk runs inline.
template <typename T>
void gemv_rows(const T* w, int64_t row_stride, const float* x, int64_t rows, int64_t n_in, int64_t n_out,
               float* y) {
  const int64_t groups = (n_out + 3) / 4;
  const int64_t grain = std::max<int64_t>(1, kChunkBytes / std::max<int64_t>(4 * n_in * sizeof(T), 1));
  parallel_range(groups, grain, [&](int64_t begin, int64_t end) {
    gemv_rows_range<T>(w, row_stride, x, rows, n_in, n_out, y, begin * 4, std::min(end * 4, n_out));
  });
}

}  // namespace glm_cpu
