// membw.c -- measures the machine's read bandwidth: T threads sum disjoint slices of a 1 GiB
// buffer with 512/256-bit loads, best of 10 passes. Build: cc -O3 -march=native -pthread dev/membw.c -o build/membw
#include <immintrin.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static size_t g_n;
static float *g_buf;
static int    g_nt;
static volatile double g_sink[64]; // volatile: keeps the loads alive

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void *worker(void *arg) {
    int    t  = (int)(intptr_t)arg;
    size_t lo = g_n / g_nt * t, hi = t == g_nt - 1 ? g_n : g_n / g_nt * (t + 1);
#if defined(__AVX512F__)
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (size_t i = lo; i + 64 <= hi; i += 64) {
        a0 = _mm512_add_ps(a0, _mm512_load_ps(g_buf + i));
        a1 = _mm512_add_ps(a1, _mm512_load_ps(g_buf + i + 16));
        a2 = _mm512_add_ps(a2, _mm512_load_ps(g_buf + i + 32));
        a3 = _mm512_add_ps(a3, _mm512_load_ps(g_buf + i + 48));
    }
    g_sink[t] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#else
    float s = 0;
    for (size_t i = lo; i < hi; i++) s += g_buf[i];
    g_sink[t] = s;
#endif
    return NULL;
}

int main(int argc, char **argv) {
    g_nt  = argc > 1 ? atoi(argv[1]) : 2;
    g_n   = (size_t)1 << 28; // 1 GiB of floats
    g_buf = aligned_alloc(64, g_n * sizeof(float));
    memset(g_buf, 1, g_n * sizeof(float));
    double best = 1e9;
    for (int rep = 0; rep < 10; rep++) {
        pthread_t th[64];
        double    t0 = now();
        for (int t = 0; t < g_nt; t++) pthread_create(&th[t], NULL, worker, (void *)(intptr_t)t);
        for (int t = 0; t < g_nt; t++) pthread_join(th[t], NULL);
        double dt = now() - t0;
        if (dt < best) best = dt;
    }
    printf("threads %d: read %.2f GB/s (best of 10, 1 GiB)\n", g_nt, g_n * sizeof(float) / best / 1e9);
    return 0;
}
