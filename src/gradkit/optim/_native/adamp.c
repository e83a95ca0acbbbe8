/* Fused AdamP step for one large weight on CPU, in two passes over memory (gradkit).
 *
 * The projection of row r depends on whole-tensor statistics, so no weight can be written
 * before every row has been read. Pass 1 reads p, g, m, v once: it updates m and v in place,
 * writes the unprojected direction u into a scratch buffer and returns four sums per row.
 * The caller decides the projection from those sums (channel, layer or none) and pass 2
 * reads p and u and writes p = p * factor + neg_step * (u - p * coef[r]). Pass 2 walks the
 * rows in reverse, so it starts on the rows pass 1 left in cache. Memory traffic per
 * element: read p, g, m, v and write m, v, u, then read p, u and write p.
 *
 * Both passes take a row range [begin, end), so the caller can split the rows between
 * threads. Row sums are accumulated in the tensor's dtype (in vector lanes, so float32 sums of
 * long rows stay accurate to about 1e-6) and returned as double.
 */
#include <math.h>
#include <stdint.h>

/* the body of pass 1 for row r; NUM is the numerator of the direction (Adam or Nesterov) */
#define PASS1_ROW(T, SQRT, ACC, NUM)                                                       \
    {                                                                                      \
        const T* pr = p + r * cols; const T* gr = g + r * cols;                           \
        T* mr = m + r * cols; T* vr = v + r * cols; T* ur = u + r * cols;                 \
        ACC pp = 0, gg = 0, gp = 0, pu = 0;                                                \
        _Pragma("omp simd reduction(+:pp,gg,gp,pu)")                                      \
        for (int64_t j = 0; j < cols; j++) {                                               \
            T gj = gr[j] * s_;                                                             \
            T mj = mr[j] + (gj - mr[j]) * b1c_;                                           \
            T vj = vr[j] * b2_ + gj * gj * b2c_;                                          \
            mr[j] = mj;                                                                    \
            vr[j] = vj;                                                                    \
            T uj = (NUM) / (SQRT(vj) * rb2_ + eps_);                                      \
            ur[j] = uj;                                                                    \
            T pj = pr[j];                                                                  \
            pp += pj * pj; gg += gj * gj; gp += gj * pj; pu += pj * uj;                   \
        }                                                                                  \
        sums[r] = pp; sums[rows + r] = gg; sums[2 * rows + r] = gp;                        \
        sums[3 * rows + r] = pu;                                                           \
    }

#define DEFINE_ADAMP(T, SQRT, ACC)                                                         \
void adamp_pass1_##T(int64_t begin, int64_t end, int64_t rows, int64_t cols,               \
                     const T* p, const T* g, T* m, T* v, T* u, double* sums,               \
                     double sign, double b1c, double b2, double b2c, double rb2,           \
                     double eps, int nesterov) {                                           \
    const T s_ = (T)sign, b1c_ = (T)b1c, b2_ = (T)b2, b2c_ = (T)b2c, rb2_ = (T)rb2,      \
            eps_ = (T)eps;                                                                 \
    if (nesterov) {                                                                        \
        for (int64_t r = begin; r < end; r++) PASS1_ROW(T, SQRT, ACC, mj + (gj - mj) * b1c_) \
    } else {                                                                               \
        for (int64_t r = begin; r < end; r++) PASS1_ROW(T, SQRT, ACC, mj)                  \
    }                                                                                      \
}                                                                                          \
void adamp_pass2_##T(int64_t begin, int64_t end, int64_t cols, T* p, const T* u,          \
                     const double* coef, double factor, double neg_step) {                 \
    const T f_ = (T)factor, s_ = (T)neg_step;                                              \
    for (int64_t r = end - 1; r >= begin; r--) {                                           \
        T* pr = p + r * cols; const T* ur = u + r * cols; const T c = (T)coef[r];         \
        _Pragma("omp simd")                                                                \
        for (int64_t j = 0; j < cols; j++) {                                               \
            T pj = pr[j];                                                                  \
            pr[j] = pj * f_ + s_ * (ur[j] - pj * c);                                       \
        }                                                                                  \
    }                                                                                      \
}

DEFINE_ADAMP(float, sqrtf, float)
DEFINE_ADAMP(double, sqrt, double)

/* The projection decision from pass 1's row sums (as gradkit.optim._projection._tests and
 * _coefficients, in double): fills coef[r] with the coefficient of p removed from row r's
 * direction (0 when not projected) and returns 1 if the weight is projected. The channel
 * view (rows) is tried first, the layer view (the whole weight) if it fails. */
int adamp_decide(int64_t rows, int64_t cols, const double* sums, double* coef,
                 double delta_sq, double eps) {
    const double* pp = sums; const double* gg = sums + rows;
    const double* gp = sums + 2 * rows; const double* pu = sums + 3 * rows;
    double max_cos_sq_d = 0, pl_sq = 0, gl_sq = 0, gp_all = 0, pu_all = 0;
    for (int64_t r = 0; r < rows; r++) {
        double pn = sqrt(pp[r]), gn = sqrt(gg[r]);
        double cos = fabs(gp[r]) / (fmax(gn, eps) * fmax(pn, eps));
        double c2d = cos * cos * (double)cols;
        if (c2d > max_cos_sq_d || isnan(c2d)) max_cos_sq_d = c2d;  /* NaN fails the test */
        pl_sq += pn * pn; gl_sq += gn * gn; gp_all += gp[r]; pu_all += pu[r];
    }
    if (max_cos_sq_d < delta_sq) {
        for (int64_t r = 0; r < rows; r++) {
            double d = sqrt(pp[r]) + eps;
            coef[r] = pu[r] / (d * d);
        }
        return 1;
    }
    double pl = sqrt(pl_sq), gl = sqrt(gl_sq);
    double cos_l = fabs(gp_all) / (fmax(gl, eps) * fmax(pl, eps));
    int layer = cos_l * cos_l * (double)(rows * cols) < delta_sq;
    double c = layer ? pu_all / ((pl + eps) * (pl + eps)) : 0.0;
    for (int64_t r = 0; r < rows; r++) coef[r] = c;
    return layer;
}
