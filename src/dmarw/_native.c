/* dmarw._native: the hot path of dmarw in C11, checked against the Python core.
 *
 * Contents (each small and boring):
 *   - a cycle counter: rdtsc when the CPU has an invariant TSC (constant_tsc and
 *     nonstop_tsc in /proc/cpuinfo), CLOCK_MONOTONIC nanoseconds elsewhere;
 *   - atomic dirty bitmaps over a writable buffer of u64 words: a page range is marked with
 *     one fetch_or per word, get-and-clear is one exchange per non-zero word;
 *   - raw copies between a host virtual address and a Python buffer;
 *   - Table: an immutable native copy of a container's (or VM's) mapping snapshot;
 *   - Core: the lock (mutex, rwsem, rcu, or srcu for KVM) plus the current Table, with the
 *     one-call paths dma_rw (type1 rules) and read_guest/write_guest (KVM rules), and
 *     replay() of a recorded workload timed per call;
 *   - MmRef: the address space user count as a real atomic, and task_lock as a mutex.
 *
 * Python-side flags the rules need (the owner's exit, a region's release, whether lockstat
 * is collecting) are read from the objects' dicts and cached until the dict's version tag
 * changes.  Every acquisition is counted in the same dmarw.lockstat classes as the Python
 * locks.  Everything here runs with the GIL held except the copies and any wait.
 *
 * Memory safety: a Table holds a buffer export on every mapping's mmap object, so the
 * memory it points at cannot be unmapped while the Table lives (mmap.close() refuses with
 * BufferError).  A reader takes a strong reference to the Table under the GIL before it
 * may drop the GIL for a large copy.  The grace period (rcu/srcu) or the lock
 * (mutex/rwsem) makes unmap wait for readers, so after unmap returns no access reaches the
 * old mapping.
 *
 * The GIL is released around copies of at least gil_threshold bytes, chosen by
 * measurement (bench/native.py) and settable with set_gil_threshold().
 */
#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <linux/futex.h>
#include <linux/membarrier.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <x86intrin.h>
#define HAVE_RDTSC 1
#else
#define HAVE_RDTSC 0
#endif

#define PROT_R 1
#define PROT_W 2
#define KVM_PAGE 4096u

enum { LOCK_MUTEX = 0, LOCK_RWSEM = 1, LOCK_RCU = 2, LOCK_SRCU = 3 };
enum { MM_MMGET_NOT_ZERO = 0, MM_GET_TASK_MM = 1 };

static PyObject *error_type;      /* dmarw.DmaError, set by set_error_type() */
static PyObject *str_exited;      /* "_exited" */
static PyObject *str_kthread;     /* "kthread" */
static PyObject *str_released;    /* "released" */
static PyObject *str_active;      /* "_active" */
static PyObject *str_timed;       /* "timed" */
static PyObject *lockstat_dict;   /* dmarw.lockstat's globals, set by set_lockstat() */
static Py_ssize_t gil_threshold = 65536;
static int use_tsc;
static double tsc_hz_cached;

/* ---- errors ------------------------------------------------------------------------ */

/* Raise dmarw.DmaError(err, message); returns NULL for the caller to return. */
static PyObject *
dma_error(int err, const char *fmt, ...)
{
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (error_type == NULL) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    PyObject *exc = PyObject_CallFunction(error_type, "is", err, msg);
    if (exc != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
    return NULL;
}

static PyObject *
set_error_type(PyObject *self, PyObject *arg)
{
    (void)self;
    if (!PyType_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "set_error_type: expected an exception type");
        return NULL;
    }
    Py_INCREF(arg);
    Py_XSETREF(error_type, arg);
    Py_RETURN_NONE;
}

static PyObject *
set_gil_threshold(PyObject *self, PyObject *arg)
{
    (void)self;
    Py_ssize_t v = PyLong_AsSsize_t(arg);
    if (v == -1 && PyErr_Occurred())
        return NULL;
    if (v < 0) {
        PyErr_SetString(PyExc_ValueError, "gil threshold must be >= 0");
        return NULL;
    }
    Py_ssize_t old = gil_threshold;
    gil_threshold = v;
    return PyLong_FromSsize_t(old);
}

/* ---- lock statistics (dmarw.lockstat) ---------------------------------------------
 * Every acquisition counts in its lock class (next() on the class's counter, as the
 * Python locks do); while a lockstat.collect() block is open (lockstat._active > 0) the
 * acquire is timed in ns and reported with LockClass.timed(ns) instead. */

static PyObject *
set_lockstat(PyObject *self, PyObject *arg)
{
    (void)self;
    if (!PyDict_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "set_lockstat: expected the lockstat module's dict");
        return NULL;
    }
    Py_INCREF(arg);
    Py_XSETREF(lockstat_dict, arg);
    Py_RETURN_NONE;
}

/* A flag read from a Python object's dict, cached until the dict changes: CPython 3.11
 * gives every dict mutation a new ma_version_tag, so an unchanged tag means an unchanged
 * value.  Read and refreshed only with the GIL held. */
typedef struct {
    uint64_t version; /* 0: nothing cached */
    int value;
} FlagCache;

static inline int
dict_flag(PyObject *dict, PyObject *name, FlagCache *fc)
{
    uint64_t ver = ((PyDictObject *)dict)->ma_version_tag;
    if (fc->version != 0 && fc->version == ver)
        return fc->value;
    PyObject *v = PyDict_GetItemWithError(dict, name);
    if (v == NULL) {
        if (PyErr_Occurred())
            return -1;
        return -2; /* not in the dict */
    }
    int r = v == Py_True ? 1 : v == Py_False ? 0 : PyObject_IsTrue(v);
    if (r >= 0) {
        fc->version = ver;
        fc->value = r;
    }
    return r;
}

static FlagCache stats_cache;

static inline int
stats_collecting(void)
{
    if (lockstat_dict == NULL)
        return 0;
    uint64_t ver = ((PyDictObject *)lockstat_dict)->ma_version_tag;
    if (stats_cache.version != 0 && stats_cache.version == ver)
        return stats_cache.value;
    PyObject *v = PyDict_GetItemWithError(lockstat_dict, str_active);
    if (v == NULL) {
        PyErr_Clear();
        return 0;
    }
    int r = PyLong_Check(v) && Py_SIZE(v) > 0;
    stats_cache.version = ver;
    stats_cache.value = r;
    return r;
}

/* Atomic (defined with the VFIO layer below): a lock class's native acquisition count. */
typedef struct {
    PyObject_HEAD
    long v; /* atomic */
} AtomicObject;

static PyTypeObject AtomicType;

typedef struct {
    PyObject *cls;   /* a dmarw.lockstat.LockClass, or NULL */
    PyObject *count; /* its itertools.count */
    AtomicObject *ncount; /* its native count (LockClass._ncount), or NULL */
} StatClass;

static int
stat_class_init(StatClass *sc, PyObject *cls)
{
    sc->cls = NULL;
    sc->count = NULL;
    sc->ncount = NULL;
    if (cls == NULL || cls == Py_None)
        return 0;
    PyObject *count = PyObject_GetAttrString(cls, "_count");
    if (count == NULL)
        return -1;
    if (Py_TYPE(count)->tp_iternext == NULL) {
        Py_DECREF(count);
        PyErr_SetString(PyExc_TypeError, "lock class counter is not an iterator");
        return -1;
    }
    PyObject *nc = PyObject_GetAttrString(cls, "_ncount");
    if (nc == NULL)
        PyErr_Clear();
    else if (!PyObject_TypeCheck(nc, &AtomicType))
        Py_CLEAR(nc);
    Py_INCREF(cls);
    sc->cls = cls;
    sc->count = count;
    sc->ncount = (AtomicObject *)nc;
    return 0;
}

static void
stat_class_clear(StatClass *sc)
{
    Py_CLEAR(sc->cls);
    Py_CLEAR(sc->count);
    Py_CLEAR(sc->ncount);
}

/* Record one acquisition: timed (counter ticks, reported to lockstat in ns) while
 * collecting, else only counted. */
static inline void
stat_hit(StatClass *sc, int collecting, uint64_t ticks);

/* ---- cycle counter ----------------------------------------------------------------- */

static uint64_t
now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static inline uint64_t
read_cycles(void)
{
#if HAVE_RDTSC
    if (use_tsc)
        return __rdtsc();
#endif
    return now_ns();
}

static int
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

static PyObject *
cycles(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyLong_FromUnsignedLongLong(read_cycles());
}

static PyObject *
counter_kind(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyUnicode_FromString(use_tsc ? "rdtsc" : "clock_monotonic");
}

/* Counter ticks per second: measured once against CLOCK_MONOTONIC over >= 20 ms.
 * nogil: release the GIL while measuring (callers that hold it may say no). */
static double
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

static PyObject *
tsc_hz(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyFloat_FromDouble(calibrate(1));
}

static void
stat_hit_slow(StatClass *sc, int collecting, uint64_t ticks)
{
    if (sc->cls == NULL)
        return;
    PyObject *r;
    if (collecting) {
        /* ns from the native counter: ticks / (ticks per ns); exact ticks when rdtsc */
        PyObject *v = PyFloat_FromDouble((double)ticks * 1e9 / calibrate(0));
        r = v ? PyObject_CallMethodOneArg(sc->cls, str_timed, v) : NULL;
        Py_XDECREF(v);
    } else if (sc->ncount != NULL) {
        /* the GIL is held: a plain load and store is exact against every other counter
         * update in this process (all made with the GIL), without a locked instruction */
        __atomic_store_n(&sc->ncount->v, __atomic_load_n(&sc->ncount->v, __ATOMIC_RELAXED) + 1,
                         __ATOMIC_RELAXED);
        return;
    } else {
        r = Py_TYPE(sc->count)->tp_iternext(sc->count);
    }
    if (r == NULL)
        PyErr_Clear(); /* statistics never fail an access */
    Py_XDECREF(r);
}

/* The untimed native count (the usual case) inline; the rest in stat_hit_slow. */
static inline void
stat_hit(StatClass *sc, int collecting, uint64_t ticks)
{
    if (!collecting && sc->ncount != NULL) {
        /* the GIL is held: a plain load and store is exact (see stat_hit_slow) */
        __atomic_store_n(&sc->ncount->v, __atomic_load_n(&sc->ncount->v, __ATOMIC_RELAXED) + 1,
                         __ATOMIC_RELAXED);
        return;
    }
    stat_hit_slow(sc, collecting, ticks);
}

/* ---- dirty bitmaps ----------------------------------------------------------------- */

/* Set bits first..last (inclusive) with one atomic fetch_or per word. */
static inline void
bits_mark(uint64_t *w, uint64_t first, uint64_t last)
{
    uint64_t fw = first >> 6, lw = last >> 6;
    uint64_t fmask = ~0ull << (first & 63);
    uint64_t lmask = ~0ull >> (63 - (last & 63));
    if (fw == lw) {
        __atomic_fetch_or(&w[fw], fmask & lmask, __ATOMIC_RELAXED);
        return;
    }
    __atomic_fetch_or(&w[fw], fmask, __ATOMIC_RELAXED);
    for (uint64_t i = fw + 1; i < lw; i++)
        __atomic_fetch_or(&w[i], ~0ull, __ATOMIC_RELAXED);
    __atomic_fetch_or(&w[lw], lmask, __ATOMIC_RELAXED);
}

static int
get_words(PyObject *obj, Py_buffer *view, int writable)
{
    if (PyObject_GetBuffer(obj, view, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0)
        return -1;
    if (view->len % 8 != 0 || ((uintptr_t)view->buf & 7u) != 0) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_ValueError, "bitmap buffer must be 8-byte aligned whole u64 words");
        return -1;
    }
    return 0;
}

static PyObject *
bitmap_mark(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "bitmap_mark(buf, first, last)");
        return NULL;
    }
    unsigned long long first = PyLong_AsUnsignedLongLong(args[1]);
    if (first == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    unsigned long long last = PyLong_AsUnsignedLongLong(args[2]);
    if (last == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    Py_buffer v;
    if (get_words(args[0], &v, 1) < 0)
        return NULL;
    uint64_t nbits = (uint64_t)v.len * 8;
    if (first > last || last >= nbits) {
        PyBuffer_Release(&v);
        PyErr_Format(PyExc_ValueError, "bitmap_mark %llu..%llu outside %llu bits", first, last,
                     (unsigned long long)nbits);
        return NULL;
    }
    bits_mark((uint64_t *)v.buf, first, last);
    PyBuffer_Release(&v);
    Py_RETURN_NONE;
}

/* Get and clear: an exchange per non-zero word; bits in keep are set again afterwards
 * (and reported).  Returns the old words as bytes (little-endian u64, the kernel layout). */
static PyObject *
bitmap_take(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    static char *kwlist[] = {"buf", "keep", NULL};
    PyObject *obj, *keep = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|O:bitmap_take", kwlist, &obj, &keep))
        return NULL;
    Py_buffer v;
    if (get_words(obj, &v, 1) < 0)
        return NULL;
    uint64_t *w = (uint64_t *)v.buf;
    Py_ssize_t nw = v.len / 8;
    uint64_t nbits = (uint64_t)nw * 64;
    PyObject *seq = NULL;
    if (keep != Py_None) {
        seq = PySequence_Fast(keep, "keep must be iterable");
        if (seq == NULL)
            goto fail;
        for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
            unsigned long long k = PyLong_AsUnsignedLongLong(PySequence_Fast_GET_ITEM(seq, i));
            if (k == (unsigned long long)-1 && PyErr_Occurred())
                goto fail;
            if (k >= nbits) {
                PyErr_Format(PyExc_ValueError, "keep bit %llu outside %llu bits", k,
                             (unsigned long long)nbits);
                goto fail;
            }
        }
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, v.len);
    if (out == NULL)
        goto fail;
    uint64_t *o = (uint64_t *)PyBytes_AS_STRING(out);
    for (Py_ssize_t i = 0; i < nw; i++) {
        uint64_t x = __atomic_load_n(&w[i], __ATOMIC_RELAXED);
        o[i] = x ? __atomic_exchange_n(&w[i], 0, __ATOMIC_ACQ_REL) : 0;
    }
    if (seq != NULL) {
        for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
            uint64_t k = PyLong_AsUnsignedLongLong(PySequence_Fast_GET_ITEM(seq, i));
            __atomic_fetch_or(&w[k >> 6], 1ull << (k & 63), __ATOMIC_RELAXED);
            o[k >> 6] |= 1ull << (k & 63);
        }
        Py_DECREF(seq);
    }
    PyBuffer_Release(&v);
    return out;
fail:
    Py_XDECREF(seq);
    PyBuffer_Release(&v);
    return NULL;
}

static PyObject *
bitmap_peek(PyObject *self, PyObject *arg)
{
    (void)self;
    Py_buffer v;
    if (get_words(arg, &v, 0) < 0)
        return NULL;
    PyObject *out = PyBytes_FromStringAndSize(NULL, v.len);
    if (out != NULL) {
        uint64_t *o = (uint64_t *)PyBytes_AS_STRING(out);
        const uint64_t *w = (const uint64_t *)v.buf;
        for (Py_ssize_t i = 0; i < v.len / 8; i++)
            o[i] = __atomic_load_n(&w[i], __ATOMIC_RELAXED);
    }
    PyBuffer_Release(&v);
    return out;
}

/* ---- raw hva copies ---------------------------------------------------------------- */

static void
copy_bytes(void *dst, const void *src, size_t n)
{
    if ((Py_ssize_t)n >= gil_threshold) {
        Py_BEGIN_ALLOW_THREADS
        memmove(dst, src, n);
        Py_END_ALLOW_THREADS
    } else {
        memmove(dst, src, n);
    }
}

/* hva_read(hva, buf): fill buf from the host address.  No checks: the caller owns hva. */
static PyObject *
hva_read(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "hva_read(hva, buf)");
        return NULL;
    }
    void *hva = PyLong_AsVoidPtr(args[0]);
    if (hva == NULL && PyErr_Occurred())
        return NULL;
    Py_buffer v;
    if (PyObject_GetBuffer(args[1], &v, PyBUF_WRITABLE) < 0)
        return NULL;
    copy_bytes(v.buf, hva, (size_t)v.len);
    PyBuffer_Release(&v);
    Py_RETURN_NONE;
}

/* hva_write(hva, data): copy data to the host address.  No checks: the caller owns hva. */
static PyObject *
hva_write(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "hva_write(hva, data)");
        return NULL;
    }
    void *hva = PyLong_AsVoidPtr(args[0]);
    if (hva == NULL && PyErr_Occurred())
        return NULL;
    Py_buffer v;
    if (PyObject_GetBuffer(args[1], &v, PyBUF_SIMPLE) < 0)
        return NULL;
    copy_bytes(hva, v.buf, (size_t)v.len);
    PyBuffer_Release(&v);
    Py_RETURN_NONE;
}

/* ---- MmRef: the address space's user count as an atomic ---------------------------- */

typedef struct {
    PyObject_HEAD
    long users; /* native users in flight (atomic) */
    pthread_mutex_t task_lock;
} MmRefObject;

static int
MmRef_init(MmRefObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    if (!PyArg_ParseTuple(args, ":MmRef") || (kwargs && PyDict_Size(kwargs))) {
        PyErr_SetString(PyExc_TypeError, "MmRef() takes no arguments");
        return -1;
    }
    return 0;
}

static PyObject *
MmRef_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    (void)args;
    (void)kwargs;
    MmRefObject *self = (MmRefObject *)type->tp_alloc(type, 0);
    if (self != NULL) {
        self->users = 0;
        pthread_mutex_init(&self->task_lock, NULL);
    }
    return (PyObject *)self;
}

static void
MmRef_dealloc(MmRefObject *self)
{
    pthread_mutex_destroy(&self->task_lock);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
MmRef_users(MmRefObject *self, void *closure)
{
    (void)closure;
    return PyLong_FromLong(__atomic_load_n(&self->users, __ATOMIC_SEQ_CST));
}

static PyGetSetDef MmRef_getset[] = {
    {"users", (getter)MmRef_users, NULL, "native users in flight", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject MmRefType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "dmarw._native.MmRef",
    .tp_basicsize = sizeof(MmRefObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The user count of one address space as a real atomic, and its task_lock.",
    .tp_new = MmRef_new,
    .tp_init = (initproc)MmRef_init,
    .tp_dealloc = (destructor)MmRef_dealloc,
    .tp_getset = MmRef_getset,
};

/* Take a mutex; if it is busy, wait without the GIL (the holder may need the GIL). */
static void
mutex_lock_nogil(pthread_mutex_t *m)
{
    if (pthread_mutex_trylock(m) == 0)
        return;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(m);
    Py_END_ALLOW_THREADS
}

/* attr_true's slow part: the dict lookup or the attribute get (cache miss). */
static int
attr_true_slow(PyObject *obj, PyObject *dict, PyObject *name, FlagCache *fc)
{
    if (dict != NULL) {
        int r = dict_flag(dict, name, fc);
        if (r != -2)
            return r;
    }
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL)
        return -1;
    int r = PyObject_IsTrue(v);
    Py_DECREF(v);
    return r;
}

/* A small futex mutex for the Core's own lock (Drepper, "Futexes are tricky", mutex 3
 * simplified): 0 free, 1 held, 2 held and maybe waited for.  Uncontended, one locked
 * compare-exchange to take and one locked exchange to drop, as the pthread mutex, without
 * its calls and type/owner bookkeeping.  Process-private. */
static inline int
fmutex_trylock(unsigned *m)
{
    unsigned z = 0;
    return __atomic_compare_exchange_n(m, &z, 1, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED);
}

/* Take the futex mutex; if it is busy, wait without the GIL (the holder may need it). */
static inline void
fmutex_lock_nogil(unsigned *m)
{
    if (fmutex_trylock(m))
        return;
    Py_BEGIN_ALLOW_THREADS
    while (__atomic_exchange_n(m, 2, __ATOMIC_ACQUIRE) != 0)
        syscall(SYS_futex, m, FUTEX_WAIT_PRIVATE, 2, NULL, NULL, 0);
    Py_END_ALLOW_THREADS
}

static inline void
fmutex_unlock(unsigned *m)
{
    if (__atomic_exchange_n(m, 0, __ATOMIC_RELEASE) == 2)
        syscall(SYS_futex, m, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
}

/* 1 if the Python attribute is true, 0 if false, -1 on error.  ``dict`` is the object's
 * instance dict when known (a plain dict lookup, the common case), else NULL.  The cached
 * case (the dict unchanged since the last read) is inline: one load and two compares. */
static inline int
attr_true(PyObject *obj, PyObject *dict, PyObject *name, FlagCache *fc)
{
    if (dict != NULL && fc->version != 0 && fc->version == ((PyDictObject *)dict)->ma_version_tag)
        return fc->value;
    return attr_true_slow(obj, dict, name, fc);
}

/* get_task_mm on the native count: the task lock (counted in its class), the exit and
 * kthread checks, the count.  1 counted, 0 refused, -1 error. */
static int
mm_get_task(MmRefObject *mm, PyObject *space, PyObject *space_dict, FlagCache *fc, StatClass *task_stat)
{
    int coll = stats_collecting();
    uint64_t t0 = coll ? read_cycles() : 0;
    mutex_lock_nogil(&mm->task_lock);
    uint64_t waited = coll ? read_cycles() - t0 : 0;
    int exited = attr_true(space, space_dict, str_exited, &fc[0]);
    int kthread = exited == 0 ? attr_true(space, space_dict, str_kthread, &fc[1]) : 0;
    int ok = exited == 0 && kthread == 0;
    if (ok)
        __atomic_fetch_add(&mm->users, 1, __ATOMIC_ACQUIRE);
    pthread_mutex_unlock(&mm->task_lock);
    stat_hit(task_stat, coll, waited);
    if (exited < 0 || kthread < 0)
        return -1;
    return ok;
}

/* mmget_not_zero / get_task_mm on the native count: 1 counted, 0 refused, -1 error.
 * mmget_not_zero is inline: the cached exit check and one locked add. */
static inline int
mm_get(MmRefObject *mm, PyObject *space, PyObject *space_dict, FlagCache *fc, int mode,
       StatClass *task_stat)
{
    if (mode == MM_GET_TASK_MM)
        return mm_get_task(mm, space, space_dict, fc, task_stat);
    int exited = attr_true(space, space_dict, str_exited, &fc[0]);
    if (exited != 0)
        return exited < 0 ? -1 : 0;
    __atomic_fetch_add(&mm->users, 1, __ATOMIC_ACQUIRE);
    return 1;
}

static void
mm_put(MmRefObject *mm)
{
    __atomic_fetch_sub(&mm->users, 1, __ATOMIC_RELEASE);
}

/* ---- Table: one immutable snapshot of mappings ------------------------------------ */

typedef struct {
    uint64_t start; /* iova or gpa */
    uint64_t size;
    char *mem; /* host memory of start, or NULL when the backing is already gone */
    int prot;
    int have_view;
    int have_bits;
    Py_buffer view;  /* export on the region's mmap: keeps the memory mapped */
    Py_buffer bview; /* export on the dirty bitmap's words */
    PyObject *region; /* for the released flag */
    PyObject *region_dict; /* its instance dict (fast flag reads), or NULL */
    PyObject *space;  /* owner's address space, or NULL (KVM) */
    PyObject *space_dict; /* its instance dict, or NULL */
    FlagCache released_fc;  /* region.released */
    FlagCache space_fc[2];  /* space._exited, space.kthread */
    MmRefObject *mm;  /* its native user count, or NULL (KVM) */
} Entry;

typedef struct {
    PyObject_HEAD
    Py_ssize_t n;
    Entry *e;
} TableObject;

static void
Table_clear_entries(TableObject *t)
{
    for (Py_ssize_t i = 0; i < t->n; i++) {
        Entry *e = &t->e[i];
        if (e->have_view)
            PyBuffer_Release(&e->view);
        if (e->have_bits)
            PyBuffer_Release(&e->bview);
        Py_XDECREF(e->region);
        Py_XDECREF(e->region_dict);
        Py_XDECREF(e->space);
        Py_XDECREF(e->space_dict);
        Py_XDECREF((PyObject *)e->mm);
    }
    PyMem_Free(t->e);
    t->e = NULL;
    t->n = 0;
}

static void
Table_dealloc(TableObject *self)
{
    Table_clear_entries(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The object's instance dict (materialised once; later attribute stores land in it), or
 * NULL when it has none. */
static PyObject *
instance_dict(PyObject *obj)
{
    if (PyObject_HasAttrString(obj, "__dict__") == 0)
        return NULL;
    PyObject *d = PyObject_GenericGetDict(obj, NULL);
    if (d == NULL || !PyDict_Check(d)) {
        PyErr_Clear();
        Py_XDECREF(d);
        return NULL;
    }
    return d;
}

/* Table(entries): each entry is a tuple
 *   (start, size, map, offset, prot, bitmap_words_or_None, region, space_or_None, mmref_or_None)
 * sorted by start, non-overlapping.  A map that can no longer export its buffer (closed)
 * makes an entry whose accesses fail with EFAULT. */
static PyObject *
Table_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"entries", NULL};
    PyObject *entries;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O:Table", kwlist, &entries))
        return NULL;
    PyObject *seq = PySequence_Fast(entries, "Table: entries must be a sequence");
    if (seq == NULL)
        return NULL;
    TableObject *t = (TableObject *)type->tp_alloc(type, 0);
    if (t == NULL) {
        Py_DECREF(seq);
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    t->e = PyMem_Calloc((size_t)(n ? n : 1), sizeof(Entry));
    if (t->e == NULL) {
        Py_DECREF(seq);
        Py_DECREF(t);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        unsigned long long start, size;
        PyObject *map, *bits, *region, *space, *mm;
        Py_ssize_t offset;
        int prot;
        if (!PyArg_ParseTuple(item, "KKOniOOOO:Table entry", &start, &size, &map, &offset, &prot,
                              &bits, &region, &space, &mm))
            goto fail;
        Entry *e = &t->e[i];
        t->n = i + 1;
        e->start = start;
        e->size = size;
        e->prot = prot;
        Py_INCREF(region);
        e->region = region;
        e->region_dict = instance_dict(region);
        if (size == 0 || start + size - 1 < start ||
            (i > 0 && start < t->e[i - 1].start + t->e[i - 1].size)) {
            PyErr_SetString(PyExc_ValueError, "Table: entries must be sorted, non-empty, disjoint");
            goto fail;
        }
        if (space != Py_None) {
            if (!PyObject_TypeCheck(mm, &MmRefType)) {
                PyErr_SetString(PyExc_TypeError, "Table: a space needs its MmRef");
                goto fail;
            }
            Py_INCREF(space);
            e->space = space;
            e->space_dict = instance_dict(space);
            Py_INCREF(mm);
            e->mm = (MmRefObject *)mm;
        }
        if (PyObject_GetBuffer(map, &e->view, PyBUF_SIMPLE) == 0) {
            e->have_view = 1;
            if (offset < 0 || (uint64_t)offset + size > (uint64_t)e->view.len) {
                PyErr_SetString(PyExc_ValueError, "Table: mapping outside its region");
                goto fail;
            }
            e->mem = (char *)e->view.buf + offset;
        } else {
            PyErr_Clear(); /* a closed mmap: accesses fail with EFAULT */
        }
        if (bits != Py_None) {
            if (get_words(bits, &e->bview, 1) < 0)
                goto fail;
            e->have_bits = 1;
        }
    }
    Py_DECREF(seq);
    return (PyObject *)t;
fail:
    Py_DECREF(seq);
    Py_DECREF(t);
    return NULL;
}

static PyObject *
Table_len(TableObject *self, void *closure)
{
    (void)closure;
    return PyLong_FromSsize_t(self->n);
}

static PyGetSetDef Table_getset[] = {
    {"n", (getter)Table_len, NULL, "number of mappings", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject TableType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "dmarw._native.Table",
    .tp_basicsize = sizeof(TableObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "An immutable native snapshot of mappings (built on every publish).",
    .tp_new = Table_new,
    .tp_dealloc = (destructor)Table_dealloc,
    .tp_getset = Table_getset,
};

/* The entry containing addr, or NULL (binary search). */
static inline Entry *
table_find(TableObject *t, uint64_t addr)
{
    Py_ssize_t lo = 0, hi = t->n;
    while (lo < hi) {
        Py_ssize_t mid = lo + (hi - lo) / 2;
        if (t->e[mid].start <= addr)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo == 0)
        return NULL;
    Entry *e = &t->e[lo - 1];
    return addr - e->start < e->size ? e : NULL;
}

/* ---- RCU: one process-wide domain, readers as cheap as the kernel's -----------------
 * A reader stores the grace-period counter it started in into its thread's slot and, on
 * unlock, stores 0: no atomic read-modify-write, no shared cache line.  A writer, after
 * publishing, advances the counter, issues membarrier(PRIVATE_EXPEDITED) — a full barrier
 * on every running thread of the process, so a reader's slot store can no longer hide in
 * its store buffer — and waits until no slot holds a counter from before the advance
 * (liburcu's "memb" flavour).  Without membarrier a reader issues a full fence instead.
 * Slots are never freed (a thread's slot is reused after it exits), so a writer walks the
 * list without a lock.  Readers nest (a per-slot depth). */

typedef struct RcuSlot {
    unsigned long ctr; /* 0 outside a read section, else the counter at entry (atomic) */
    int nest;          /* owner thread only */
    int owned;         /* under rcu_reg_lock */
    struct RcuSlot *next;
} RcuSlot;

static RcuSlot *rcu_slots;           /* list head, pushed under rcu_reg_lock */
static pthread_mutex_t rcu_reg_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t rcu_gp_lock = PTHREAD_MUTEX_INITIALIZER;
static unsigned long rcu_gp = 1;     /* grace-period counter (atomic) */
static pthread_key_t rcu_key;
static _Thread_local RcuSlot *rcu_my_slot __attribute__((tls_model("initial-exec")));
static int have_membarrier;

static void
rcu_thread_exit(void *p)
{
    RcuSlot *s = p;
    __atomic_store_n(&s->ctr, 0, __ATOMIC_RELEASE);
    pthread_mutex_lock(&rcu_reg_lock);
    s->nest = 0;
    s->owned = 0;
    pthread_mutex_unlock(&rcu_reg_lock);
}

static void
rcu_after_fork_child(void)
{
    /* only the forking thread exists in the child: every other slot is idle */
    for (RcuSlot *s = rcu_slots; s != NULL; s = s->next) {
        if (s != rcu_my_slot) {
            s->ctr = 0;
            s->nest = 0;
            s->owned = 0;
        }
    }
    pthread_mutex_init(&rcu_reg_lock, NULL);
    pthread_mutex_init(&rcu_gp_lock, NULL);
    if (have_membarrier &&
        syscall(__NR_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED, 0, 0) != 0)
        have_membarrier = 0;
}

static int
rcu_init(void)
{
    if (pthread_key_create(&rcu_key, rcu_thread_exit) != 0)
        return -1;
    long q = syscall(__NR_membarrier, MEMBARRIER_CMD_QUERY, 0, 0);
    have_membarrier = q > 0 && (q & MEMBARRIER_CMD_PRIVATE_EXPEDITED) &&
                      syscall(__NR_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED, 0, 0) == 0;
    pthread_atfork(NULL, NULL, rcu_after_fork_child);
    return 0;
}

static RcuSlot *
rcu_slot(void)
{
    RcuSlot *s = rcu_my_slot;
    if (s != NULL)
        return s;
    pthread_mutex_lock(&rcu_reg_lock); /* held briefly, never across the GIL */
    for (s = rcu_slots; s != NULL; s = s->next)
        if (!s->owned)
            break;
    if (s == NULL) {
        s = calloc(1, sizeof *s);
        if (s == NULL) {
            pthread_mutex_unlock(&rcu_reg_lock);
            return NULL;
        }
        s->next = rcu_slots;
        __atomic_store_n(&rcu_slots, s, __ATOMIC_RELEASE);
    }
    s->owned = 1;
    s->nest = 0;
    pthread_mutex_unlock(&rcu_reg_lock);
    rcu_my_slot = s;
    pthread_setspecific(rcu_key, s);
    return s;
}

/* 0, or -1 (out of memory: no slot) */
static inline int
rcu_read_lock(void)
{
    RcuSlot *s = rcu_slot();
    if (s == NULL)
        return -1;
    if (s->nest++ == 0) {
        __atomic_store_n(&s->ctr, __atomic_load_n(&rcu_gp, __ATOMIC_ACQUIRE), __ATOMIC_RELAXED);
        if (have_membarrier)
            __atomic_signal_fence(__ATOMIC_SEQ_CST); /* the writer's membarrier orders us */
        else
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
    }
    return 0;
}

static inline void
rcu_read_unlock(void)
{
    RcuSlot *s = rcu_my_slot;
    if (s != NULL && s->nest > 0 && --s->nest == 0)
        __atomic_store_n(&s->ctr, 0, __ATOMIC_RELEASE);
}

/* Wait for every reader that may have seen what was published before the call.
 * Called with the GIL held; waits without it. */
static void
rcu_synchronize(void)
{
    mutex_lock_nogil(&rcu_gp_lock);
    unsigned long old = __atomic_fetch_add(&rcu_gp, 1, __ATOMIC_SEQ_CST);
    if (have_membarrier)
        syscall(__NR_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0, 0);
    else
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
    RcuSlot *mine = rcu_my_slot;
    for (RcuSlot *s = __atomic_load_n(&rcu_slots, __ATOMIC_ACQUIRE); s != NULL; s = s->next) {
        if (s == mine)
            continue; /* a writer is never inside its own read section here */
        for (;;) {
            unsigned long c = __atomic_load_n(&s->ctr, __ATOMIC_ACQUIRE);
            if (c == 0 || c > old)
                break;
            Py_BEGIN_ALLOW_THREADS
            sched_yield();
            Py_END_ALLOW_THREADS
        }
    }
    pthread_mutex_unlock(&rcu_gp_lock);
}

/* ---- Core: the lock and the current table ----------------------------------------- */

typedef struct {
    PyObject_HEAD
    int lock;  /* LOCK_* */
    int mm_mode; /* MM_* */
    int kvm;   /* KVM rules (page walk, EFAULT) instead of type1 rules */
    int shift; /* dirty page shift */
    PyObject *name;
    TableObject *table;
    unsigned mutex;  /* mutex strategy; the writers' lock for rcu (fmutex) */
    pthread_rwlock_t rwsem;
    pthread_mutex_t gp_lock; /* serialises grace periods */
    unsigned long epoch;     /* rcu: grace-period counter (atomic) */
    long readers[2];         /* rcu: readers in each epoch parity (atomic) */
    unsigned long long reads, writes; /* acquisitions of each side (gil_count) */
    StatClass read_stat, write_stat, task_stat; /* lockstat classes */
} CoreObject;

static PyObject *
Core_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"lock",       "mm_ref",      "kvm",        "shift", "name",
                             "read_class", "write_class", "task_class", NULL};
    const char *lock = "mutex", *mm_ref = "mmget_not_zero";
    int kvm = 0, shift = 12;
    PyObject *name = NULL, *rcls = NULL, *wcls = NULL, *tcls = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|sspiUOOO:Core", kwlist, &lock, &mm_ref, &kvm,
                                     &shift, &name, &rcls, &wcls, &tcls))
        return NULL;
    int lk;
    if (strcmp(lock, "mutex") == 0)
        lk = LOCK_MUTEX;
    else if (strcmp(lock, "rwsem") == 0)
        lk = LOCK_RWSEM;
    else if (strcmp(lock, "rcu") == 0)
        lk = LOCK_RCU;
    else if (strcmp(lock, "srcu") == 0)
        lk = LOCK_SRCU;
    else {
        PyErr_Format(PyExc_ValueError, "Core: unknown lock %s", lock);
        return NULL;
    }
    int mm;
    if (strcmp(mm_ref, "mmget_not_zero") == 0)
        mm = MM_MMGET_NOT_ZERO;
    else if (strcmp(mm_ref, "get_task_mm") == 0)
        mm = MM_GET_TASK_MM;
    else {
        PyErr_Format(PyExc_ValueError, "Core: unknown mm_ref %s", mm_ref);
        return NULL;
    }
    if (shift < 12 || shift > 40) {
        PyErr_SetString(PyExc_ValueError, "Core: shift out of range");
        return NULL;
    }
    CoreObject *c = (CoreObject *)type->tp_alloc(type, 0);
    if (c == NULL)
        return NULL;
    c->lock = lk;
    c->mm_mode = mm;
    c->kvm = kvm;
    c->shift = shift;
    c->name = name ? name : PyUnicode_FromString(lock);
    if (name)
        Py_INCREF(name);
    c->mutex = 0;
    pthread_rwlockattr_t ra;
    pthread_rwlockattr_init(&ra);
    pthread_rwlockattr_setkind_np(&ra, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&c->rwsem, &ra);
    pthread_rwlockattr_destroy(&ra);
    pthread_mutex_init(&c->gp_lock, NULL);
    c->epoch = 1;
    if (stat_class_init(&c->read_stat, rcls) < 0 || stat_class_init(&c->write_stat, wcls) < 0 ||
        stat_class_init(&c->task_stat, tcls) < 0) {
        Py_DECREF(c);
        return NULL;
    }
    c->table = (TableObject *)PyObject_CallFunction((PyObject *)&TableType, "(())");
    if (c->table == NULL || c->name == NULL) {
        Py_DECREF(c);
        return NULL;
    }
    return (PyObject *)c;
}

static void
Core_dealloc(CoreObject *self)
{
    Py_XDECREF(self->table);
    Py_XDECREF(self->name);
    stat_class_clear(&self->read_stat);
    stat_class_clear(&self->write_stat);
    stat_class_clear(&self->task_stat);
    pthread_rwlock_destroy(&self->rwsem);
    pthread_mutex_destroy(&self->gp_lock);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Count one lock acquisition.  Every update is made with the GIL held (core_read_lock
 * and Core_write_acquire run only from Python calls), so a plain load and store is exact
 * (as stat_hit's native count) without a locked read-modify-write; the relaxed atomics
 * keep a reader of the counter (Core.stats) free of a data race. */
static inline void
gil_count(unsigned long long *n)
{
    __atomic_store_n(n, __atomic_load_n(n, __ATOMIC_RELAXED) + 1, __ATOMIC_RELAXED);
}

/* Reader side: mutex or rwsem read lock (waiting without the GIL), an rcu read section
 * (a store to this thread's slot), or an srcu read section (the epoch's reader count,
 * a full barrier each way as the kernel's srcu_read_lock/unlock).  Returns the token for
 * read_unlock. */
static inline __attribute__((always_inline)) int
core_read_lock(CoreObject *c)
{
    int coll = stats_collecting();
    uint64_t t0 = coll ? read_cycles() : 0;
    int token = 0;
    gil_count(&c->reads);
    switch (c->lock) {
    case LOCK_MUTEX:
        fmutex_lock_nogil(&c->mutex);
        break;
    case LOCK_RWSEM:
        if (pthread_rwlock_tryrdlock(&c->rwsem) != 0) {
            Py_BEGIN_ALLOW_THREADS
            pthread_rwlock_rdlock(&c->rwsem);
            Py_END_ALLOW_THREADS
        }
        break;
    case LOCK_RCU:
        if (rcu_read_lock() < 0) {
            /* no slot (out of memory): fall back to excluding writers */
            fmutex_lock_nogil(&c->mutex);
            token = 2;
        }
        break;
    default:
        token = (int)(__atomic_load_n(&c->epoch, __ATOMIC_SEQ_CST) & 1);
        __atomic_fetch_add(&c->readers[token], 1, __ATOMIC_SEQ_CST);
    }
    stat_hit(&c->read_stat, coll, coll ? read_cycles() - t0 : 0);
    return token;
}

static inline __attribute__((always_inline)) void
core_read_unlock(CoreObject *c, int token)
{
    switch (c->lock) {
    case LOCK_MUTEX:
        fmutex_unlock(&c->mutex);
        break;
    case LOCK_RWSEM:
        pthread_rwlock_unlock(&c->rwsem);
        break;
    case LOCK_RCU:
        if (token == 2)
            fmutex_unlock(&c->mutex);
        else
            rcu_read_unlock();
        break;
    default:
        __atomic_fetch_sub(&c->readers[token], 1, __ATOMIC_SEQ_CST);
    }
}

static PyObject *
Core_read_acquire(CoreObject *self, PyObject *unused)
{
    (void)unused;
    return PyLong_FromLong(core_read_lock(self));
}

static PyObject *
Core_read_release(CoreObject *self, PyObject *token)
{
    long t = PyLong_AsLong(token);
    if (t == -1 && PyErr_Occurred())
        return NULL;
    if (t < 0 || t > 2) {
        PyErr_SetString(PyExc_ValueError, "read_release: bad token");
        return NULL;
    }
    core_read_unlock(self, (int)t);
    Py_RETURN_NONE;
}

/* Writer side: the mutex (mutex, rcu) or the rwsem's write lock. */
static PyObject *
Core_write_acquire(CoreObject *self, PyObject *unused)
{
    (void)unused;
    int coll = stats_collecting();
    uint64_t t0 = coll ? read_cycles() : 0;
    gil_count(&self->writes);
    if (self->lock == LOCK_RWSEM) {
        if (pthread_rwlock_trywrlock(&self->rwsem) != 0) {
            Py_BEGIN_ALLOW_THREADS
            pthread_rwlock_wrlock(&self->rwsem);
            Py_END_ALLOW_THREADS
        }
    } else {
        fmutex_lock_nogil(&self->mutex);
    }
    stat_hit(&self->write_stat, coll, coll ? read_cycles() - t0 : 0);
    Py_RETURN_NONE;
}

static PyObject *
Core_write_release(CoreObject *self, PyObject *unused)
{
    (void)unused;
    if (self->lock == LOCK_RWSEM)
        pthread_rwlock_unlock(&self->rwsem);
    else
        fmutex_unlock(&self->mutex);
    Py_RETURN_NONE;
}

/* Grace period.  rcu: see rcu_synchronize.  srcu: advance the epoch, then wait until no
 * reader is left in the previous epoch's parity; readers increment their count before
 * loading the table (seq_cst), so one that saw the old table is counted and waited for.
 * Waits without the GIL: a reader in a large copy needs it back to finish.  mutex and
 * rwsem: writers exclude readers, nothing to wait for. */
static PyObject *
Core_synchronize(CoreObject *self, PyObject *unused)
{
    (void)unused;
    if (self->lock == LOCK_RCU) {
        rcu_synchronize();
        Py_RETURN_NONE;
    }
    if (self->lock != LOCK_SRCU)
        Py_RETURN_NONE;
    mutex_lock_nogil(&self->gp_lock);
    unsigned long old = __atomic_fetch_add(&self->epoch, 1, __ATOMIC_SEQ_CST);
    int idx = (int)(old & 1);
    while (__atomic_load_n(&self->readers[idx], __ATOMIC_SEQ_CST) != 0) {
        Py_BEGIN_ALLOW_THREADS
        sched_yield();
        Py_END_ALLOW_THREADS
    }
    pthread_mutex_unlock(&self->gp_lock);
    Py_RETURN_NONE;
}

/* Install a new table (the caller holds the write side, then calls synchronize). */
static PyObject *
Core_set_table(CoreObject *self, PyObject *table)
{
    if (!PyObject_TypeCheck(table, &TableType)) {
        PyErr_SetString(PyExc_TypeError, "set_table: expected a Table");
        return NULL;
    }
    Py_INCREF(table);
    TableObject *old = self->table;
    __atomic_store_n(&self->table, (TableObject *)table, __ATOMIC_SEQ_CST);
    Py_DECREF(old);
    Py_RETURN_NONE;
}

/* ---- the one-call paths ------------------------------------------------------------ */

typedef struct {
    Entry *e;
    uint64_t off; /* offset in the mapping */
    uint64_t len;
} Chunk;

#define SMALL_CHUNKS 8

/* parse_addr's general part: any int, via PyLong_AsUnsignedLongLong. */
static int
parse_addr_slow(PyObject *obj, uint64_t *addr, int *out_of_range)
{
    *out_of_range = 0;
    if (!PyLong_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "address must be an int, not %.100s", Py_TYPE(obj)->tp_name);
        return -1;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(obj);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return -1;
        PyErr_Clear();
        *out_of_range = 1;
        v = 0;
    }
    *addr = v;
    return 0;
}

/* iova/gpa as u64; *out_of_range = 1 for negative or >= 2**64 ints.  An exact int of
 * zero to two digits (every address below 2**60 with 30-bit digits) is read inline from
 * its digits (CPython 3.11's layout, which the project pins; other versions take the
 * general path). */
static inline int
parse_addr(PyObject *obj, uint64_t *addr, int *out_of_range)
{
#if PY_VERSION_HEX >= 0x030B0000 && PY_VERSION_HEX < 0x030C0000
    if (PyLong_CheckExact(obj)) {
        Py_ssize_t sz = Py_SIZE(obj);
        const digit *d = ((PyLongObject *)obj)->ob_digit;
        if ((size_t)sz <= 2) {
            *out_of_range = 0;
            *addr = sz == 0 ? 0 : sz == 1 ? (uint64_t)d[0] : (uint64_t)d[0] | (uint64_t)d[1] << PyLong_SHIFT;
            return 0;
        }
    }
#endif
    return parse_addr_slow(obj, addr, out_of_range);
}

/* addr + n > 2**64: the range runs past the top of the address space. */
static inline int
past_end(uint64_t addr, uint64_t n)
{
    return n > 0 && addr + n - 1 < addr;
}

/* 1 if every chunk's backing is still mapped, 0 if one is gone (EFAULT), -1 on error. */
static int
chunks_backed(Chunk *ch, Py_ssize_t nch, Entry **gone)
{
    for (Py_ssize_t i = 0; i < nch; i++) {
        Entry *e = ch[i].e;
        if (i > 0 && e == ch[i - 1].e)
            continue;
        int released = e->mem == NULL ? 1 : attr_true(e->region, e->region_dict, str_released, &e->released_fc);
        if (released != 0) {
            *gone = e;
            return released < 0 ? -1 : 0;
        }
    }
    return 1;
}

/* One copy between guest memory m and the caller's buffer. */
static inline void
copy_one(char *m, char *buf, size_t n, int write)
{
    if (write)
        memmove(m, buf, n);
    else
        memmove(buf, m, n);
}

static void
copy_chunks(Chunk *ch, Py_ssize_t nch, char *buf, int write, uint64_t total)
{
    uint64_t pos = 0;
    if ((Py_ssize_t)total >= gil_threshold) {
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < nch; i++) {
            char *m = ch[i].e->mem + ch[i].off;
            if (write)
                memmove(m, buf + pos, ch[i].len);
            else
                memmove(buf + pos, m, ch[i].len);
            pos += ch[i].len;
        }
        Py_END_ALLOW_THREADS
    } else {
        for (Py_ssize_t i = 0; i < nch; i++) {
            char *m = ch[i].e->mem + ch[i].off;
            if (write)
                memmove(m, buf + pos, ch[i].len);
            else
                memmove(buf + pos, m, ch[i].len);
            pos += ch[i].len;
        }
    }
}

static const char *
prot_repr(int prot)
{
    switch (prot) {
    case PROT_R:
        return "<Prot.READ: 1>";
    case PROT_W:
        return "<Prot.WRITE: 2>";
    case PROT_R | PROT_W:
        return "<Prot.READ|WRITE: 3>";
    default:
        return "<Prot: 0>";
    }
}

/* type1 dma_rw under the read side: every chunk translated and checked (EINVAL, EPERM),
 * the owner's address space counted (EPERM), the backing checked (EFAULT), then the copy
 * and, for a write, the dirty pages off>>shift..(off+len-1)>>shift of each chunk. */
__attribute__((noinline)) static PyObject *
core_dma_rw_walk(CoreObject *c, TableObject *t, uint64_t iova, Py_buffer *v, int write)
{
    uint64_t n = (uint64_t)v->len;
    int need = write ? (PROT_R | PROT_W) : PROT_R;
    Chunk small[SMALL_CHUNKS];
    Chunk *ch = small;
    Py_ssize_t cap = SMALL_CHUNKS, nch = 0;
    MmRefObject *held[SMALL_CHUNKS];
    Py_ssize_t nheld = 0;
    PyObject *ret = NULL;
    uint64_t pos = 0;
    while (pos < n) {
        uint64_t cur = iova + pos;
        Entry *e = table_find(t, cur);
        if (e == NULL) {
            dma_error(EINVAL, "dma_rw 0x%llx+0x%llx: iova 0x%llx is not mapped",
                      (unsigned long long)iova, (unsigned long long)n, (unsigned long long)cur);
            goto out;
        }
        if (need & ~e->prot) {
            dma_error(EPERM, "dma_rw 0x%llx+0x%llx: mapping 0x%llx+0x%llx is %s",
                      (unsigned long long)iova, (unsigned long long)n,
                      (unsigned long long)e->start, (unsigned long long)e->size,
                      prot_repr(e->prot));
            goto out;
        }
        uint64_t off = cur - e->start;
        uint64_t seg = e->size - off;
        if (seg > n - pos)
            seg = n - pos;
        if (nch == cap) {
            Chunk *bigger = PyMem_Malloc((size_t)cap * 2 * sizeof(Chunk));
            if (bigger == NULL) {
                PyErr_NoMemory();
                goto out;
            }
            memcpy(bigger, ch, (size_t)nch * sizeof(Chunk));
            if (ch != small)
                PyMem_Free(ch);
            ch = bigger;
            cap *= 2;
        }
        ch[nch].e = e;
        ch[nch].off = off;
        ch[nch].len = seg;
        nch++;
        pos += seg;
    }
    /* one reference per distinct address space (a handful at most) */
    for (Py_ssize_t i = 0; i < nch; i++) {
        MmRefObject *mm = ch[i].e->mm;
        if (mm == NULL)
            continue;
        int seen = 0;
        for (Py_ssize_t j = 0; j < nheld; j++)
            seen |= held[j] == mm;
        if (seen)
            continue;
        if (nheld == SMALL_CHUNKS) {
            PyErr_SetString(PyExc_RuntimeError, "dma_rw: too many address spaces in one access");
            goto out;
        }
        int got = mm_get(mm, ch[i].e->space, ch[i].e->space_dict, ch[i].e->space_fc, c->mm_mode,
                         &c->task_stat);
        if (got <= 0) {
            if (got == 0)
                dma_error(EPERM, "dma_rw 0x%llx+0x%llx: the owner's address space has exited",
                          (unsigned long long)iova, (unsigned long long)n);
            goto out;
        }
        held[nheld++] = mm;
    }
    Entry *gone = NULL;
    int backed = chunks_backed(ch, nch, &gone);
    if (backed <= 0) {
        if (backed == 0)
            dma_error(EFAULT, "dma_rw 0x%llx+0x%llx: host mapping gone",
                      (unsigned long long)iova, (unsigned long long)n);
        goto out;
    }
    copy_chunks(ch, nch, (char *)v->buf, write, n);
    if (write) {
        for (Py_ssize_t i = 0; i < nch; i++) {
            Entry *e = ch[i].e;
            if (e->have_bits)
                bits_mark((uint64_t *)e->bview.buf, ch[i].off >> c->shift,
                          (ch[i].off + ch[i].len - 1) >> c->shift);
        }
    }
    Py_INCREF(Py_None);
    ret = Py_None;
out:
    for (Py_ssize_t j = 0; j < nheld; j++)
        mm_put(held[j]);
    if (ch != small)
        PyMem_Free(ch);
    return ret;
}

/* type1 dma_rw under the read side (the one-mapping case here, the rest in
 * core_dma_rw_walk, out of line so the common case does not set up its frame). */
static inline PyObject *
core_dma_rw_locked(CoreObject *c, TableObject *t, uint64_t iova, Py_buffer *v, int write)
{
    uint64_t n = (uint64_t)v->len;
    int need = write ? (PROT_R | PROT_W) : PROT_R;
    PyObject *ret = NULL;
    /* One mapping covers the whole range (nearly every access): the same checks in the
     * same order (translate + prot, the owner's address space, the backing), the copy and
     * the dirty mark, without the chunk and held-reference bookkeeping.  Anything else
     * (unmapped, no permission, a range over several mappings) takes the general walk,
     * which finds the same first entry and reports the same error. */
    Entry *e1 = table_find(t, iova);
    if (e1 != NULL && !(need & ~e1->prot) && n <= e1->size - (iova - e1->start)) {
        uint64_t off = iova - e1->start;
        MmRefObject *mm = e1->mm;
        if (mm != NULL) {
            int got = mm_get(mm, e1->space, e1->space_dict, e1->space_fc, c->mm_mode, &c->task_stat);
            if (got <= 0) {
                if (got == 0)
                    dma_error(EPERM, "dma_rw 0x%llx+0x%llx: the owner's address space has exited",
                              (unsigned long long)iova, (unsigned long long)n);
                return NULL;
            }
        }
        int released = e1->mem == NULL ? 1 : attr_true(e1->region, e1->region_dict, str_released, &e1->released_fc);
        if (released == 0) {
            char *m = e1->mem + off;
            if ((Py_ssize_t)n >= gil_threshold) {
                Py_BEGIN_ALLOW_THREADS
                copy_one(m, (char *)v->buf, (size_t)n, write);
                Py_END_ALLOW_THREADS
            } else {
                copy_one(m, (char *)v->buf, (size_t)n, write);
            }
            if (write && e1->have_bits)
                bits_mark((uint64_t *)e1->bview.buf, off >> c->shift, (off + n - 1) >> c->shift);
            Py_INCREF(Py_None);
            ret = Py_None;
        } else if (released > 0) {
            dma_error(EFAULT, "dma_rw 0x%llx+0x%llx: host mapping gone",
                      (unsigned long long)iova, (unsigned long long)n);
        }
        if (mm != NULL)
            mm_put(mm);
        return ret;
    }
    return core_dma_rw_walk(c, t, iova, v, write);
}

/* bind_args's general part: keywords, or a wrong count. */
static int
bind_args_slow(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, const char *const *names,
          int n, PyObject **out, const char *fname)
{
    nargs = PyVectorcall_NARGS(nargs);
    if (kwnames == NULL && nargs == n) {
        for (int i = 0; i < n; i++)
            out[i] = args[i];
        return 0;
    }
    if (nargs > n) {
        PyErr_Format(PyExc_TypeError, "%s() takes %d arguments (%zd given)", fname, n, nargs);
        return -1;
    }
    for (int i = 0; i < n; i++)
        out[i] = i < nargs ? args[i] : NULL;
    Py_ssize_t nk = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    for (Py_ssize_t k = 0; k < nk; k++) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, k);
        int j = 0;
        while (j < n && PyUnicode_CompareWithASCIIString(key, names[j]) != 0)
            j++;
        if (j == n || out[j] != NULL) {
            PyErr_Format(PyExc_TypeError, "%s() got %s argument %R", fname,
                         j == n ? "an unexpected keyword" : "multiple values for", key);
            return -1;
        }
        out[j] = args[nargs + k];
    }
    for (int i = 0; i < n; i++) {
        if (out[i] == NULL) {
            PyErr_Format(PyExc_TypeError, "%s() missing argument '%s'", fname, names[i]);
            return -1;
        }
    }
    return 0;
}

/* Bind positional and keyword arguments of a METH_FASTCALL|METH_KEYWORDS method to the
 * parameter names, as a Python def would.  All positional (the usual call) is inline. */
static inline int
bind_args(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, const char *const *names,
          int n, PyObject **out, const char *fname)
{
    if (kwnames == NULL && PyVectorcall_NARGS(nargs) == n) {
        for (int i = 0; i < n; i++)
            out[i] = args[i];
        return 0;
    }
    return bind_args_slow(args, nargs, kwnames, names, n, out, fname);
}

/* Read side, table reference, the access, unlock: one whole type1 call after the
 * argument checks. */
static PyObject *
core_dma_rw_run(CoreObject *c, uint64_t iova, Py_buffer *v, int write)
{
    int token = core_read_lock(c);
    TableObject *t = __atomic_load_n(&c->table, __ATOMIC_SEQ_CST);
    Py_INCREF(t);
    PyObject *ret = core_dma_rw_locked(c, t, iova, v, write);
    Py_DECREF(t);
    core_read_unlock(c, token);
    return ret;
}

/* The argument rules of dma_rw (EINVAL empty or a read into a read-only buffer, EOVERFLOW
 * past 2**64), then the call. */
static PyObject *
core_dma_rw_checked(CoreObject *c, uint64_t iova, int oor, Py_buffer *v, int write)
{
    uint64_t n = (uint64_t)v->len;
    if (n == 0) {
        if (oor)
            return dma_error(EINVAL, "dma_rw at iova out of range: zero length");
        return dma_error(EINVAL, "dma_rw at iova 0x%llx: zero length", (unsigned long long)iova);
    }
    if (oor || past_end(iova, n))
        return dma_error(EOVERFLOW, "dma_rw 0x%llx+0x%llx: wraps past 2**64",
                         (unsigned long long)iova, (unsigned long long)n);
    if (!write && v->readonly)
        return dma_error(EINVAL, "dma_rw read 0x%llx+0x%llx: buffer is read-only",
                         (unsigned long long)iova, (unsigned long long)n);
    return core_dma_rw_run(c, iova, v, write);
}

static int
check_kind(CoreObject *c, int kvm)
{
    if (c->kvm == kvm)
        return 0;
    PyErr_SetString(PyExc_TypeError, kvm ? "a container core has no guest access" : "a KVM core has no dma_rw");
    return -1;
}

/* Core.dma_rw(iova, buf, write): the type1 rules of Container.dma_rw in one call. */
static PyObject *
Core_dma_rw(CoreObject *self, PyObject *const *args_in, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"iova", "buf", "write"};
    PyObject *args[3];
    if (bind_args(args_in, nargs, kwnames, names, 3, args, "dma_rw") < 0)
        return NULL;
    if (check_kind(self, 0) < 0)
        return NULL;
    PyObject *wo = args[2];
    /* True/False and small ints inline; anything else by its truth value */
    int write = wo == Py_True    ? 1
                : wo == Py_False ? 0
                : PyLong_CheckExact(wo) ? Py_SIZE(wo) != 0
                                        : PyObject_IsTrue(wo);
    if (write < 0)
        return NULL;
    Py_buffer v;
    if (PyObject_GetBuffer(args[1], &v, PyBUF_SIMPLE) < 0)
        return NULL;
    uint64_t iova;
    int oor;
    PyObject *ret = NULL;
    if (parse_addr(args[0], &iova, &oor) < 0)
        goto done;
    ret = core_dma_rw_checked(self, iova, oor, &v, write);
done:
    PyBuffer_Release(&v);
    return ret;
}

/* KVM: walk the range a guest page at a time, every page checked before any copy
 * (EFAULT: no slot, write to a read-only slot, backing gone); then copy page by page,
 * a write marking each page in its slot's dirty log. */
static PyObject *
core_guest_locked(CoreObject *c, TableObject *t, uint64_t gpa, char *buf, uint64_t n, int write)
{
    (void)c;
    uint64_t pos = 0;
    Entry *last = NULL;
    while (pos < n) {
        uint64_t g = gpa + pos;
        uint64_t seg = KVM_PAGE - (g & (KVM_PAGE - 1));
        if (seg > n - pos)
            seg = n - pos;
        Entry *e = (last != NULL && g - last->start < last->size) ? last : table_find(t, g);
        if (e == NULL)
            return dma_error(EFAULT, "gpa 0x%llx (access 0x%llx+0x%llx): no memslot",
                             (unsigned long long)g, (unsigned long long)gpa,
                             (unsigned long long)n);
        if (write && !(e->prot & PROT_W))
            return dma_error(EFAULT, "gpa 0x%llx (access 0x%llx+0x%llx): slot is read-only",
                             (unsigned long long)g, (unsigned long long)gpa,
                             (unsigned long long)n);
        if (e != last) {
            int released = e->mem == NULL ? 1 : attr_true(e->region, e->region_dict, str_released, &e->released_fc);
            if (released != 0) {
                if (released > 0)
                    dma_error(EFAULT, "gpa 0x%llx+0x%llx: backing mapping gone",
                              (unsigned long long)gpa, (unsigned long long)n);
                return NULL;
            }
        }
        last = e;
        pos += seg;
    }
    int nogil = (Py_ssize_t)n >= gil_threshold;
    PyThreadState *ts = nogil ? PyEval_SaveThread() : NULL;
    pos = 0;
    while (pos < n) {
        uint64_t g = gpa + pos;
        uint64_t seg = KVM_PAGE - (g & (KVM_PAGE - 1));
        if (seg > n - pos)
            seg = n - pos;
        Entry *e = table_find(t, g); /* the kernel's per-page gfn -> memslot lookup */
        uint64_t off = g - e->start;
        if (write) {
            memmove(e->mem + off, buf + pos, seg);
            if (e->have_bits)
                bits_mark((uint64_t *)e->bview.buf, off >> 12, off >> 12);
        } else {
            memmove(buf + pos, e->mem + off, seg);
        }
        pos += seg;
    }
    if (ts != NULL)
        PyEval_RestoreThread(ts);
    Py_RETURN_NONE;
}

static PyObject *
core_guest_run(CoreObject *self, uint64_t gpa, int oor, char *buf, uint64_t n, int write);

static PyObject *
core_guest(CoreObject *self, PyObject *gpa_obj, char *buf, uint64_t n, int write)
{
    uint64_t gpa;
    int oor;
    if (check_kind(self, 1) < 0 || parse_addr(gpa_obj, &gpa, &oor) < 0)
        return NULL;
    return core_guest_run(self, gpa, oor, buf, n, write);
}

static PyObject *
core_guest_run(CoreObject *self, uint64_t gpa, int oor, char *buf, uint64_t n, int write)
{
    if (oor || past_end(gpa, n)) {
        if (oor)
            return dma_error(EFAULT, "gpa out of range (access of 0x%llx bytes) is outside guest physical space",
                             (unsigned long long)n);
        return dma_error(EFAULT, "gpa 0x%llx+0x%llx is outside guest physical space",
                         (unsigned long long)gpa, (unsigned long long)n);
    }
    int token = core_read_lock(self);
    TableObject *t = __atomic_load_n(&self->table, __ATOMIC_SEQ_CST);
    Py_INCREF(t);
    PyObject *ret = core_guest_locked(self, t, gpa, buf, n, write);
    Py_DECREF(t);
    core_read_unlock(self, token);
    return ret;
}

/* Core.read_guest(gpa, n) -> bytes */
static PyObject *
Core_read_guest(CoreObject *self, PyObject *const *args_in, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"gpa", "n"};
    PyObject *args[2];
    if (bind_args(args_in, nargs, kwnames, names, 2, args, "read_guest") < 0)
        return NULL;
    Py_ssize_t n = PyLong_AsSsize_t(args[1]);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "negative count");
        return NULL;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, n);
    if (out == NULL)
        return NULL;
    PyObject *r = core_guest(self, args[0], PyBytes_AS_STRING(out), (uint64_t)n, 0);
    if (r == NULL) {
        Py_DECREF(out);
        return NULL;
    }
    Py_DECREF(r);
    return out;
}

/* Core.read_guest_into(gpa, buf) */
static PyObject *
Core_read_guest_into(CoreObject *self, PyObject *const *args_in, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"gpa", "buf"};
    PyObject *args[2];
    if (bind_args(args_in, nargs, kwnames, names, 2, args, "read_guest_into") < 0)
        return NULL;
    Py_buffer v;
    if (PyObject_GetBuffer(args[1], &v, PyBUF_WRITABLE) < 0) {
        /* a read-only destination is EINVAL, as in the Python core and dma_rw */
        if (!PyErr_ExceptionMatches(PyExc_BufferError))
            return NULL;
        PyErr_Clear();
        if (PyObject_GetBuffer(args[1], &v, PyBUF_SIMPLE) < 0)
            return NULL;
        Py_ssize_t n = v.len;
        PyBuffer_Release(&v);
        unsigned long long gpa = PyLong_Check(args[0]) ? PyLong_AsUnsignedLongLongMask(args[0]) : 0;
        if (PyErr_Occurred())
            return NULL;
        return dma_error(EINVAL, "read_guest_into gpa 0x%llx+0x%zx: buffer is read-only", gpa, (size_t)n);
    }
    PyObject *r = core_guest(self, args[0], (char *)v.buf, (uint64_t)v.len, 0);
    PyBuffer_Release(&v);
    return r;
}

/* Core.write_guest(gpa, data) */
static PyObject *
Core_write_guest(CoreObject *self, PyObject *const *args_in, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"gpa", "data"};
    PyObject *args[2];
    if (bind_args(args_in, nargs, kwnames, names, 2, args, "write_guest") < 0)
        return NULL;
    Py_buffer v;
    if (PyObject_GetBuffer(args[1], &v, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *r = core_guest(self, args[0], (char *)v.buf, (uint64_t)v.len, 1);
    PyBuffer_Release(&v);
    return r;
}

/* The records of a replay: u8 write flags, u64 addresses, u32 sizes (the lab's Records
 * arrays), the data buffer, and optionally a u64 per record for each call's ticks. */
typedef struct {
    Py_buffer w, a, sz, b, d;
    int got;
    int have_d;
    Py_ssize_t n;
} Records;

static void
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

static int
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

typedef PyObject *(*ReplayOne)(PyObject *target, uint64_t addr, Py_buffer *one, int write);

/* Run every record through one(target, ...), each call between two counter reads (the
 * seed's get_cycles() pair); the first failing call raises. */
static PyObject *
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

static PyObject *
core_replay_one(PyObject *target, uint64_t addr, Py_buffer *v, int write)
{
    CoreObject *c = (CoreObject *)target;
    if (c->kvm)
        return core_guest_run(c, addr, 0, (char *)v->buf, (uint64_t)v->len, write);
    return core_dma_rw_checked(c, addr, 0, v, write);
}

/* Core.replay(writes, addrs, sizes, buf, deltas=None) -> (read_cycles, reads, write_cycles,
 * writes): run a recorded workload through this core's own path (read_guest_into /
 * write_guest rules for KVM, dma_rw rules otherwise), timing each call with the cycle
 * counter as the seed did around vfio_dma_rw / kvm_read_guest.  buf is the data
 * source/sink (at least the largest size); deltas, if given, receives each call's ticks. */
static PyObject *
Core_replay(CoreObject *self, PyObject *args)
{
    PyObject *ow, *oa, *os, *ob, *od = NULL;
    if (!PyArg_ParseTuple(args, "OOOO|O:replay", &ow, &oa, &os, &ob, &od))
        return NULL;
    Records r;
    if (records_get(&r, ow, oa, os, ob, od) < 0)
        return NULL;
    PyObject *ret = replay_records(&r, core_replay_one, (PyObject *)self);
    records_release(&r);
    return ret;
}

/* timer_overhead(samples) -> median cycles of one back-to-back counter pair. */
static PyObject *
timer_overhead(PyObject *self, PyObject *arg)
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

static PyObject *
Core_stats(CoreObject *self, PyObject *unused)
{
    (void)unused;
    return Py_BuildValue("{sKsK}", "reads", __atomic_load_n(&self->reads, __ATOMIC_RELAXED),
                         "writes", __atomic_load_n(&self->writes, __ATOMIC_RELAXED));
}

static PyObject *
Core_get_name(CoreObject *self, void *closure)
{
    (void)closure;
    Py_INCREF(self->name);
    return self->name;
}

static PyObject *
Core_get_table(CoreObject *self, void *closure)
{
    (void)closure;
    Py_INCREF(self->table);
    return (PyObject *)self->table;
}

static PyMethodDef Core_methods[] = {
    {"dma_rw", (PyCFunction)(void (*)(void))Core_dma_rw, METH_FASTCALL | METH_KEYWORDS,
     "dma_rw(iova, buf, write): translate, check, copy and dirty-mark in one call"},
    {"read_guest", (PyCFunction)(void (*)(void))Core_read_guest, METH_FASTCALL | METH_KEYWORDS,
     "read_guest(gpa, n) -> bytes (KVM rules)"},
    {"read_guest_into", (PyCFunction)(void (*)(void))Core_read_guest_into, METH_FASTCALL | METH_KEYWORDS,
     "read_guest_into(gpa, buf) (KVM rules)"},
    {"write_guest", (PyCFunction)(void (*)(void))Core_write_guest, METH_FASTCALL | METH_KEYWORDS,
     "write_guest(gpa, data) (KVM rules)"},
    {"replay", (PyCFunction)Core_replay, METH_VARARGS,
     "replay(writes, addrs, sizes, buf, deltas=None) -> (read_cycles, reads, write_cycles, writes)"},
    {"set_table", (PyCFunction)Core_set_table, METH_O, "install a Table (write side held)"},
    {"read_acquire", (PyCFunction)Core_read_acquire, METH_NOARGS, "reader side; returns a token"},
    {"read_release", (PyCFunction)Core_read_release, METH_O, "end the reader side"},
    {"write_acquire", (PyCFunction)Core_write_acquire, METH_NOARGS, "writer side"},
    {"write_release", (PyCFunction)Core_write_release, METH_NOARGS, "end the writer side"},
    {"synchronize", (PyCFunction)Core_synchronize, METH_NOARGS, "rcu grace period"},
    {"stats", (PyCFunction)Core_stats, METH_NOARGS, "acquisition counts"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Core_getset[] = {
    {"name", (getter)Core_get_name, NULL, "lock strategy name", NULL},
    {"table", (getter)Core_get_table, NULL, "the current Table", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject CoreType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "dmarw._native.Core",
    .tp_basicsize = sizeof(CoreObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Core(lock='mutex', mm_ref='mmget_not_zero', kvm=False, shift=12, name=None)",
    .tp_new = Core_new,
    .tp_dealloc = (destructor)Core_dealloc,
    .tp_methods = Core_methods,
    .tp_getset = Core_getset,
};

/* ---- the VFIO group layer ----------------------------------------------------------
 * Atomic: a counter (the kernel's atomic_t / kref) for a group's references and container
 * users.  Lock: a named sleeping lock (a pthread mutex) counted and timed in a lockstat
 * class like the Python Mutex; shared=True puts the mutex, PTHREAD_PROCESS_SHARED, in its
 * own MAP_SHARED anonymous mapping, so a lock made before fork() is one lock for every
 * process (the host-global vfio.group_lock of the lab's VMs).  GroupState: what the
 * per-call path reads of a Python Group (its three locks, its counters, how many names
 * are on its unbound list and how many devices are not bound, its container), mutated by
 * the Python Group under the same locks.  vfio_dma_rw: the per-call path in one call. */

static PyObject *
Atomic_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"value", NULL};
    long v = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|l:Atomic", kwlist, &v))
        return NULL;
    AtomicObject *a = (AtomicObject *)type->tp_alloc(type, 0);
    if (a != NULL)
        a->v = v;
    return (PyObject *)a;
}

static PyObject *
Atomic_inc(AtomicObject *self, PyObject *unused)
{
    (void)unused;
    return PyLong_FromLong(__atomic_fetch_add(&self->v, 1, __ATOMIC_ACQ_REL));
}

static PyObject *
Atomic_dec(AtomicObject *self, PyObject *unused)
{
    (void)unused;
    return PyLong_FromLong(__atomic_fetch_sub(&self->v, 1, __ATOMIC_ACQ_REL));
}

static PyObject *
Atomic_value(AtomicObject *self, void *closure)
{
    (void)closure;
    return PyLong_FromLong(__atomic_load_n(&self->v, __ATOMIC_SEQ_CST));
}

static PyMethodDef Atomic_methods[] = {
    {"inc", (PyCFunction)Atomic_inc, METH_NOARGS, "add one; returns the old value"},
    {"dec", (PyCFunction)Atomic_dec, METH_NOARGS, "subtract one; returns the old value"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Atomic_getset[] = {
    {"value", (getter)Atomic_value, NULL, "the current value", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject AtomicType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "dmarw._native.Atomic",
    .tp_basicsize = sizeof(AtomicObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Atomic(value=0): a lock-free counter (inc, dec, value).",
    .tp_new = Atomic_new,
    .tp_methods = Atomic_methods,
    .tp_getset = Atomic_getset,
};

typedef struct {
    PyObject_HEAD
    pthread_mutex_t *m;  /* &own, or the start of the shared mapping */
    pthread_mutex_t own;
    int shared;
    StatClass stat;
    PyObject *name;
} LockObject;

static PyObject *
Lock_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"lock_class", "shared", NULL};
    PyObject *cls;
    int shared = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|p:Lock", kwlist, &cls, &shared))
        return NULL;
    PyObject *name = PyObject_GetAttrString(cls, "name");
    if (name == NULL)
        return NULL;
    LockObject *l = (LockObject *)type->tp_alloc(type, 0);
    if (l == NULL) {
        Py_DECREF(name);
        return NULL;
    }
    l->name = name;
    if (stat_class_init(&l->stat, cls) < 0) {
        Py_DECREF(l);
        return NULL;
    }
    if (shared) {
        void *p = mmap(NULL, sizeof(pthread_mutex_t), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
                       -1, 0);
        if (p == MAP_FAILED) {
            PyErr_SetFromErrno(PyExc_OSError);
            Py_DECREF(l);
            return NULL;
        }
        pthread_mutexattr_t ma;
        pthread_mutexattr_init(&ma);
        pthread_mutexattr_setpshared(&ma, PTHREAD_PROCESS_SHARED);
        int rc = pthread_mutex_init((pthread_mutex_t *)p, &ma);
        pthread_mutexattr_destroy(&ma);
        l->m = p;
        l->shared = 1;
        if (rc != 0) {
            errno = rc;
            PyErr_SetFromErrno(PyExc_OSError);
            Py_DECREF(l);
            return NULL;
        }
    } else {
        pthread_mutex_init(&l->own, NULL);
        l->m = &l->own;
    }
    return (PyObject *)l;
}

static void
Lock_dealloc(LockObject *self)
{
    if (self->m != NULL) {
        if (self->shared)
            munmap(self->m, sizeof(pthread_mutex_t)); /* other processes keep their mapping */
        else
            pthread_mutex_destroy(self->m);
    }
    stat_class_clear(&self->stat);
    Py_XDECREF(self->name);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Take the lock (waiting without the GIL), counted in its class, timed while collecting. */
static inline void
lock_take(LockObject *l)
{
    int coll = stats_collecting();
    uint64_t t0 = coll ? read_cycles() : 0;
    mutex_lock_nogil(l->m);
    stat_hit(&l->stat, coll, coll ? read_cycles() - t0 : 0);
}

static inline void
lock_drop(LockObject *l)
{
    pthread_mutex_unlock(l->m);
}

static PyObject *
Lock_acquire(LockObject *self, PyObject *unused)
{
    (void)unused;
    lock_take(self);
    Py_RETURN_TRUE;
}

static PyObject *
Lock_release(LockObject *self, PyObject *unused)
{
    (void)unused;
    lock_drop(self);
    Py_RETURN_NONE;
}

static PyObject *
Lock_enter(LockObject *self, PyObject *unused)
{
    (void)unused;
    lock_take(self);
    Py_INCREF(self);
    return (PyObject *)self;
}

static PyObject *
Lock_exit(LockObject *self, PyObject *args)
{
    (void)args;
    lock_drop(self);
    Py_RETURN_FALSE;
}

static PyObject *
Lock_get_name(LockObject *self, void *closure)
{
    (void)closure;
    Py_INCREF(self->name);
    return self->name;
}

static PyObject *
Lock_get_shared(LockObject *self, void *closure)
{
    (void)closure;
    return PyBool_FromLong(self->shared);
}

static PyMethodDef Lock_methods[] = {
    {"acquire", (PyCFunction)Lock_acquire, METH_NOARGS, "take the lock (counted, timed while collecting)"},
    {"release", (PyCFunction)Lock_release, METH_NOARGS, "release the lock (held by the caller)"},
    {"__enter__", (PyCFunction)Lock_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)Lock_exit, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Lock_getset[] = {
    {"name", (getter)Lock_get_name, NULL, "the lock class", NULL},
    {"shared", (getter)Lock_get_shared, NULL, "process-shared (made before fork)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject LockType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "dmarw._native.Lock",
    .tp_basicsize = sizeof(LockObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Lock(lock_class, shared=False): a named pthread mutex counted in dmarw.lockstat.",
    .tp_new = Lock_new,
    .tp_dealloc = (destructor)Lock_dealloc,
    .tp_methods = Lock_methods,
    .tp_getset = Lock_getset,
};

typedef struct {
    PyObject_HEAD
    PyObject *name;          /* the group's name (its registry key) */
    LockObject *unbound_lock, *device_lock, *mutex;
    AtomicObject *refs, *users;
    long unbound;            /* names on the unbound list (under unbound_lock) */
    long devices_unbound;    /* devices not bound (under device_lock) */
    PyObject *container;     /* the attached container or NULL (under mutex) */
    CoreObject *core;        /* its native core, or NULL for a Python container */
} GroupStateObject;

static PyObject *
GroupState_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"name", "unbound_lock", "device_lock", "mutex", "refs", "users", NULL};
    PyObject *name;
    LockObject *ul, *dl, *mx;
    AtomicObject *refs, *users;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "UO!O!O!O!O!:GroupState", kwlist, &name, &LockType, &ul,
                                     &LockType, &dl, &LockType, &mx, &AtomicType, &refs, &AtomicType,
                                     &users))
        return NULL;
    GroupStateObject *g = (GroupStateObject *)type->tp_alloc(type, 0);
    if (g == NULL)
        return NULL;
    Py_INCREF(name);
    g->name = name;
    Py_INCREF(ul);
    g->unbound_lock = ul;
    Py_INCREF(dl);
    g->device_lock = dl;
    Py_INCREF(mx);
    g->mutex = mx;
    Py_INCREF(refs);
    g->refs = refs;
    Py_INCREF(users);
    g->users = users;
    return (PyObject *)g;
}

static void
GroupState_dealloc(GroupStateObject *self)
{
    Py_XDECREF(self->name);
    Py_XDECREF(self->unbound_lock);
    Py_XDECREF(self->device_lock);
    Py_XDECREF(self->mutex);
    Py_XDECREF(self->refs);
    Py_XDECREF(self->users);
    Py_XDECREF(self->container);
    Py_XDECREF(self->core);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* set_container(c or None): called by the Python Group under group.mutex. */
static PyObject *
GroupState_set_container(GroupStateObject *self, PyObject *c)
{
    CoreObject *core = NULL;
    if (c != Py_None) {
        PyObject *k = PyObject_GetAttrString(c, "_core");
        if (k == NULL)
            PyErr_Clear();
        else if (PyObject_TypeCheck(k, &CoreType) && !((CoreObject *)k)->kvm)
            core = (CoreObject *)k;
        else
            Py_DECREF(k);
        Py_INCREF(c);
    }
    PyObject *old = self->container;
    CoreObject *oldcore = self->core;
    self->container = c == Py_None ? NULL : c;
    self->core = core;
    Py_XDECREF(old);
    Py_XDECREF(oldcore);
    Py_RETURN_NONE;
}

static PyObject *
GroupState_get_long(GroupStateObject *self, void *closure)
{
    return PyLong_FromLong(closure ? self->devices_unbound : self->unbound);
}

static int
GroupState_set_long(GroupStateObject *self, PyObject *value, void *closure)
{
    long v = value == NULL ? -1 : PyLong_AsLong(value);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (v < 0) {
        PyErr_SetString(PyExc_ValueError, "GroupState: counts are >= 0");
        return -1;
    }
    if (closure)
        self->devices_unbound = v;
    else
        self->unbound = v;
    return 0;
}

static PyObject *
GroupState_get_obj(GroupStateObject *self, void *closure)
{
    PyObject *o = NULL;
    switch ((int)(intptr_t)closure) {
    case 0: o = self->name; break;
    case 1: o = (PyObject *)self->unbound_lock; break;
    case 2: o = (PyObject *)self->device_lock; break;
    case 3: o = (PyObject *)self->mutex; break;
    case 4: o = (PyObject *)self->refs; break;
    case 5: o = (PyObject *)self->users; break;
    default: o = self->container ? self->container : Py_None;
    }
    Py_INCREF(o);
    return o;
}

static PyMethodDef GroupState_methods[] = {
    {"set_container", (PyCFunction)GroupState_set_container, METH_O,
     "attach (a container) or detach (None); the caller holds group.mutex"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef GroupState_getset[] = {
    {"unbound", (getter)GroupState_get_long, (setter)GroupState_set_long,
     "names on the unbound list (set under unbound_lock)", NULL},
    {"devices_unbound", (getter)GroupState_get_long, (setter)GroupState_set_long,
     "devices not bound (set under device_lock)", (void *)1},
    {"name", (getter)GroupState_get_obj, NULL, "the group's name", (void *)0},
    {"unbound_lock", (getter)GroupState_get_obj, NULL, "group.unbound_lock", (void *)1},
    {"device_lock", (getter)GroupState_get_obj, NULL, "group.device_lock", (void *)2},
    {"mutex", (getter)GroupState_get_obj, NULL, "group.mutex", (void *)3},
    {"refs", (getter)GroupState_get_obj, NULL, "group references", (void *)4},
    {"container_users", (getter)GroupState_get_obj, NULL, "container users", (void *)5},
    {"container", (getter)GroupState_get_obj, NULL, "the attached container", (void *)6},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject GroupStateType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "dmarw._native.GroupState",
    .tp_basicsize = sizeof(GroupStateObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "GroupState(name, unbound_lock, device_lock, mutex, refs, users): a group as the "
              "native per-call path sees it.",
    .tp_new = GroupState_new,
    .tp_dealloc = (destructor)GroupState_dealloc,
    .tp_methods = GroupState_methods,
    .tp_getset = GroupState_getset,
};

static PyObject *vfio_groups;     /* the registry: dmarw.vfio._registry.groups */
static PyObject *vfio_fallback;   /* the Python per-call path */
static LockObject *vfio_group_lock; /* the registry lock when it is native, else NULL */
static PyObject *str_vstate;      /* "_vstate" */
static PyObject *str_group;       /* "group" */
static PyObject *str_dma_rw;      /* "dma_rw" */

/* vfio_setup(groups, fallback): the registry dict and the Python per-call path. */
static PyObject *
vfio_setup(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *groups, *fb;
    if (!PyArg_ParseTuple(args, "O!O:vfio_setup", &PyDict_Type, &groups, &fb))
        return NULL;
    Py_INCREF(groups);
    Py_XSETREF(vfio_groups, groups);
    Py_INCREF(fb);
    Py_XSETREF(vfio_fallback, fb);
    Py_RETURN_NONE;
}

/* vfio_set_group_lock(lock or None): the registry lock the native path takes (None: the
 * registry lock is not native, so every call takes the Python path). */
static PyObject *
vfio_set_group_lock(PyObject *self, PyObject *arg)
{
    (void)self;
    if (arg != Py_None && !PyObject_TypeCheck(arg, &LockType)) {
        PyErr_SetString(PyExc_TypeError, "vfio_set_group_lock: expected a Lock or None");
        return NULL;
    }
    LockObject *old = vfio_group_lock;
    vfio_group_lock = arg == Py_None ? NULL : (LockObject *)arg;
    Py_XINCREF(vfio_group_lock);
    Py_XDECREF(old);
    Py_RETURN_NONE;
}

/* "vfio_dma_rw 0x..+0x..: <detail>" as DmaError(err). */
static PyObject *
vfio_error(int err, uint64_t iova, uint64_t n, PyObject *detail)
{
    if (detail == NULL)
        return NULL;
    char where[64];
    snprintf(where, sizeof where, "vfio_dma_rw 0x%llx+0x%llx", (unsigned long long)iova, (unsigned long long)n);
    PyObject *msg = PyUnicode_FromFormat("%s: %U", where, detail);
    Py_DECREF(detail);
    if (msg == NULL)
        return NULL;
    PyObject *exc = PyObject_CallFunction(error_type ? error_type : PyExc_OSError, "iO", err, msg);
    Py_DECREF(msg);
    if (exc != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
    return NULL;
}

typedef struct {
    GroupStateObject *st; /* a reference while entered */
    PyObject *container;
    CoreObject *core;
} VfioRef;

/* Steps 1-3 of the per-call path on a device with a native group: registry lookup under
 * vfio.group_lock and a group reference, viability under group.unbound_lock and
 * group.device_lock, a container user under group.mutex.  1 entered, 0 not a native
 * device (nothing done, no error), -1 error (every reference dropped again). */
static int
vfio_enter(PyObject *device, uint64_t iova, uint64_t n, VfioRef *r)
{
    LockObject *gl = vfio_group_lock;
    if (gl == NULL || vfio_groups == NULL)
        return 0;
    PyObject *sto = PyObject_GetAttr(device, str_vstate);
    if (sto == NULL || !PyObject_TypeCheck(sto, &GroupStateType)) {
        Py_XDECREF(sto);
        PyErr_Clear();
        return 0;
    }
    GroupStateObject *st = (GroupStateObject *)sto;
    PyObject *grp = PyObject_GetAttr(device, str_group);
    if (grp == NULL) {
        Py_DECREF(st);
        return -1;
    }
    Py_INCREF(gl);
    lock_take(gl);
    PyObject *found = PyDict_GetItemWithError(vfio_groups, st->name);
    int registered = found != NULL && found == grp;
    if (registered)
        __atomic_fetch_add(&st->refs->v, 1, __ATOMIC_ACQ_REL);
    lock_drop(gl);
    Py_DECREF(gl);
    Py_DECREF(grp);
    if (!registered) {
        Py_DECREF(st);
        if (PyErr_Occurred())
            return -1;
        vfio_error(ENODEV, iova, n, PyUnicode_FromFormat("%R: group is not registered", device));
        return -1;
    }
    lock_take(st->unbound_lock);
    int viable = st->unbound == 0;
    lock_drop(st->unbound_lock);
    if (viable) {
        lock_take(st->device_lock);
        viable = st->devices_unbound == 0;
        lock_drop(st->device_lock);
    }
    if (!viable) {
        __atomic_fetch_sub(&st->refs->v, 1, __ATOMIC_ACQ_REL);
        vfio_error(EINVAL, iova, n, PyUnicode_FromFormat("group %R is not viable (unbound device)", st->name));
        Py_DECREF(st);
        return -1;
    }
    lock_take(st->mutex);
    PyObject *c = st->container;
    CoreObject *core = st->core;
    if (c != NULL) {
        Py_INCREF(c);
        Py_XINCREF(core);
        __atomic_fetch_add(&st->users->v, 1, __ATOMIC_ACQ_REL);
    }
    lock_drop(st->mutex);
    if (c == NULL) {
        __atomic_fetch_sub(&st->refs->v, 1, __ATOMIC_ACQ_REL);
        vfio_error(EINVAL, iova, n, PyUnicode_FromFormat("group %R is not attached to a container", st->name));
        Py_DECREF(st);
        return -1;
    }
    r->st = st;
    r->container = c;
    r->core = core;
    return 1;
}

/* Step 5: drop the container user and the group reference (atomics, no lock). */
static void
vfio_leave(VfioRef *r)
{
    __atomic_fetch_sub(&r->st->users->v, 1, __ATOMIC_ACQ_REL);
    __atomic_fetch_sub(&r->st->refs->v, 1, __ATOMIC_ACQ_REL);
    Py_XDECREF(r->core);
    Py_DECREF(r->container);
    Py_DECREF(r->st);
}

/* vfio_dma_rw(device, iova, buf, write): the per-call path in one call when the device's
 * group is native and the registry lock is native; otherwise the Python path. */
static PyObject *
vfio_dma_rw(PyObject *self, PyObject *const *args_in, Py_ssize_t nargs, PyObject *kwnames)
{
    (void)self;
    static const char *const names[] = {"device", "iova", "buf", "write"};
    PyObject *args[4];
    if (bind_args(args_in, nargs, kwnames, names, 4, args, "vfio_dma_rw") < 0)
        return NULL;
    uint64_t iova;
    int oor = 1;
    Py_buffer v;
    if (!PyLong_CheckExact(args[1]) || parse_addr(args[1], &iova, &oor) < 0 || oor) {
        PyErr_Clear();
        goto fallback; /* unusual addresses: the Python path words the error */
    }
    if (PyObject_GetBuffer(args[2], &v, PyBUF_SIMPLE) < 0) {
        PyErr_Clear();
        goto fallback;
    }
    int write = PyObject_IsTrue(args[3]);
    if (write < 0) {
        PyBuffer_Release(&v);
        return NULL;
    }
    VfioRef r;
    int in = vfio_enter(args[0], iova, (uint64_t)v.len, &r);
    if (in <= 0) {
        PyBuffer_Release(&v);
        if (in < 0)
            return NULL;
        goto fallback;
    }
    PyObject *ret;
    if (r.core != NULL) {
        ret = core_dma_rw_checked(r.core, iova, 0, &v, write);
    } else {
        PyObject *call[4] = {r.container, args[1], args[2], args[3]};
        ret = PyObject_VectorcallMethod(str_dma_rw, call, 4 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    }
    PyBuffer_Release(&v);
    vfio_leave(&r);
    return ret;
fallback:
    if (vfio_fallback == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "vfio_dma_rw: vfio_setup() was not called");
        return NULL;
    }
    return PyObject_Vectorcall(vfio_fallback, args_in, nargs, kwnames);
}

/* One per-call dma_rw for vfio_replay: the device's native group and container only. */
static PyObject *
vfio_replay_one(PyObject *device, uint64_t iova, Py_buffer *v, int write)
{
    VfioRef r;
    int in = vfio_enter(device, iova, (uint64_t)v->len, &r);
    if (in <= 0) {
        if (in == 0)
            PyErr_SetString(PyExc_TypeError,
                            "vfio_replay: the device's group or the registry lock is not native");
        return NULL;
    }
    PyObject *ret;
    if (r.core == NULL) {
        PyErr_SetString(PyExc_TypeError, "vfio_replay: the group's container is not native");
        ret = NULL;
    } else {
        ret = core_dma_rw_checked(r.core, iova, 0, v, write);
    }
    vfio_leave(&r);
    return ret;
}

/* vfio_replay(device, writes, addrs, sizes, buf, deltas=None): Core.replay through the
 * per-call path (steps 1-5 on every record), each call timed with the cycle counter. */
static PyObject *
vfio_replay(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *dev, *ow, *oa, *os, *ob, *od = NULL;
    if (!PyArg_ParseTuple(args, "OOOOO|O:vfio_replay", &dev, &ow, &oa, &os, &ob, &od))
        return NULL;
    Records r;
    if (records_get(&r, ow, oa, os, ob, od) < 0)
        return NULL;
    PyObject *ret = replay_records(&r, vfio_replay_one, dev);
    records_release(&r);
    return ret;
}

/* ---- module ------------------------------------------------------------------------ */

static PyMethodDef module_methods[] = {
    {"cycles", cycles, METH_NOARGS, "the cycle counter (rdtsc, or CLOCK_MONOTONIC ns)"},
    {"tsc_hz", tsc_hz, METH_NOARGS, "counter ticks per second (calibrated once)"},
    {"counter_kind", counter_kind, METH_NOARGS, "'rdtsc' or 'clock_monotonic'"},
    {"timer_overhead", timer_overhead, METH_O, "median cycles of a back-to-back counter pair"},
    {"bitmap_mark", (PyCFunction)(void (*)(void))bitmap_mark, METH_FASTCALL,
     "bitmap_mark(buf, first, last): atomically set bits first..last"},
    {"bitmap_take", (PyCFunction)(void (*)(void))bitmap_take, METH_VARARGS | METH_KEYWORDS,
     "bitmap_take(buf, keep=None) -> bytes: get and clear, re-setting keep"},
    {"bitmap_peek", bitmap_peek, METH_O, "bitmap_peek(buf) -> bytes"},
    {"hva_read", (PyCFunction)(void (*)(void))hva_read, METH_FASTCALL,
     "hva_read(hva, buf): fill buf from a host address (unchecked)"},
    {"hva_write", (PyCFunction)(void (*)(void))hva_write, METH_FASTCALL,
     "hva_write(hva, data): copy data to a host address (unchecked)"},
    {"set_error_type", set_error_type, METH_O, "the exception type raised (dmarw.DmaError)"},
    {"set_lockstat", set_lockstat, METH_O, "count and time acquisitions in dmarw.lockstat"},
    {"vfio_setup", vfio_setup, METH_VARARGS, "vfio_setup(groups, fallback): the registry and the Python path"},
    {"vfio_set_group_lock", vfio_set_group_lock, METH_O,
     "the registry lock the native per-call path takes (a Lock), or None"},
    {"vfio_dma_rw", (PyCFunction)(void (*)(void))vfio_dma_rw, METH_FASTCALL | METH_KEYWORDS,
     "vfio_dma_rw(device, iova, buf, write): the per-call path (registry lookup under "
     "vfio.group_lock, viability under group.unbound_lock and group.device_lock, a container "
     "user under group.mutex, the container's dma_rw, references dropped) in one call"},
    {"vfio_replay", vfio_replay, METH_VARARGS,
     "vfio_replay(device, writes, addrs, sizes, buf, deltas=None) -> (read_cycles, reads, "
     "write_cycles, writes): Core.replay through the per-call path"},
    {"set_gil_threshold", set_gil_threshold, METH_O,
     "copies of at least this many bytes release the GIL; returns the old value"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT, "dmarw._native", "dmarw's native hot path", -1, module_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__native(void)
{
    use_tsc = cpu_has_invariant_tsc();
    if (rcu_init() < 0) {
        PyErr_SetString(PyExc_OSError, "dmarw._native: pthread_key_create failed");
        return NULL;
    }
    str_exited = PyUnicode_InternFromString("_exited");
    str_kthread = PyUnicode_InternFromString("kthread");
    str_released = PyUnicode_InternFromString("released");
    str_active = PyUnicode_InternFromString("_active");
    str_timed = PyUnicode_InternFromString("timed");
    str_vstate = PyUnicode_InternFromString("_vstate");
    str_group = PyUnicode_InternFromString("group");
    str_dma_rw = PyUnicode_InternFromString("dma_rw");
    if (str_exited == NULL || str_kthread == NULL || str_released == NULL || str_active == NULL ||
        str_timed == NULL || str_vstate == NULL || str_group == NULL || str_dma_rw == NULL)
        return NULL;
    if (PyType_Ready(&MmRefType) < 0 || PyType_Ready(&TableType) < 0 ||
        PyType_Ready(&CoreType) < 0 || PyType_Ready(&AtomicType) < 0 || PyType_Ready(&LockType) < 0 ||
        PyType_Ready(&GroupStateType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&native_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&MmRefType);
    Py_INCREF(&TableType);
    Py_INCREF(&CoreType);
    Py_INCREF(&AtomicType);
    Py_INCREF(&LockType);
    Py_INCREF(&GroupStateType);
    if (PyModule_AddObject(m, "MmRef", (PyObject *)&MmRefType) < 0 ||
        PyModule_AddObject(m, "Atomic", (PyObject *)&AtomicType) < 0 ||
        PyModule_AddObject(m, "Lock", (PyObject *)&LockType) < 0 ||
        PyModule_AddObject(m, "GroupState", (PyObject *)&GroupStateType) < 0 ||
        PyModule_AddObject(m, "Table", (PyObject *)&TableType) < 0 ||
        PyModule_AddObject(m, "Core", (PyObject *)&CoreType) < 0 ||
        PyModule_AddIntConstant(m, "HAVE_RDTSC", HAVE_RDTSC) < 0 ||
        PyModule_AddIntConstant(m, "HAVE_MEMBARRIER", have_membarrier) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
