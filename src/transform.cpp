// The DuQuant transform of one layer: smoothing, greedy block rotation, zigzag permutation,
// second greedy rotation (DESIGN.md section 4 steps 1-5; arXiv 2406.01721 sections 3.1-3.2).
//
// Deliberate departures from the public reference code (DESIGN.md section 4, "known defects"):
//   - the greedy step picks the outlier *column* (the channel inside the block), not the row;
//   - rotations are accumulated in float64, so the kept product is orthogonal to ~1e-12;
//   - everything works on 2-D [tokens, channels] views, so the batch size cannot matter;
//   - in_features not divisible by the block are zero-padded (exact: padded channels are zero
//     in the activation and in the weight).
// Everything runs on the CPU (the statistics are a few hundred tokens); inputs on another device
// are copied, and every tensor returned is a CPU tensor.
#include "duquant/transform.h"

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <utility>
#include <vector>

#include "duquant/magnitude_scan.h"
#include "duquant/ops.h"
#include "w4a8_layout.h"

namespace duquant {
namespace {

// Seeds of the two rotations of one call, derived from TransformOptions::seed so that the two
// rotations draw different Q' and the whole transform is a pure function of (data, options).
// splitmix64 finaliser: neighbouring (seed, stage) pairs give unrelated generator seeds.
uint64_t derive_seed(uint64_t seed, uint64_t stage) {
  uint64_t z = seed + 0x9e3779b97f4a7c15ULL * (stage + 1);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

constexpr uint64_t kRotation1Stage = 1;
constexpr uint64_t kRotation2Stage = 2;

// Rows of every GEMM of the greedy search. ops::rotate_rows computes each row of x R as one FMA
// chain whatever the other rows of the call; so does MKL, its fallback, except on its
// small-matrix paths (below 12 rows with 1 or 2 threads, measured at b = 128). Calls of at least
// this many rows keep every row bitwise what one call over all rows gives on either path, so
// which rows are rotated together changes no value (test
// GreedyRotation.RotatesOnlyTheRowsThatReachThePeak pins it).
constexpr int64_t kMinGreedyGemmRows = 128;

// Relative slack on the float32 row norms against a peak: rounding (~1e-7 per step) lets a
// rotated row's norm drift from the norm computed once before the search.
constexpr double kNormSlack = 1e-3;

bool is_power_of_two(int64_t value) { return value > 0 && (value & (value - 1)) == 0; }

// E_d R E_d for the transposition E_d of 0 and d: R with rows 0 and d exchanged, then columns 0
// and d. On the CPU a copy has its entries exchanged directly: a pair of index_selects on the
// [b, b] matrix cost a tenth of the greedy step's GEMM at a few thousand rows.
torch::Tensor exchange_zero_with(const torch::Tensor& rotation, int64_t d) {
  const int64_t b = rotation.size(0);
  if (!rotation.device().is_cpu()) {
    auto index = torch::arange(b, torch::kLong);
    std::swap(index.data_ptr<int64_t>()[0], index.data_ptr<int64_t>()[d]);
    index = index.to(rotation.device());
    return rotation.index_select(0, index).index_select(1, index);
  }
  auto exchanged = rotation.contiguous().clone();
  if (d == 0) return exchanged;
  AT_DISPATCH_FLOATING_TYPES(exchanged.scalar_type(), "exchange_zero_with", [&] {
    scalar_t* entries = exchanged.data_ptr<scalar_t>();
    std::swap_ranges(entries, entries + b, entries + d * b);
    for (int64_t row = 0; row < b; ++row) std::swap(entries[row * b], entries[row * b + d]);
  });
  return exchanged;
}

// E_d R E_d for every d at once, [b, b, b]: rows and then columns gathered by the transposition of
// 0 and d, one index built on the host. Indexing it costs nothing per step, where
// exchange_zero_with off the CPU copies its index to the device, a synchronising copy.
torch::Tensor exchanged_rotations(const torch::Tensor& rotation) {
  const int64_t b = rotation.size(0);
  auto index = torch::arange(b, torch::kLong).repeat({b, 1});
  auto* entries = index.data_ptr<int64_t>();
  for (int64_t d = 0; d < b; ++d) std::swap(entries[d * b], entries[d * b + d]);
  index = index.to(rotation.device());
  const auto rows = rotation.index_select(0, index.flatten()).view({b, b, b});
  return rows.gather(2, index.unsqueeze(1).expand({b, b, b})).contiguous();
}

// The float32 rotation the layer applies, or none when no greedy step lowered the peak: the kept
// product is then the identity, and x I = x exactly (up to the sign of a zero, which quantizes
// alike), so leaving it out ("step skipped") changes no value and saves a [T, K] x b GEMM at
// every call of the deployed layer and in every transform of the quantizer.
torch::Tensor kept_rotation(const GreedyRotation& greedy) {
  return greedy.steps > 0 ? greedy.rotation.to(torch::kFloat) : torch::Tensor();
}

// max_j max_t |x_tj| / mean_j max_t |x_tj| over the columns of a [T, C] sample.
double peak_to_mean(const torch::Tensor& sample) {
  if (!sample.defined() || sample.numel() == 0) return std::numeric_limits<double>::quiet_NaN();
  auto channel_absmax = sample.abs().amax(0).to(torch::kDouble);
  return channel_absmax.max().item<double>() / channel_absmax.mean().item<double>();
}

// The column maxima of the weights that share the input (q/k/v or gate/up): smoothing must suit
// all of them, since they will all be multiplied by the same s.
torch::Tensor shared_weight_absmax(const std::vector<torch::Tensor>& weights, int64_t in_features) {
  TORCH_CHECK(!weights.empty(), "duquant: smoothing needs the weights of the layer(s) sharing the input");
  torch::Tensor absmax;
  for (const auto& weight : weights) {
    TORCH_CHECK(weight.dim() == 2 && weight.size(1) == in_features, "duquant: weight of shape ", weight.sizes(),
                " does not take ", in_features, " input features");
    // |w| and its maximum are exact in the stored dtype, so the float32 conversion comes last.
    auto column_absmax = weight.detach().abs().amax(0).to(torch::kFloat);
    absmax = absmax.defined() ? torch::maximum(absmax, column_absmax) : column_absmax;
  }
  return absmax;
}

}  // namespace

Method parse_method(const std::string& name) {
  if (name == "rtn") return Method::Rtn;
  if (name == "smooth") return Method::Smooth;
  if (name == "duquant") return Method::DuQuant;
  throw std::invalid_argument("duquant: unknown method '" + name + "' (expected rtn, smooth or duquant)");
}

std::string method_name(Method method) {
  switch (method) {
    case Method::Rtn:
      return "rtn";
    case Method::Smooth:
      return "smooth";
    case Method::DuQuant:
      return "duquant";
  }
  throw std::invalid_argument("duquant: invalid Method value");
}

torch::Tensor smoothing_scales(const torch::Tensor& activation_absmax, const torch::Tensor& weight_absmax,
                               double alpha) {
  TORCH_CHECK(alpha >= 0.0 && alpha <= 1.0, "duquant: smoothing alpha must lie in [0, 1], got ", alpha);
  auto act = activation_absmax.detach().to(torch::kDouble).flatten();
  auto wgt = weight_absmax.detach().to(act.device(), torch::kDouble).flatten();
  TORCH_CHECK(act.numel() == wgt.numel(), "duquant: smoothing needs one activation and one weight maximum per channel (",
              act.numel(), " vs ", wgt.numel(), ")");
  // SmoothQuant / DuQuant section 3.1 migration: s_j = max|X_j|^alpha / max|W_:,j|^(1-alpha),
  // floored at 1e-5 so that 1/s stays finite.
  auto scales = (act.pow(alpha) / wgt.pow(1.0 - alpha)).clamp_min(1e-5);
  // A channel never seen in calibration (max|X_j| = 0) or unused by every weight
  // (max|W_:,j| = 0) carries no magnitude to balance; s = 1 leaves it untouched rather than
  // dividing a later non-zero activation by 1e-5 or by infinity.
  auto degenerate = (act <= 0) | (wgt <= 0) | scales.isinf() | scales.isnan();
  scales = torch::where(degenerate, torch::ones_like(scales), scales);
  return scales.to(activation_absmax.device(), torch::kFloat);
}

torch::Tensor base_rotation(int64_t block_size, uint64_t seed) {
  TORCH_CHECK(block_size >= 1, "duquant: rotation block must be positive, got ", block_size);
  const int64_t b = block_size;
  // Givens elimination of u = (1, ..., 1) / sqrt(b): rotations in the planes (0,1), (1,2), ...,
  // (b-2,b-1) move all of u into its last coordinate, so G u = e_{b-1} and, G being orthogonal,
  // row b-1 of G is u. Exchanging rows and columns 0 and b-1 then puts the uniform row first:
  // x R~ for x = c e_d (one outlier in channel d, after the E_d exchange below) is c u, the
  // outlier spread evenly over the block (arXiv 2406.01721 section 3.1, rotation).
  auto givens = torch::eye(b, torch::kDouble);
  auto* g = givens.data_ptr<double>();
  std::vector<double> u(static_cast<size_t>(b), 1.0 / std::sqrt(static_cast<double>(b)));
  for (int64_t i = 0; i + 1 < b; ++i) {
    const double radius = std::hypot(u[i], u[i + 1]);
    const double c = u[i + 1] / radius, s = u[i] / radius;
    for (int64_t col = 0; col < b; ++col) {
      const double top = g[i * b + col], bottom = g[(i + 1) * b + col];
      g[i * b + col] = c * top - s * bottom;
      g[(i + 1) * b + col] = s * top + c * bottom;
    }
    u[i] = 0.0;
    u[i + 1] = radius;
  }
  auto uniform_first = exchange_zero_with(givens, b - 1);

  // Q': Haar-random orthogonal (b-1)x(b-1) from the QR of a seeded Gaussian, with the signs of
  // R's diagonal folded into Q so the distribution is uniform and the result unique per seed.
  // It multiplies from the left, mixing rows 1..b-1 only: the uniform row 0 must survive.
  auto mixing = torch::eye(b, torch::kDouble);
  if (b > 1) {
    auto generator = at::make_generator<at::CPUGeneratorImpl>(seed);
    auto gaussian = torch::randn({b - 1, b - 1}, generator, torch::kDouble);
    auto [q, r] = torch::linalg_qr(gaussian);
    auto signs = torch::sign(r.diagonal());
    signs = torch::where(signs == 0, torch::ones_like(signs), signs);
    mixing.slice(0, 1).slice(1, 1).copy_(q * signs.unsqueeze(0));
  }
  return mixing.matmul(uniform_first);
}

GreedyRotation greedy_block_rotation(const torch::Tensor& blocks, int64_t max_steps, uint64_t seed,
                                     PeakSearch search) {
  TORCH_CHECK(blocks.dim() == 2, "duquant: greedy rotation expects [rows, block] blocks, got ", blocks.sizes());
  const int64_t b = blocks.size(1);
  const auto device = blocks.device();
  GreedyRotation result;
  result.rotation = torch::eye(b, torch::TensorOptions().dtype(torch::kDouble).device(device));
  if (blocks.size(0) == 0 || max_steps <= 0 || b < 2) return result;

  // Only rows that can hold the peak are rotated. A rotation keeps every row's norm and an entry
  // never exceeds its row's norm, so a row whose norm is below the peak of a step can neither be
  // that peak nor decide the outlier column. The rows are therefore kept largest norm first, and
  // only the leading ones whose norm reaches the lowest peak so far are rotated at each step; a
  // row joins when the peak falls to its norm, and first catches up on every earlier step, one
  // GEMM per step as the others had them. Its values, and so the whole search, are bitwise those
  // of rotating every row at every step (kMinGreedyGemmRows), at the cost of the rows that ever
  // reach the peak: on the generated full-size pi0 about 70 % of all rows, and 2-12 % for the
  // first rotation of the LLM down_proj, whose few outlier blocks dwarf the rest.
  const auto rows = blocks.detach().to(torch::kFloat).contiguous();
  TORCH_CHECK(all_finite(rows), "duquant: activation blocks have non-finite entries");
  const int64_t count = rows.size(0);
  const auto [norms_by_size, order_on_device] = rows.norm(2, 1).sort(/*stable=*/true, /*dim=*/0, /*descending=*/true);
  const auto sorted_norms = norms_by_size.cpu().contiguous();
  const auto order = order_on_device.cpu().contiguous();
  const float* norms = sorted_norms.data_ptr<float>();
  const int64_t* original_row = order.data_ptr<int64_t>();
  const auto sorted_rows = rows.index_select(0, order_on_device);
  const torch::Tensor order_by_norm = order_on_device;  // lambdas cannot capture a structured binding
  // The leading rows whose norm reaches `peak` (never fewer than `active`). The slack covers the
  // rounding of the float32 norms and their drift over the steps; a few extra rows are harmless.
  const auto rows_reaching = [&](double peak, int64_t active) {
    const double threshold = peak * (1.0 - kNormSlack);
    const int64_t reaching =
        std::partition_point(norms, norms + count, [&](float norm) { return norm >= threshold; }) - norms;
    return std::max(reaching, active);
  };
  // The peak of rotated rows [begin, end) as peak_entry over the blocks in their own order
  // reports it: the largest |entry|, among equal ones the lowest row of `blocks`, then column.
  // Its index is original row * b + column, so of two peaks of equal magnitude the lower index
  // is the one peak_entry would report (earlier_peak).
  const auto peak_of = [&](const torch::Tensor& rotated, int64_t begin, int64_t end) {
    const auto maxima = row_absmax(rotated.slice(0, begin, end)).cpu();
    const float* maximum = maxima.data_ptr<float>();
    const int64_t* row_of = original_row + begin;
    int64_t best = 0;
    for (int64_t i = 1; i < end - begin; ++i) {
      if (maximum[i] > maximum[best] || (maximum[i] == maximum[best] && row_of[i] < row_of[best])) best = i;
    }
    const auto row = rotated[begin + best].cpu().contiguous();
    const float* entries = row.data_ptr<float>();
    int64_t column = 0;
    while (std::abs(entries[column]) != maximum[best]) ++column;
    return PeakEntry{maximum[best], row_of[best] * b + column};
  };
  const auto earlier_peak = [](const PeakEntry& first, const PeakEntry& second) {
    const bool second_wins =
        second.magnitude > first.magnitude || (second.magnitude == first.magnitude && second.index < first.index);
    return second_wins ? second : first;
  };

  // R~ is drawn on the CPU (seeded generator, QR) whatever the device, so every device learns
  // from the same base rotation.
  const auto base = base_rotation(b, seed).to(device);
  const auto base_float = base.to(torch::kFloat);
  // PeakSearch (transform.h): off the CPU each step's peak is one key reduction read back as one
  // number, and its rotation a slice of all the exchanged ones; both bitwise what the host path
  // finds (test GreedyRotation.TheDeviceSearchRunOnTheCpuIsTheHostSearchBitwise).
  const bool tensor_ops = (search == PeakSearch::kTensorOps || (search == PeakSearch::kAuto && !device.is_cpu())) &&
                          row_peak_keys_fit(count, b);
  const auto step_exchanges = tensor_ops ? exchanged_rotations(base_float) : torch::Tensor();
  const auto step_rotation = [&](int64_t d) {
    return tensor_ops ? step_exchanges[d] : exchange_zero_with(base_float, d);
  };
  const auto find_peak = [&](const torch::Tensor& rotated, int64_t begin, int64_t end) {
    return tensor_ops ? peak_entry_of_rows(rotated.slice(0, begin, end), order_by_norm.slice(0, begin, end), count)
                      : peak_of(rotated, begin, end);
  };
  // The working copies of the rows are float32 (one GEMM per step is the whole cost); only the
  // peak and the outlier position are read from them. Only rows [0, active) of `current` are
  // read: they have had every step so far. A joining row starts from `sorted_rows`, which the
  // search never writes (hence the copy: the two buffers swap after every step).
  auto current = sorted_rows.clone();
  auto next = torch::empty_like(current);
  auto peak = peak_entry(rows);
  int64_t active = std::min(count, std::max(kMinGreedyGemmRows, rows_reaching(peak.magnitude, 0)));

  // R_k = E_d R~ E_d: R~'s uniform first row moved to the outlier channel d, so the largest entry
  // is spread over its whole block (section 3.1; the reference code wrongly takes the row index
  // of the largest entry here).
  std::vector<int64_t> outlier_columns;
  std::vector<torch::Tensor> step_rotations;
  double best_peak = peak.magnitude;
  for (int64_t step = 0; step < max_steps && best_peak > 0; ++step) {
    outlier_columns.push_back(peak.index % b);
    step_rotations.push_back(step_rotation(outlier_columns.back()));
    auto rotated = next.slice(0, 0, active);
    ops::rotate_rows_out(rotated, current.slice(0, 0, active), step_rotations.back());
    peak = find_peak(next, 0, active);
    const int64_t joined = rows_reaching(peak.magnitude, active);
    if (joined > active) {
      // The joining rows catch up on every step so far, in GEMMs of at least kMinGreedyGemmRows
      // rows: the window may start among rows already rotated, whose recomputed values are the
      // same and are not copied back.
      const int64_t window = std::min(active, std::max<int64_t>(0, joined - kMinGreedyGemmRows));
      auto caught_up = sorted_rows.slice(0, window, joined);
      for (const auto& rotation : step_rotations) caught_up = ops::rotate_rows(caught_up, rotation);
      next.slice(0, active, joined).copy_(caught_up.slice(0, active - window));
      // Only the joined rows are scanned: the others' peak is already known.
      peak = earlier_peak(peak, find_peak(next, active, joined));
      active = joined;
    }
    std::swap(current, next);
    // Keep the prefix with the lowest peak: later steps may undo earlier gains.
    if (peak.magnitude < best_peak) {
      best_peak = peak.magnitude;
      result.steps = step + 1;
    }
  }
  result.rotated_rows = active;
  // The kept product R_1 ... R_steps, accumulated in float64 so that it stays orthogonal however
  // many steps are chained; only the kept prefix is multiplied out.
  const auto kept_exchanges = tensor_ops && result.steps > 0 ? exchanged_rotations(base) : torch::Tensor();
  for (int64_t step = 0; step < result.steps; ++step) {
    const int64_t d = outlier_columns[static_cast<size_t>(step)];
    result.rotation = result.rotation.matmul(tensor_ops ? kept_exchanges[d] : exchange_zero_with(base, d));
  }
  return result;
}

torch::Tensor ZigzagPermutation::compute(const torch::Tensor& channel_absmax, int64_t block_size) {
  auto magnitudes = channel_absmax.detach().to(torch::kCPU, torch::kFloat).flatten().contiguous();
  const int64_t channels = magnitudes.numel();
  TORCH_CHECK(block_size > 0 && channels % block_size == 0, "duquant: zigzag permutation of ", channels,
              " channels into blocks of ", block_size, " needs a whole number of blocks");
  const int64_t num_blocks = channels / block_size;
  // Stable descending sort: equal magnitudes (e.g. the zero padding) keep index order, so the
  // permutation is deterministic.
  auto order = std::get<1>(magnitudes.sort(/*stable=*/true, /*dim=*/0, /*descending=*/true)).contiguous();
  const auto* ranked = order.data_ptr<int64_t>();

  // Section 3.2 zigzag: deal the channels, largest first, to blocks 0,1,..,K-1,K-1,..,1,0,0,1,..
  // so every block receives a balanced share of the outliers; within a block the dealing order
  // (descending magnitude) is kept.
  std::vector<std::vector<int64_t>> members(static_cast<size_t>(num_blocks));
  for (int64_t rank = 0; rank < channels; ++rank) {
    const int64_t phase = rank % (2 * num_blocks);
    const int64_t block = phase < num_blocks ? phase : 2 * num_blocks - 1 - phase;
    members[static_cast<size_t>(block)].push_back(ranked[rank]);
  }
  auto permutation = torch::empty({channels}, torch::kLong);
  auto* out = permutation.data_ptr<int64_t>();
  for (const auto& block : members) out = std::copy(block.begin(), block.end(), out);
  return permutation;
}

LayerTransform compute_transform(const torch::Tensor& activation_absmax, const torch::Tensor& activation_sample,
                                 const std::vector<torch::Tensor>& weights, const TransformOptions& options) {
  // Everything is computed on the device of the statistics (the calibration device).
  const auto absmax = activation_absmax.detach().to(torch::kFloat).flatten();
  const auto device = absmax.device();
  const int64_t in_features = absmax.numel();
  TORCH_CHECK(in_features > 0, "duquant: empty activation statistics");
  // Any leading (batch, sequence) dimensions are tokens: work on [T, C].
  torch::Tensor sample;
  if (activation_sample.defined() && activation_sample.numel() > 0) {
    TORCH_CHECK(activation_sample.size(-1) == in_features, "duquant: activation sample has ",
                activation_sample.size(-1), " channels, statistics have ", in_features);
    sample = activation_sample.detach().reshape({-1, in_features}).to(device, torch::kFloat);
  }

  LayerTransform transform;
  transform.in_features = in_features;
  transform.padded_in_features = layout::padded_in_features(in_features, 0);
  transform.peak_to_mean_before = peak_to_mean(sample);

  // Everything but the permutation counts as rotation search (smoothing included).
  const auto start = std::chrono::steady_clock::now();
  if (options.method != Method::Rtn) {
    const auto scales = smoothing_scales(absmax, shared_weight_absmax(weights, in_features), options.alpha);
    transform.smooth = scales;
    transform.smooth_inv = (1.0 / scales.to(torch::kDouble)).to(torch::kFloat);
  }

  if (options.method == Method::DuQuant) {
    const int64_t b = options.block_size;
    TORCH_CHECK(is_power_of_two(b), "duquant: rotation block must be a power of two, got ", b);
    TORCH_CHECK(sample.defined(), "duquant: the DuQuant rotations are learnt from an activation sample; none given");
    transform.padded_in_features = layout::padded_in_features(in_features, b);
    const int64_t padded = transform.padded_in_features;
    const torch::Tensor none;

    // Rotation 1 is learnt on the smoothed, zero-padded sample with every block of every token
    // stacked as one row of Xb [T * K/b, b]: one R1 serves all blocks (I kron R1).
    auto smoothed = ops::apply_online_transform(sample, transform.smooth_inv, none, none, none, padded);
    auto first = greedy_block_rotation(smoothed.view({-1, b}), options.rotation_steps,
                                       derive_seed(options.seed, kRotation1Stage));
    transform.rotation1 = kept_rotation(first);
    transform.rotation1_steps = first.steps;
    // The float32 R1 that the runtime will use, applied exactly as the runtime applies it.
    auto rotated = ops::apply_online_transform(smoothed, none, transform.rotation1, none, none, padded);

    if (options.permute) {
      // The permutation is driven by max_t |X1[t, j]| of the sample after rotation 1, not by the
      // calibration-wide absmax vector: what rotation 1 leaves in a channel depends on the signs
      // of the co-occurring entries of one token, which the absmax vector has lost (its only exact
      // image through R1 is the bound sum_i a_i |R1_ij|, inflated by ~sqrt(b) and ranking channels
      // by block mass rather than by peak). The calibration-wide absmax still enters through the
      // smoothing, where a per-channel statistic is exact.
      StageTimer permutation_timer(transform.times, Stage::Permutation);
      transform.permutation = ZigzagPermutation::compute(rotated.abs().amax(0), b).to(device);
      rotated = rotated.index_select(1, transform.permutation);

    }

    auto second = greedy_block_rotation(rotated.view({-1, b}), options.rotation_steps,
                                        derive_seed(options.seed, kRotation2Stage));
    transform.rotation2 = kept_rotation(second);
    transform.rotation2_steps = second.steps;
  }

  if (sample.defined()) {
    auto transformed = ops::apply_online_transform(sample, transform.smooth_inv, transform.rotation1,
                                                   transform.permutation, transform.rotation2,
                                                   transform.padded_in_features);
    // Without the DuQuant transform the padding columns stay exactly zero and are not channels;
    // with it they carry their share of the block and count like any other channel.
    if (options.method != Method::DuQuant) transformed = transformed.slice(1, 0, in_features);
    transform.peak_to_mean_after = peak_to_mean(transformed);
  } else {
    transform.peak_to_mean_after = std::numeric_limits<double>::quiet_NaN();
  }
  transform.times[Stage::RotationSearch] =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() -
      transform.times[Stage::Permutation];
  return transform;
}

// x W^T = (x / s)(W s)^T for the diagonal smoothing, and for the orthogonal part
// Q = (I kron R1) P (I kron R2) (zero padding included, P a column permutation):
// (x Q)(W Q)^T = x Q Q^T W^T = x W^T. So W~ is the rows of W s pushed through the same
// online transform as x, without the 1/s step (DESIGN.md section 4 step 5).
torch::Tensor transform_weight(const torch::Tensor& weight, const LayerTransform& transform) {
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == transform.in_features, "duquant: weight of shape ",
              weight.sizes(), " does not match a transform of ", transform.in_features, " input features");
  // W s in float32 in one pass: a bf16 weight times the float32 scales is computed in float32
  // (type promotion), each weight converted exactly before its product.
  const bool smoothed = transform.smooth.defined() && transform.smooth.numel() > 0;
  const bool promotes_to_float = c10::promoteTypes(weight.scalar_type(), torch::kFloat) == torch::kFloat;
  const auto scaled = smoothed && promotes_to_float ? weight.detach() * transform.smooth.to(torch::kFloat)
                      : smoothed ? weight.detach().to(torch::kFloat) * transform.smooth.to(torch::kFloat)
                                 : weight.detach().to(torch::kFloat);
  return ops::apply_online_transform(scaled, torch::Tensor(), transform.rotation1, transform.permutation,
                                     transform.rotation2, transform.padded_in_features);
}

}  // namespace duquant
