/* The oscillation tracker's per-step update in one pass (oscqat/oscillation.py is the reference).
 *
 * On a CPU the tracker's sparse update is a chain of some thirty small torch ops (compare,
 * nonzero, gathers, scatters), and each op's dispatch costs more than its work: about 0.1% of
 * the integers move per step. These loops do the same arithmetic in the same float32 order, so
 * the result is bit-identical to the torch path, which stays the fallback (no compiler, another
 * device) and the reference the tests compare against.
 *
 * Built at first use by oscqat/native/__init__.py with the system C compiler, no torch headers:
 * plain pointers in, counts out. Compile with -ffp-contract=off (no fused multiply-adds) and
 * without -ffast-math: -O3 vectorises the word search and leaves every float32 operation as written.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* Sorted indices i < n where a[i] != b[i], for buffers of n_words 8-byte words of elements
 * elem_size bytes each (padding beyond n equal in both). Writes at most cap indices to out and
 * returns how many there are, so a caller with too small a buffer grows it and calls again. */
int64_t oscqat_find_moved(const uint8_t *a, const uint8_t *b, int64_t n, int64_t n_words,
                          int64_t elem_size, int64_t *out, int64_t cap) {
    int64_t count = 0;
    int64_t per_word = 8 / elem_size;
    for (int64_t w = 0; w < n_words; w += 8) {
        int64_t end = w + 8 < n_words ? w + 8 : n_words;
        if (end - w == 8) { /* a block of 8 words in one vectorisable OR of XORs: most are equal */
            uint64_t diff = 0;
            for (int k = 0; k < 8; ++k) {
                uint64_t x, y;
                memcpy(&x, a + 8 * (w + k), 8);
                memcpy(&y, b + 8 * (w + k), 8);
                diff |= x ^ y;
            }
            if (!diff)
                continue;
        }
        for (int64_t u = w; u < end; ++u) {
            uint64_t x, y;
            memcpy(&x, a + 8 * u, 8);
            memcpy(&y, b + 8 * u, 8);
            if (x == y)
                continue;
            for (int64_t k = 0; k < per_word; ++k) {
                int64_t i = u * per_word + k;
                if (i < n && memcmp(a + i * elem_size, b + i * elem_size, (size_t)elem_size) != 0) {
                    if (count < cap)
                        out[count] = i;
                    ++count;
                }
            }
        }
    }
    return count;
}

static inline float clampf_nan(float g, float lo, float hi) {
    /* torch.clamp: NaN stays NaN */
    return g < lo ? lo : (g > hi ? hi : g);
}

/* The update of OscillationTracker._update (and _attribute with live=True) at the sorted
 * indices moved[0..n_moved): elem_size selects int8 or int16 integers.
 *
 * Attribution (attribute != 0, layers whose attributable[l] is set): this forward's weight
 * under the previous scale, round(clamp(w / s_prev)), compared with the previous integer;
 * *n_same counts the matches (scale-driven changes), *n_attributed the indices looked at.
 * Then for every moved index: direction = sign(cur - prev), oscillation where it reverses the
 * last direction (osc_out), freq += m/decay there, and the integer EMA's deviation is updated.
 */
void oscqat_update_moved(const int64_t *moved, int64_t n_moved, int64_t elem_size,
                         const void *cur_v, void *prev_v, float *freq, float *last_dir,
                         float *ema_dev, uint8_t *osc_out, float m_over_decay, float old_decay,
                         int64_t attribute, const float *flat_w, const float *s_prev,
                         const int64_t *starts, const int64_t *wshift, const int64_t *per_scale,
                         const int64_t *scale_starts, const float *lo, const float *hi,
                         const uint8_t *attributable, int64_t n_layers, int64_t *n_same,
                         int64_t *n_attributed) {
    const int8_t *cur8 = (const int8_t *)cur_v;
    int8_t *prev8 = (int8_t *)prev_v;
    const int16_t *cur16 = (const int16_t *)cur_v;
    int16_t *prev16 = (int16_t *)prev_v;
    int64_t same = 0, looked = 0;
    int64_t layer = 0;
    for (int64_t j = 0; j < n_moved; ++j) {
        int64_t i = moved[j];
        float now, old;
        if (elem_size == 1) {
            now = (float)cur8[i];
            old = (float)prev8[i];
        } else {
            now = (float)cur16[i];
            old = (float)prev16[i];
        }
        if (attribute) {
            while (layer + 1 < n_layers && starts[layer + 1] <= i)
                ++layer;
            if (attributable[layer]) {
                int64_t local = i - starts[layer];
                int64_t entry = local / per_scale[layer] + scale_starts[layer];
                float g = flat_w[i + wshift[layer]] / s_prev[entry];
                g = rintf(clampf_nan(g, lo[layer], hi[layer]));
                same += (g == old);
                ++looked;
            }
        }
        float step = now - old;
        if (elem_size == 1)
            prev8[i] = cur8[i];
        else
            prev16[i] = cur16[i];
        float direction = step > 0.0f ? 1.0f : (step < 0.0f ? -1.0f : 0.0f);
        uint8_t osc = direction * last_dir[i] < 0.0f;
        osc_out[j] = osc;
        /* index_add_ of osc * (m / decay): adding 0.0f leaves a non-negative frequency as it is */
        freq[i] = freq[i] + (osc ? m_over_decay : 0.0f);
        last_dir[i] = direction;
        ema_dev[i] = ema_dev[i] - step / old_decay;
    }
    *n_same = same;
    *n_attributed = looked;
}

/* Freeze candidates of OscillationTracker.step: the moved indices that oscillated (osc[j]) and
 * whose scaled frequency now exceeds threshold (compared in float32, as torch compares a
 * float32 tensor with a Python float). Writes them, sorted, to out; returns how many. */
int64_t oscqat_candidates(const int64_t *moved, int64_t n_moved, const uint8_t *osc, const float *freq,
                          float threshold, int64_t *out) {
    int64_t count = 0;
    for (int64_t j = 0; j < n_moved; ++j)
        if (osc[j] && freq[moved[j]] > threshold)
            out[count++] = moved[j];
    return count;
}

/* OscillationTracker._freeze at the sorted indices idx[0..k): each integer is pinned at its
 * rounded integer EMA, round(prev + ema_dev * decay) clamped to its layer's grid; its frequency
 * and direction restart at 0, the mask and frozen integer are set, prev takes the pinned
 * integer and ema_dev keeps the EMA itself. The weights' latent values are appended to the pin
 * store (pin_pos, pin_latent: room for k more), each index's position within its layer goes
 * to local_out and each layer's count of new entries to layer_counts (zeroed here). */
void oscqat_freeze(const int64_t *idx, int64_t k, int64_t elem_size, void *prev_v, float *ema_dev, float decay,
                   float *freq, float *last_dir, uint8_t *frozen_mask, int8_t *frozen_int,
                   const int64_t *starts, const int64_t *wshift, const float *lo, const float *hi,
                   int64_t n_layers, const float *flat_w, int64_t *pin_pos, float *pin_latent,
                   float *targets_out, int64_t *local_out, int64_t *layer_counts) {
    int8_t *prev8 = (int8_t *)prev_v;
    int16_t *prev16 = (int16_t *)prev_v;
    int64_t layer = 0;
    memset(layer_counts, 0, (size_t)n_layers * sizeof(int64_t));
    for (int64_t j = 0; j < k; ++j) {
        int64_t i = idx[j];
        while (layer + 1 < n_layers && starts[layer + 1] <= i)
            ++layer;
        float old = elem_size == 1 ? (float)prev8[i] : (float)prev16[i];
        float t = rintf(old + ema_dev[i] * decay);
        t = clampf_nan(t, lo[layer], hi[layer]);
        freq[i] = 0.0f;
        last_dir[i] = 0.0f;
        frozen_mask[i] = 1;
        frozen_int[i] = (int8_t)t;
        if (elem_size == 1)
            prev8[i] = (int8_t)t;
        else
            prev16[i] = (int16_t)t;
        ema_dev[i] = ema_dev[i] - (t - old) / decay;
        int64_t w = i + wshift[layer];
        pin_pos[j] = w;
        pin_latent[j] = flat_w[w];
        targets_out[j] = t;
        local_out[j] = i - starts[layer];
        ++layer_counts[layer];
    }
}

/* OscillationTracker._pin: every frozen weight back to its pinned latent value. */
void oscqat_pin(float *flat_w, const int64_t *pos, const float *latent, int64_t n) {
    for (int64_t j = 0; j < n; ++j)
        flat_w[pos[j]] = latent[j];
}
