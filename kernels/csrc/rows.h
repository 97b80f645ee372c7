// Generic SIMD row kernels, included once per instruction set inside a namespace that defines
// `struct Ops` (vector width W, type V and the vector operations) under a matching
// `#pragma GCC target`. Needs load1/store1 (scalar conversions) and BLOCK from the includer.

// logits row -> (max, sum exp(x/T - max)): one sweep from memory; each BLOCK of columns is read
// into L1 for its max (the running sum is rescaled at most once per block), then summed.
template <int D>
void forward_row(const void* row, int64_t n, float inv_t, float& max_out, float& sum_out) {
  const float ninf = -std::numeric_limits<float>::infinity();
  const typename Ops::V vt = Ops::set1(inv_t);
  float m = ninf, s = 0.f;
  for (int64_t start = 0; start < n; start += BLOCK) {
    const int64_t end = std::min(n, start + BLOCK);
    int64_t j = start;
    typename Ops::V vm = Ops::set1(ninf);
    for (; j + Ops::W <= end; j += Ops::W) vm = Ops::max(vm, Ops::mul(Ops::template load<D>(row, j), vt));
    float bm = Ops::hmax(vm);
    for (; j < end; ++j) bm = std::max(bm, load1<D>(row, j) * inv_t);
    if (bm > m) { s *= std::exp(m - bm); m = bm; }
    if (m == ninf) continue;  // a block of -inf logits adds nothing
    const typename Ops::V vmax = Ops::set1(m);
    typename Ops::V acc0 = Ops::zero(), acc1 = Ops::zero();
    j = start;
    for (; j + 2 * Ops::W <= end; j += 2 * Ops::W) {
      acc0 = Ops::add(acc0, Ops::exp(Ops::fmsub(Ops::template load<D>(row, j), vt, vmax)));
      acc1 = Ops::add(acc1, Ops::exp(Ops::fmsub(Ops::template load<D>(row, j + Ops::W), vt, vmax)));
    }
    for (; j + Ops::W <= end; j += Ops::W) acc0 = Ops::add(acc0, Ops::exp(Ops::fmsub(Ops::template load<D>(row, j), vt, vmax)));
    float bs = Ops::hsum(Ops::add(acc0, acc1));
    for (; j < end; ++j) bs += std::exp(load1<D>(row, j) * inv_t - m);
    s += bs;
  }
  max_out = m;
  sum_out = s;
}

// out[j] = -g * exp(x[j]/T - lse) for every column (the caller then fixes the label column).
template <int D>
void backward_row(const void* row, void* out, int64_t n, float inv_t, float lse, float g) {
  const typename Ops::V vt = Ops::set1(inv_t), vl = Ops::set1(lse), vng = Ops::set1(-g);
  int64_t j = 0;
  for (; j + Ops::W <= n; j += Ops::W)
    Ops::template store<D>(out, j, Ops::mul(vng, Ops::exp(Ops::fmsub(Ops::template load<D>(row, j), vt, vl))));
  for (; j < n; ++j) store1<D>(out, j, -g * std::exp(load1<D>(row, j) * inv_t - lse));
}
