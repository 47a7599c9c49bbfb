/* counter.c: the cycle counter, its calibration, and the timed replay of a workload.
 *
 * Rule: rdtsc when the CPU has an invariant TSC (constant_tsc and nonstop_tsc in
 * /proc/cpuinfo), CLOCK_MONOTONIC nanoseconds elsewhere; ticks per second measured once
 * against CLOCK_MONOTONIC over >= 20 ms.  A replay times each call between two counter
 * reads (the get_cycles() pair of the 2020 measurements).  No lock: GIL held, except
 * while calibrating (released when the caller allows).
 */
#include "dmarw.h"

#include <stdio.h>
#include <time.h>

int use_tsc;
static double tsc_hz_cached;

uint64_t
now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

int
cpu_has_invariant_tsc(void)
{
#if HAVE_RDTSC
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (f == NULL)
        return 0;
    char line[4096];
    int constant = 0, nonstop = 0;
    while (fgets(line, sizeof line, f) != NULL) {
        if (strncmp(line, "flags", 5) != 0)
            continue;
        constant = strstr(line, " constant_tsc") != NULL;
        nonstop = strstr(line, " nonstop_tsc") != NULL;
        break;
    }
    fclose(f);
    return constant && nonstop;
#else
    return 0;
#endif
}

PyObject *
py_cycles(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyLong_FromUnsignedLongLong(read_cycles());
}

PyObject *
py_counter_kind(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyUnicode_FromString(use_tsc ? "rdtsc" : "clock_monotonic");
}

/* Counter ticks per second: measured once against CLOCK_MONOTONIC over >= 20 ms.
 * nogil: release the GIL while measuring (callers that hold it may say no). */
double
calibrate(int nogil)
{
    if (!use_tsc)
        return 1e9;
    if (tsc_hz_cached == 0.0) {
        uint64_t t0, c0, t1, c1;
        PyThreadState *ts = nogil ? PyEval_SaveThread() : NULL;
        t0 = now_ns();
        c0 = read_cycles();
        do {
            t1 = now_ns();
            c1 = read_cycles();
        } while (t1 - t0 < 20000000u);
        if (ts != NULL)
            PyEval_RestoreThread(ts);
        tsc_hz_cached = (double)(c1 - c0) * 1e9 / (double)(t1 - t0);
    }
    return tsc_hz_cached;
}

PyObject *
py_tsc_hz(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyFloat_FromDouble(calibrate(1));
}

/* The records of a replay: u8 write flags, u64 addresses, u32 sizes (the lab's Records
 * arrays), the data buffer, and optionally a u64 per record for each call's ticks. */


void
records_release(Records *r)
{
    if (r->have_d)
        PyBuffer_Release(&r->d);
    if (r->got >= 4)
        PyBuffer_Release(&r->b);
    if (r->got >= 3)
        PyBuffer_Release(&r->sz);
    if (r->got >= 2)
        PyBuffer_Release(&r->a);
    if (r->got >= 1)
        PyBuffer_Release(&r->w);
    r->got = 0;
    r->have_d = 0;
}

int
records_get(Records *r, PyObject *ow, PyObject *oa, PyObject *os, PyObject *ob, PyObject *od)
{
    memset(r, 0, sizeof *r);
    if (PyObject_GetBuffer(ow, &r->w, PyBUF_SIMPLE) < 0)
        return -1;
    r->got = 1;
    if (PyObject_GetBuffer(oa, &r->a, PyBUF_SIMPLE) < 0)
        goto fail;
    r->got = 2;
    if (PyObject_GetBuffer(os, &r->sz, PyBUF_SIMPLE) < 0)
        goto fail;
    r->got = 3;
    if (PyObject_GetBuffer(ob, &r->b, PyBUF_WRITABLE) < 0)
        goto fail;
    r->got = 4;
    r->n = r->w.len;
    if (r->a.len != 8 * r->n || r->sz.len != 4 * r->n) {
        PyErr_SetString(PyExc_ValueError, "replay: writes (u8), addrs (u64), sizes (u32) differ in length");
        goto fail;
    }
    if (od != NULL && od != Py_None) {
        if (PyObject_GetBuffer(od, &r->d, PyBUF_WRITABLE) < 0)
            goto fail;
        r->have_d = 1;
        if (r->d.len != 8 * r->n || ((uintptr_t)r->d.buf & 7u) != 0) {
            PyErr_SetString(PyExc_ValueError, "replay: deltas must be one aligned u64 per record");
            goto fail;
        }
    }
    const uint32_t *si = (const uint32_t *)r->sz.buf;
    for (Py_ssize_t i = 0; i < r->n; i++) {
        if ((Py_ssize_t)si[i] > r->b.len) {
            PyErr_Format(PyExc_ValueError, "replay: record %zd size %u outside the buffer", i, si[i]);
            goto fail;
        }
    }
    return 0;
fail:
    records_release(r);
    return -1;
}


/* Run every record through one(target, ...), each call between two counter reads (the
 * get_cycles() pair of the 2020 measurements); the first failing call raises. */
PyObject *
replay_records(Records *r, ReplayOne one, PyObject *target)
{
    const uint8_t *wf = (const uint8_t *)r->w.buf;
    const uint64_t *ad = (const uint64_t *)r->a.buf;
    const uint32_t *si = (const uint32_t *)r->sz.buf;
    uint64_t *dl = r->have_d ? (uint64_t *)r->d.buf : NULL;
    unsigned long long rc = 0, wc = 0, rn = 0, wn = 0;
    for (Py_ssize_t i = 0; i < r->n; i++) {
        Py_buffer v = r->b;
        v.len = si[i];
        uint64_t t0 = read_cycles();
        PyObject *res = one(target, ad[i], &v, wf[i]);
        uint64_t t1 = read_cycles();
        if (res == NULL)
            return NULL;
        Py_DECREF(res);
        if (dl != NULL)
            dl[i] = t1 - t0;
        if (wf[i]) {
            wc += t1 - t0;
            wn++;
        } else {
            rc += t1 - t0;
            rn++;
        }
    }
    return Py_BuildValue("(KKKK)", rc, rn, wc, wn);
}

/* A core's replay(writes, addrs, sizes, buf, deltas=None) -> (read_cycles, reads,
 * write_cycles, writes): the records through one(target, ...), each call timed; refused
 * while the core's table is not installed (ready == 0). */
PyObject *
replay_method(PyObject *target, int ready, PyObject *args, ReplayOne one)
{
    PyObject *ow, *oa, *os, *ob, *od = NULL;
    if (!PyArg_ParseTuple(args, "OOOO|O:replay", &ow, &oa, &os, &ob, &od))
        return NULL;
    if (!ready)
        return core_not_ready();
    Records r;
    if (records_get(&r, ow, oa, os, ob, od) < 0)
        return NULL;
    PyObject *ret = replay_records(&r, one, target);
    records_release(&r);
    return ret;
}

/* timer_overhead(samples) -> median cycles of one back-to-back counter pair. */
PyObject *
py_timer_overhead(PyObject *self, PyObject *arg)
{
    (void)self;
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (n < 1 || n > 1000000) {
        PyErr_SetString(PyExc_ValueError, "samples must be 1..1000000");
        return NULL;
    }
    uint64_t *d = PyMem_Malloc((size_t)n * sizeof(uint64_t));
    if (d == NULL)
        return PyErr_NoMemory();
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t t0 = read_cycles();
        uint64_t t1 = read_cycles();
        d[i] = t1 - t0;
    }
    /* median by counting sort over a small range, else a partial selection */
    uint64_t lo = d[0];
    for (Py_ssize_t i = 1; i < n; i++)
        lo = d[i] < lo ? d[i] : lo;
    Py_ssize_t counts[1024] = {0};
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t k = d[i] - lo;
        counts[k < 1023 ? k : 1023]++;
    }
    PyMem_Free(d);
    Py_ssize_t acc = 0, k = 0;
    for (; k < 1024; k++) {
        acc += counts[k];
        if (2 * acc >= n)
            break;
    }
    return PyLong_FromUnsignedLongLong(lo + (uint64_t)k);
}

