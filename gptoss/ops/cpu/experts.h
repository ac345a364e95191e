// gptoss CPU kernels: the MoE experts: grouping tokens by expert, gate_up, SwiGLU, down, the weighted sum.
// Part of one translation unit: included by kernels.cpp, in order, inside namespace gptoss.
#pragma once

// ---------------------------------------------------------------------------------------------
// MoE experts: out[t] = sum_j w[t, j] * (down_e(swiglu(gate_up_e(x[t]) + b)) + b_down), e = idx[t, j].
//
// Tokens are grouped by expert. An expert with few tokens (decode) runs the MXFP4 product straight
// from the packed bytes; an expert with many tokens (prefill) has its rows dequantized once, a
// tile of rows at a time into a per-thread fp32 buffer that stays in L2, and multiplied with the
// dense kernel. Each projection (gate_up, then down) is one parallel sweep over (expert, row
// block) units; the weighted sum is a third sweep over tokens. Everything accumulates in fp32.

static constexpr int64_t kFusedMaxTokens = 4;  // more tokens than this on an expert: dequantized tiles
static constexpr int64_t kTileRows = 32;       // rows per tile: 32 x 2880 fp32 = 368 KB
static constexpr int64_t kFusedRows = 64;      // fewest rows per unit on the packed path
static constexpr int64_t kTokenChunk = 512;    // tokens per pass (bounds the intermediate buffers)

struct ExpertGroup {
  int64_t expert;
  int64_t first;  // offset of its first assignment in the sorted lists
  int64_t count;
  bool fused;
  int64_t x_off;  // offset of its inputs in the packed input buffer (floats)
};

// Copies the inputs of every group: fused groups in the prepared layout, tile groups as plain rows.
// Row i of group g is source row rows[g.first + i] (or g.first + i without `rows`).
template <class T>
static void pack_inputs(MxKind kind, std::vector<ExpertGroup>& groups, const T* src, int64_t K,
                        const int64_t* rows, std::vector<float>& buf) {
  const int64_t ld_fused = mx_prepared_len(kind, K);
  int64_t total = 0;
  for (auto& g : groups) {
    g.x_off = total;
    total += g.fused ? g.count * ld_fused : kind == MxKind::Avx512 ? gemm_mpad(g.count) * K : g.count * K;
    total = (total + 15) / 16 * 16;
  }
  buf.resize(total);
  parallel_units(static_cast<int64_t>(groups.size()), [&](int64_t gi, std::vector<float>&) {
    const ExpertGroup& g = groups[gi];
    if (!g.fused && kind == MxKind::Avx512) {
      if (rows)
        pack_xt(src, K, rows + g.first, g.count, K, buf.data() + g.x_off);
      else
        pack_xt(src + g.first * K, K, nullptr, g.count, K, buf.data() + g.x_off);
      return;
    }
    for (int64_t i = 0; i < g.count; ++i) {
      const T* row = src + (rows ? rows[g.first + i] : g.first + i) * K;
      if (g.fused) {
        prepare_x_mx(kind, row, K, buf.data() + g.x_off + i * ld_fused);
      } else {
        float* d = buf.data() + g.x_off + i * K;
        for (int64_t k = 0; k < K; ++k) d[k] = to_f32(row[k]);
      }
    }
  });
}

// The parallel work of one projection: (group, row range) pieces, smaller for the packed path.
struct ProjectionUnit {
  int64_t g, r0, r1;
};

// Runs body(unit, group, expert blocks, expert scales, output rows of the group, scratch) over every
// (group, row range) piece of one projection, in parallel.
template <class Body>
static void for_each_projection_unit(const std::vector<ExpertGroup>& groups, const uint8_t* blocks,
                                     const uint8_t* scales, int64_t rows, int64_t nblk, float* y, int64_t ldy,
                                     const Body& body) {
  // The packed path streams from memory: each worker gets a few long runs of rows (about two
  // per thread over all experts, equal within an expert) rather than many 64-row pieces, since
  // every new run starts its stream cold (20 -> 23 GB/s at decode on the 20b's shapes, benchmarks/kernels_ab.py).
  std::vector<ProjectionUnit> units;
  int64_t fused_rows = 0;
  for (const auto& g : groups) fused_rows += g.fused ? rows : 0;
  const int64_t piece = std::max<int64_t>(kFusedRows, (fused_rows + 2 * g_threads - 1) / (2 * g_threads));
  const int64_t parts = (rows + piece - 1) / piece, fused_step = ((rows + parts - 1) / parts + 3) / 4 * 4;
  for (int64_t g = 0; g < static_cast<int64_t>(groups.size()); ++g) {
    const int64_t step = groups[g].fused ? fused_step : kTileRows;
    for (int64_t r = 0; r < rows; r += step) units.push_back({g, r, std::min(rows, r + step)});
  }
  parallel_units(static_cast<int64_t>(units.size()), [&](int64_t ui, std::vector<float>& scratch) {
    const ProjectionUnit& un = units[ui];
    const ExpertGroup& grp = groups[un.g];
    body(un, grp, blocks + grp.expert * rows * nblk * 16, scales + grp.expert * rows * nblk, y + grp.first * ldy,
         scratch);
  });
}

// One projection for every used expert: Y_e [count, rows] = X_e @ W_e^T, into y at row g.first.
static void expert_projection(Isa isa, MxKind kind, const std::vector<ExpertGroup>& groups, const uint8_t* blocks,
                              const uint8_t* scales, int64_t rows, int64_t K, const float* xbuf, float* y,
                              int64_t ldy) {
  const int64_t nblk = K / 32, ld_fused = mx_prepared_len(kind, K);
  const MxKernel& mxk = mx_kernel(kind);
  const DenseKernel& dk = dense_kernel(isa, false, false);
  for_each_projection_unit(groups, blocks, scales, rows, nblk, y, ldy, [&](const ProjectionUnit& un,
                           const ExpertGroup& grp, const uint8_t* eb, const uint8_t* es, float* yg,
                           std::vector<float>& tile) {
    if (grp.fused) {
      const MxArgs a{eb, es, nblk, xbuf + grp.x_off, ld_fused, grp.count, yg, ldy};
      mx_rows(mxk, a, un.r0, un.r1);
      return;
    }
    // Dequantize rows r0..r1 into the tile, then a dense product over all of the expert's tokens.
    const int64_t nr = un.r1 - un.r0;
    tile.resize((nr + 15) / 16 * 16 * K);
    decode_rows(isa, eb + un.r0 * nblk * 16, es + un.r0 * nblk, nblk, nr, tile.data());
    if (kind == MxKind::Avx512) {
      std::fill(tile.begin() + nr * K, tile.end(), 0.f);
      gemm_tile(tile.data(), nr, xbuf + grp.x_off, grp.count, K, yg + un.r0, ldy);
      return;
    }
    const DenseArgs a{tile.data(), K, xbuf + grp.x_off, K, grp.count, K, yg + un.r0, ldy};
    dense_rows(dk, a, 0, nr);
  });
}

// The int8-activation twins of pack_inputs and expert_projection (offsets in bytes).
template <class T>
static void q8_pack_inputs(std::vector<ExpertGroup>& groups, const T* src, int64_t K, const int64_t* rows,
                           std::vector<uint8_t>& buf) {
  const int64_t nblk = K / 32;
  int64_t total = 0;
  for (auto& g : groups) {
    g.x_off = total;
    total += g.fused ? g.count * q8_row_bytes(nblk) : (g.count + 15) / 16 * q8_tile_bytes(nblk);
  }
  buf.resize(total);
  parallel_units(static_cast<int64_t>(groups.size()), [&](int64_t gi, std::vector<float>& scratch) {
    const ExpertGroup& g = groups[gi];
    uint8_t* dst = buf.data() + g.x_off;
    if (!g.fused) {
      if (rows)
        prepare_q8_tile(src, K, rows + g.first, g.count, K, dst, scratch);
      else
        prepare_q8_tile(src + g.first * K, K, nullptr, g.count, K, dst, scratch);
      return;
    }
    for (int64_t i = 0; i < g.count; ++i)
      prepare_q8_row(src + (rows ? rows[g.first + i] : g.first + i) * K, K, dst + i * q8_row_bytes(nblk), scratch);
  });
}

static void q8_expert_projection(Q8Kind kind, const std::vector<ExpertGroup>& groups, const uint8_t* blocks,
                                 const uint8_t* scales, int64_t rows, int64_t K, const uint8_t* xbuf, float* y,
                                 int64_t ldy) {
  const int64_t nblk = K / 32;
  for_each_projection_unit(groups, blocks, scales, rows, nblk, y, ldy, [&](const ProjectionUnit& un,
                           const ExpertGroup& grp, const uint8_t* eb, const uint8_t* es, float* yg,
                           std::vector<float>& scratch) {
    if (grp.fused) {
      q8_rows(kind, Q8Args{eb, es, nblk, xbuf + grp.x_off, grp.count, yg, ldy}, un.r0, un.r1);
      return;
    }
    const int64_t nr = un.r1 - un.r0, padded = (nr + 15) / 16 * 16;  // whole AMX tiles of rows
    scratch.assign(padded * K / 4 + padded * nblk, 0.f);  // the byte tile, then its scales
    uint8_t* tile = reinterpret_cast<uint8_t*>(scratch.data());
    float* ws = scratch.data() + padded * K / 4;
    if (kind == Q8Kind::Vnni512) {
      decode_rows_q8(eb + un.r0 * nblk * 16, es + un.r0 * nblk, nblk, nr, tile, ws);
      if (g_use_amx)
        q8_gemm_tile_amx(tile, ws, nr, xbuf + grp.x_off, grp.count, K, yg + un.r0, ldy);
      else
        q8_gemm_tile(tile, ws, nr, xbuf + grp.x_off, grp.count, K, yg + un.r0, ldy);
    } else {
      decode_rows_q8_avx2(eb + un.r0 * nblk * 16, es + un.r0 * nblk, nblk, nr, tile, ws);
      q8_gemm_tile_avx2(tile, ws, nr, xbuf + grp.x_off, grp.count, K, yg + un.r0, ldy);
    }
  });
}

// out [N, H] fp32 (zeroed by the caller) = sum over each token's experts of weight * expert(x).
// The expert indices are checked by the caller. Biases are bf16 or fp32 ([E, 2I] and [E, H]).
static void moe_experts_impl(const void* x, bool x_bf16, const int64_t* ip, const float* wp, int64_t N,
                             int64_t topk, const uint8_t* gub, const uint8_t* gus, const void* gu_bias,
                             const uint8_t* dnb, const uint8_t* dns, const void* dn_bias, bool bias_bf16, int64_t E,
                             int64_t I2, int64_t H, float limit, float* op) {
  const int64_t I = I2 / 2;
  const Isa isa = g_isa;
  const MxKind kind = mx_kind(isa);
  // The biases of the experts in use as fp32 (widening all of them would cost more than decoding
  // a token's experts); slot[e] is expert e's row in them.
  std::vector<int64_t> used_list, slot(E, -1);
  for (int64_t i = 0; i < N * topk; ++i)
    if (slot[ip[i]] < 0) {
      slot[ip[i]] = static_cast<int64_t>(used_list.size());
      used_list.push_back(ip[i]);
    }
  const int64_t n_used = static_cast<int64_t>(used_list.size());
  std::vector<float> gubias(n_used * I2), dnbias(n_used * H);
  for (int64_t u = 0; u < n_used; ++u) {
    const int64_t e = used_list[u];
    for (int64_t c = 0; c < I2; ++c)
      gubias[u * I2 + c] = bias_bf16 ? bf16_to_f32(static_cast<const bf16_t*>(gu_bias)[e * I2 + c])
                                     : static_cast<const float*>(gu_bias)[e * I2 + c];
    for (int64_t c = 0; c < H; ++c)
      dnbias[u * H + c] = bias_bf16 ? bf16_to_f32(static_cast<const bf16_t*>(dn_bias)[e * H + c])
                                    : static_cast<const float*>(dn_bias)[e * H + c];
  }
  const float* gbias = gubias.data();
  const float* dbias = dnbias.data();
  const bool q8 = use_int8_activations(isa, x_bf16);
  std::vector<float> xbuf, h, act, y;
  std::vector<uint8_t> qbuf;

  for (int64_t t0 = 0; t0 < N; t0 += kTokenChunk) {
    const int64_t t1 = std::min(N, t0 + kTokenChunk), nt = t1 - t0, rows_total = nt * topk;
    // Group the (token, slot) assignments of this chunk by expert (a counting sort); a token that
    // lists an expert twice gets two rows, as in the reference.
    std::vector<int64_t> start(E + 1, 0);
    for (int64_t i = t0 * topk; i < t1 * topk; ++i) ++start[ip[i] + 1];
    for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
    std::vector<int64_t> fill(start.begin(), start.end() - 1), tok(rows_total), row_of(rows_total), expert_of_row(rows_total);
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t j = 0; j < topk; ++j) {
        const int64_t e = ip[t * topk + j], r = fill[e]++;
        tok[r] = t;
        expert_of_row[r] = e;
        row_of[(t - t0) * topk + j] = r;
      }
    std::vector<ExpertGroup> groups;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t count = start[e + 1] - start[e];
      if (count) groups.push_back({e, start[e], count, count <= kFusedMaxTokens, 0});
    }

    // 1. gate_up
    h.resize(rows_total * I2);
    if (q8) {
      if (x_bf16)
        q8_pack_inputs(groups, static_cast<const bf16_t*>(x), H, tok.data(), qbuf);
      else
        q8_pack_inputs(groups, static_cast<const float*>(x), H, tok.data(), qbuf);
      q8_expert_projection(q8_kind(isa), groups, gub, gus, I2, H, qbuf.data(), h.data(), I2);
    } else {
      if (x_bf16)
        pack_inputs(kind, groups, static_cast<const bf16_t*>(x), H, tok.data(), xbuf);
      else
        pack_inputs(kind, groups, static_cast<const float*>(x), H, tok.data(), xbuf);
      expert_projection(isa, kind, groups, gub, gus, I2, H, xbuf.data(),
                        h.data(), I2);
    }

    // 2. bias + SwiGLU; with bf16 activations the result is rounded to bf16 like the reference's.
    act.resize(rows_total * I);
    parallel_units(rows_total, [&](int64_t r, std::vector<float>& scratch) {
      scratch.resize(2 * I);
      float* a = act.data() + r * I;
      swiglu_row(isa, h.data() + r * I2, gbias + slot[expert_of_row[r]] * I2, scratch.data(), scratch.data() + I, a, I,
                 limit);
      if (x_bf16)
        for (int64_t i = 0; i < I; ++i) a[i] = bf16_to_f32(f32_to_bf16(a[i]));
    });

    // 3. down
    y.resize(rows_total * H);
    if (q8) {
      q8_pack_inputs(groups, act.data(), I, nullptr, qbuf);
      q8_expert_projection(q8_kind(isa), groups, dnb, dns, H, I, qbuf.data(), y.data(), H);
    } else {
      pack_inputs(kind, groups, act.data(), I, nullptr, xbuf);
      expert_projection(isa, kind, groups, dnb, dns, H, I, xbuf.data(),
                        y.data(), H);
    }

    // 4. out[t] = sum_j w[t, j] * (y_row + down bias), accumulated in slot order.
    parallel_units(nt, [&](int64_t tt, std::vector<float>&) {
      const int64_t t = t0 + tt;
      float* o = op + t * H;
      for (int64_t j = 0; j < topk; ++j) {
        const float w = wp[t * topk + j];
        const float* yr = y.data() + row_of[tt * topk + j] * H;
        const float* br = dbias + slot[ip[t * topk + j]] * H;
        for (int64_t c = 0; c < H; ++c) o[c] += w * (yr[c] + br[c]);
      }
    });
  }
}
