// Fused CPU kernels of the finetuner loss (see emcore/finetune/loss_fused.py for the spec and the
// Python side). Plain C++17 + OpenMP, no torch headers: built with g++ in a second or two and
// called through ctypes with raw pointers to contiguous tensors.
//
// Layouts (all C-contiguous): src, tgt (N, C, H, W); field, grad (N, 2, H, W) px, channel 0 = x;
// src_flags, tgt_flags (N, H, W) uint8 (bit 1 = has data, bit 2 = defect); weight (N, H, W).
// Per-row partial sums are written to double arrays of length N*H (summed on the Python side),
// so the result does not depend on the number of threads.
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr uint8_t kHasData = 1;
constexpr uint8_t kDefect = 2;

// One pass per output row (loop fission inside the row so that every x loop vectorizes):
//   1. per pixel: the four bilinear taps of p + field(p) (clamped offsets + in-image masks, zeros
//      outside), the warped source masks, valid(p) and w(p);
//   2. per channel: the bilinear sample, the residual against tgt, and its x/y derivatives,
//      accumulated into row buffers;
//   3. d(sum of squares)/d field = 2 r d(sample)/d(x, y), and the row's partial sums.
// Invalid pixels get zero tap masks and zero fractions, so no NaN/garbage reaches the sums.
template <typename T>
void warp_mse(const T* src, const T* tgt, const T* field, const uint8_t* src_flags,
              const uint8_t* tgt_flags, int64_t N, int64_t C, int64_t H, int64_t W,
              int need_grad, int num_threads, T* grad, T* weight, double* row_sse,
              double* row_count) {
  const int64_t HW = H * W;
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<int32_t> off_buf(4 * W);
    std::vector<T> mask_buf(4 * W), frac_buf(2 * W), valid_buf(W), acc_buf(3 * W);
#pragma omp for schedule(dynamic, 4)
    for (int64_t row = 0; row < N * H; ++row) {
      const int64_t n = row / H, y = row % H;
      const T* __restrict__ fx = field + n * 2 * HW + y * W;
      const T* __restrict__ fy = fx + HW;
      const uint8_t* __restrict__ sf = src_flags + n * HW;
      const uint8_t* __restrict__ tf = tgt_flags + n * HW + y * W;
      T* __restrict__ w_out = weight + n * HW + y * W;
      int32_t* __restrict__ o00 = off_buf.data();
      int32_t* __restrict__ o01 = o00 + W;
      int32_t* __restrict__ o10 = o01 + W;
      int32_t* __restrict__ o11 = o10 + W;
      T* __restrict__ m00 = mask_buf.data();
      T* __restrict__ m01 = m00 + W;
      T* __restrict__ m10 = m01 + W;
      T* __restrict__ m11 = m10 + W;
      T* __restrict__ fracx = frac_buf.data();
      T* __restrict__ fracy = fracx + W;
      T* __restrict__ valid = valid_buf.data();
      T* __restrict__ sse = acc_buf.data();
      T* __restrict__ dx = sse + W;
      T* __restrict__ dy = dx + W;

      double count = 0.0;
#pragma omp simd reduction(+ : count)
      for (int64_t x = 0; x < W; ++x) {
        const T sx = static_cast<T>(x) + fx[x];
        const T sy = static_cast<T>(y) + fy[x];
        // fmax/fmin map NaN to the bound: far outside or NaN -> both taps outside.
        const T x0f = std::fmin(std::fmax(std::floor(sx), T(-2)), static_cast<T>(W));
        const T y0f = std::fmin(std::fmax(std::floor(sy), T(-2)), static_cast<T>(H));
        const T ax = sx - x0f, ay = sy - y0f;  // weights of the x0+1 / y0+1 taps
        const int32_t x0 = static_cast<int32_t>(x0f), y0 = static_cast<int32_t>(y0f);
        const bool in_x0 = x0 >= 0 && x0 < W, in_x1 = x0 + 1 >= 0 && x0 + 1 < W;
        const bool in_y0 = y0 >= 0 && y0 < H, in_y1 = y0 + 1 >= 0 && y0 + 1 < H;
        const int32_t cx0 = in_x0 ? x0 : 0, cx1 = in_x1 ? x0 + 1 : 0;
        const int32_t cy0 = in_y0 ? y0 : 0, cy1 = in_y1 ? y0 + 1 : 0;
        const int32_t a00 = cy0 * W + cx0, a01 = cy0 * W + cx1, a10 = cy1 * W + cx0, a11 = cy1 * W + cx1;
        const bool b00 = in_y0 && in_x0, b01 = in_y0 && in_x1, b10 = in_y1 && in_x0, b11 = in_y1 && in_x1;
        const T w00 = (1 - ax) * (1 - ay), w01 = ax * (1 - ay), w10 = (1 - ax) * ay, w11 = ax * ay;
        const int f00 = b00 ? sf[a00] : 0, f01 = b01 ? sf[a01] : 0;
        const int f10 = b10 ? sf[a10] : 0, f11 = b11 ? sf[a11] : 0;
        const T data = ((f00 & kHasData) ? w00 : T(0)) + ((f01 & kHasData) ? w01 : T(0)) +
                       ((f10 & kHasData) ? w10 : T(0)) + ((f11 & kHasData) ? w11 : T(0));
        const bool src_defect = ((f00 & kDefect) && w00 > 0) || ((f01 & kDefect) && w01 > 0) ||
                                ((f10 & kDefect) && w10 > 0) || ((f11 & kDefect) && w11 > 0);
        const int t = tf[x];
        const bool tgt_data = t & kHasData;
        const bool defect = (t & kDefect) || src_defect;
        w_out[x] = defect ? T(0) : (tgt_data ? T(1) : T(0.001));
        const bool ok = tgt_data && !defect && data >= T(0.999);
        count += ok ? 1.0 : 0.0;
        valid[x] = ok ? T(1) : T(0);
        o00[x] = a00;
        o01[x] = a01;
        o10[x] = a10;
        o11[x] = a11;
        m00[x] = (ok && b00) ? T(1) : T(0);
        m01[x] = (ok && b01) ? T(1) : T(0);
        m10[x] = (ok && b10) ? T(1) : T(0);
        m11[x] = (ok && b11) ? T(1) : T(0);
        fracx[x] = ok ? ax : T(0);
        fracy[x] = ok ? ay : T(0);
        sse[x] = dx[x] = dy[x] = 0;
      }
      for (int64_t c = 0; c < C; ++c) {
        const T* __restrict__ sc = src + (n * C + c) * HW;
        const T* __restrict__ tc = tgt + (n * C + c) * HW + y * W;
#pragma omp simd
        for (int64_t x = 0; x < W; ++x) {
          const T ax = fracx[x], ay = fracy[x];
          const T v00 = m00[x] * sc[o00[x]], v01 = m01[x] * sc[o01[x]];
          const T v10 = m10[x] * sc[o10[x]], v11 = m11[x] * sc[o11[x]];
          const T sample = (1 - ay) * ((1 - ax) * v00 + ax * v01) + ay * ((1 - ax) * v10 + ax * v11);
          const T r = valid[x] * (sample - tc[x]);
          sse[x] += r * r;
          dx[x] += r * ((1 - ay) * (v01 - v00) + ay * (v11 - v10));
          dy[x] += r * ((1 - ax) * (v10 - v00) + ax * (v11 - v01));
        }
      }
      if (need_grad) {
        T* __restrict__ gx = grad + n * 2 * HW + y * W;
        T* __restrict__ gy = gx + HW;
#pragma omp simd
        for (int64_t x = 0; x < W; ++x) {
          gx[x] = 2 * dx[x];
          gy[x] = 2 * dy[x];
        }
      }
      double total = 0.0;
      for (int64_t x = 0; x < W; ++x) total += sse[x];
      row_sse[row] = total;
      row_count[row] = count;
    }
  }
}

// The springs of pixel p to its 8 neighbours q = p + d: energy sum_d w(p) w(q) (|d + f(q) - f(p)|
// - |d|)^2 and the gradient -2 sum_d w w d(energy)/ds (each spring appears from both ends, and
// d/ds is odd in s, so the gradient is a gather over p's own springs: no scatter, no atomics).
// Branch-free on interior pixels (kBorder = false) so that the x loop vectorizes.
template <typename T, bool kBorder>
inline void springs(const T* __restrict__ fx, const T* __restrict__ fy, const T* __restrict__ w,
                    int64_t y, int64_t x, int64_t H, int64_t W, T& energy, T& gx, T& gy) {
  constexpr int kDy[8] = {-1, -1, -1, 0, 0, 1, 1, 1};
  constexpr int kDx[8] = {-1, 0, 1, -1, 1, -1, 0, 1};
  const int64_t p = y * W + x;
  const T wp = w[p], fpx = fx[p], fpy = fy[p];
  T e = 0, ax = 0, ay = 0;
#pragma GCC unroll 8
  for (int k = 0; k < 8; ++k) {
    if (kBorder) {
      const int64_t qy = y + kDy[k], qx = x + kDx[k];
      if (qy < 0 || qy >= H || qx < 0 || qx >= W) continue;
    }
    const int64_t q = p + kDy[k] * W + kDx[k];
    const T ww = wp * w[q];
    const T sx = kDx[k] + fx[q] - fpx, sy = kDy[k] + fy[q] - fpy;
    const T square = sx * sx + sy * sy;
    const T len = std::sqrt(square);
    const bool diagonal = kDx[k] != 0 && kDy[k] != 0;
    const T rest = diagonal ? T(1.4142135623730951) : T(1);
    const T stretch = (square - (diagonal ? T(2) : T(1))) / (len + rest);  // = len - rest, exactly
    e += ww * stretch * stretch;
    const T k2 = len > 0 ? ww * stretch / len : T(0);
    ax += k2 * sx;
    ay += k2 * sy;
  }
  energy = e;
  gx = -4 * ax;
  gy = -4 * ay;
}

template <typename T>
void rigidity(const T* field, const T* weight, int64_t N, int64_t H, int64_t W, int need_grad,
              int num_threads, T* grad, double* row_energy, double* row_sumsq) {
  const int64_t HW = H * W;
#pragma omp parallel num_threads(num_threads)
  {
    // Per-thread row buffers: per-pixel energies (summed in float64 afterwards, keeping the
    // pixel loop free of a serial reduction) and a gradient sink when no gradient is wanted.
    std::vector<T> energy(W), sink_x(W), sink_y(W);
#pragma omp for schedule(dynamic, 4)
    for (int64_t row = 0; row < N * H; ++row) {
      const int64_t n = row / H, y = row % H;
      const T* fx = field + n * 2 * HW;
      const T* fy = fx + HW;
      const T* w = weight + n * HW;
      T* __restrict__ gx = need_grad ? grad + n * 2 * HW + y * W : sink_x.data();
      T* __restrict__ gy = need_grad ? gx + HW : sink_y.data();
      T* __restrict__ e = energy.data();
      if (y == 0 || y == H - 1 || W < 3) {
        for (int64_t x = 0; x < W; ++x) springs<T, true>(fx, fy, w, y, x, H, W, e[x], gx[x], gy[x]);
      } else {
        springs<T, true>(fx, fy, w, y, 0, H, W, e[0], gx[0], gy[0]);
#pragma omp simd
        for (int64_t x = 1; x < W - 1; ++x) springs<T, false>(fx, fy, w, y, x, H, W, e[x], gx[x], gy[x]);
        springs<T, true>(fx, fy, w, y, W - 1, H, W, e[W - 1], gx[W - 1], gy[W - 1]);
      }
      double total = 0.0, sumsq = 0.0;
      const T* rx = fx + y * W;
      const T* ry = fy + y * W;
      for (int64_t x = 0; x < W; ++x) {
        total += e[x];
        sumsq += static_cast<double>(rx[x]) * rx[x] + static_cast<double>(ry[x]) * ry[x];
      }
      row_energy[row] = total;
      row_sumsq[row] = sumsq;
    }
  }
}

}  // namespace

extern "C" {

void warp_mse_f32(const float* src, const float* tgt, const float* field, const uint8_t* sf,
                  const uint8_t* tf, int64_t N, int64_t C, int64_t H, int64_t W, int need_grad,
                  int num_threads, float* grad, float* weight, double* row_sse, double* row_count) {
  warp_mse<float>(src, tgt, field, sf, tf, N, C, H, W, need_grad, num_threads, grad, weight, row_sse,
                  row_count);
}

void warp_mse_f64(const double* src, const double* tgt, const double* field, const uint8_t* sf,
                  const uint8_t* tf, int64_t N, int64_t C, int64_t H, int64_t W, int need_grad,
                  int num_threads, double* grad, double* weight, double* row_sse, double* row_count) {
  warp_mse<double>(src, tgt, field, sf, tf, N, C, H, W, need_grad, num_threads, grad, weight, row_sse,
                   row_count);
}

void rigidity_f32(const float* field, const float* weight, int64_t N, int64_t H, int64_t W,
                  int need_grad, int num_threads, float* grad, double* row_energy, double* row_sumsq) {
  rigidity<float>(field, weight, N, H, W, need_grad, num_threads, grad, row_energy, row_sumsq);
}

void rigidity_f64(const double* field, const double* weight, int64_t N, int64_t H, int64_t W,
                  int need_grad, int num_threads, double* grad, double* row_energy, double* row_sumsq) {
  rigidity<double>(field, weight, N, H, W, need_grad, num_threads, grad, row_energy, row_sumsq);
}

}  // extern "C"
