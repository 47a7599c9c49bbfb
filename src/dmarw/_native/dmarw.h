/* dmarw.h: the native core's one internal header.
 *
 * What every file of dmarw._native shares: the object layouts, the hot inline helpers
 * (the cycle counter, the untimed lock count, the futex mutex, the rcu reader, a table
 * lookup, a dirty mark, argument binding) and the few process-wide variables.  Each .c
 * file opens with the rule and the lock it implements.
 *
 * Everything runs with the GIL held except the copies of at least gil_threshold bytes and
 * any wait for a lock or a grace period.  No Python private attribute and no CPython
 * internal structure is read: the Python side hands C what it needs (flags as native
 * atomics, lock classes with their native counters) through public calls.
 */
#ifndef DMARW_NATIVE_H
#define DMARW_NATIVE_H

#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <x86intrin.h>
#define HAVE_RDTSC 1
#else
#define HAVE_RDTSC 0
#endif

#define PROT_R 1
#define PROT_W 2
#define KVM_PAGE 4096u
#define SMALL_CHUNKS 8

enum { LOCK_MUTEX = 0, LOCK_RWSEM = 1, LOCK_RCU = 2, LOCK_SRCU = 3 };
enum { MM_MMGET_NOT_ZERO = 0, MM_GET_TASK_MM = 1 };

/* ---- module.c: errors and settings ------------------------------------------------ */
extern Py_ssize_t gil_threshold;
/* Raise the error dmarw.errors.error(key, *fields) builds; fields as Py_BuildValue
 * ``fmt``.  Returns NULL for the caller to return. */
PyObject *dma_error(const char *key, const char *fmt, ...);
/* Call dmarw.errors.<fn>(*args from fmt), which raises for invalid arguments; if it
 * returns, the cores disagree about the rules: SystemError.  Returns NULL. */
PyObject *rules_error(const char *fn, const char *fmt, ...);
/* Raise the exception dmarw.errors.<fn>(*fields) returns.  Returns NULL. */
PyObject *errors_raise(const char *fn, const char *fmt, ...);

/* ---- counter.c -------------------------------------------------------------------- */
extern int use_tsc;
uint64_t now_ns(void);
double calibrate(int nogil);
int cpu_has_invariant_tsc(void);

static inline uint64_t
read_cycles(void)
{
#if HAVE_RDTSC
    if (use_tsc)
        return __rdtsc();
#endif
    return now_ns();
}

/* ---- atomics (mm.c) ---------------------------------------------------------------- */
typedef struct {
    PyObject_HEAD
    long v; /* atomic */
} AtomicObject;
extern PyTypeObject AtomicType;

typedef struct {
    PyObject_HEAD
    long users;  /* native users in flight (atomic) */
    int exited;  /* the owner has exited (atomic; set once by exit()) */
    int kthread; /* the owner is a kernel thread (set at creation) */
    pthread_mutex_t task_lock;
} MmRefObject;
extern PyTypeObject MmRefType;

/* ---- lockstat.c ------------------------------------------------------------------- */
/* A lock class as C sees it: its dmarw.lockstat.LockClass (for timed acquisitions, its
 * public timed(ns)) and its native counter (an Atomic the Python side gave it). */
typedef struct {
    PyObject *cls;
    AtomicObject *count;
} StatClass;

extern int stats_timing; /* set by set_timing() when the first collect() block opens */
int stat_class_init(StatClass *sc, PyObject *cls, PyObject *count);
void stat_class_clear(StatClass *sc);
void stat_timed(StatClass *sc, uint64_t ticks);

/* Count one acquisition.  The GIL is held by every caller, so a plain load and store is
 * exact against every other update of the counter; relaxed atomics keep readers race-free. */
static inline void
gil_count(long *n)
{
    __atomic_store_n(n, __atomic_load_n(n, __ATOMIC_RELAXED) + 1, __ATOMIC_RELAXED);
}

/* One acquisition: counted (the usual case, inline) or, while collecting, timed. */
static inline void
stat_hit(StatClass *sc, int timing, uint64_t ticks)
{
    if (!timing) {
        if (sc->count != NULL)
            gil_count(&sc->count->v);
        return;
    }
    stat_timed(sc, ticks);
}

/* ---- locks.c: futex mutex, pthread helpers, rcu, the core's reader/writer lock ----- */
static inline int
fmutex_trylock(unsigned *m)
{
    unsigned z = 0;
    return __atomic_compare_exchange_n(m, &z, 1, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED);
}
void fmutex_wait(unsigned *m);
void fmutex_wake(unsigned *m);

/* Take the futex mutex; if it is busy, wait without the GIL (the holder may need it). */
static inline void
fmutex_lock_nogil(unsigned *m)
{
    if (!fmutex_trylock(m))
        fmutex_wait(m);
}

static inline void
fmutex_unlock(unsigned *m)
{
    if (__atomic_exchange_n(m, 0, __ATOMIC_RELEASE) == 2)
        fmutex_wake(m);
}

void mutex_lock_nogil(pthread_mutex_t *m);

typedef struct RcuSlot {
    unsigned long ctr; /* 0 outside a read section, else the counter at entry (atomic) */
    int nest;          /* owner thread only */
    int owned;         /* under rcu_reg_lock */
    struct RcuSlot *next;
} RcuSlot;

extern unsigned long rcu_gp;
extern int have_membarrier;
extern _Thread_local RcuSlot *rcu_my_slot __attribute__((tls_model("initial-exec")));
RcuSlot *rcu_slot_slow(void);
int rcu_init(void);
void rcu_synchronize(void);

/* 0, or -1 (out of memory: no slot) */
static inline int
rcu_read_lock(void)
{
    RcuSlot *s = rcu_my_slot;
    if (s == NULL && (s = rcu_slot_slow()) == NULL)
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

/* ---- table.c: one immutable snapshot of mappings ---------------------------------- */
typedef struct {
    uint64_t start; /* iova or gpa */
    uint64_t size;
    char *mem; /* host memory of start, or NULL when the backing is already gone */
    int prot;
    int have_view;
    int have_bits;
    long ident;      /* the memslot id (KVM), else 0 */
    Py_buffer view;  /* export on the region's mmap: keeps the memory mapped */
    Py_buffer bview; /* export on the dirty bitmap's words */
    AtomicObject *gone; /* non-zero once the region is released */
    MmRefObject *mm;    /* the owner's native user count, or NULL (KVM) */
} Entry;

typedef struct {
    PyObject_HEAD
    Py_ssize_t n;
    Entry *e;
} TableObject;
extern PyTypeObject TableType;

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

static inline int
entry_gone(const Entry *e)
{
    return e->mem == NULL || __atomic_load_n(&e->gone->v, __ATOMIC_ACQUIRE) != 0;
}

/* ---- bitmap.c ----------------------------------------------------------------------- */
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
int get_words(PyObject *obj, Py_buffer *view, int writable);
void copy_bytes(void *dst, const void *src, size_t n);

/* ---- locks.c: the reader/writer lock and current table of a core object ----------- */
/* The head of a Type1 and a Kvm object: its lock strategy, the table readers see, the
 * acquisition counts and lock classes.  Set up once by _setup() from Python. */
typedef struct {
    PyObject_HEAD
    int lock;    /* LOCK_* */
    int mm_mode; /* MM_* */
    int shift;   /* dirty page shift */
    int ready;   /* _setup() done */
    TableObject *table;
    unsigned mutex;          /* mutex strategy; the writers' lock for rcu (futex mutex) */
    pthread_rwlock_t rwsem;
    pthread_mutex_t gp_lock; /* serialises srcu grace periods */
    unsigned long epoch;     /* srcu: grace-period counter (atomic) */
    long readers[2];         /* srcu: readers in each epoch parity (atomic) */
    long reads, writes;      /* acquisitions of each side (gil_count) */
    StatClass read_stat, write_stat, task_stat;
} CoreBase;

int core_base_new(CoreBase *c);
void core_base_clear(CoreBase *c);
int core_base_setup(CoreBase *c, PyObject *args, PyObject *kwargs, int kvm);
extern PyTypeObject CoreBaseType; /* the lock, _setup, set_table, lock_stats (shared) */
PyObject *core_not_ready(void);
int core_read_lock_slow(CoreBase *c, int timing, uint64_t t0);

/* Reader side: mutex or rwsem read lock (waiting without the GIL), an rcu read section
 * (a store to this thread's slot), or an srcu read section (the epoch's reader count).
 * Returns the token for core_read_unlock. */
static inline __attribute__((always_inline)) int
core_read_lock(CoreBase *c)
{
    int timing = stats_timing;
    uint64_t t0 = timing ? read_cycles() : 0;
    int token = 0;
    gil_count(&c->reads);
    switch (c->lock) {
    case LOCK_MUTEX:
        fmutex_lock_nogil(&c->mutex);
        break;
    case LOCK_RWSEM:
        if (pthread_rwlock_tryrdlock(&c->rwsem) != 0)
            return core_read_lock_slow(c, timing, t0);
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
    stat_hit(&c->read_stat, timing, timing ? read_cycles() - t0 : 0);
    return token;
}

static inline __attribute__((always_inline)) void
core_read_unlock(CoreBase *c, int token)
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

/* ---- mm.c: address-space references ---------------------------------------------- */
int mm_get_task(MmRefObject *mm, StatClass *task_stat);

/* mmget_not_zero / get_task_mm on the native count: 1 counted, 0 refused. */
static inline int
mm_get(MmRefObject *mm, int mode, StatClass *task_stat)
{
    if (mode == MM_GET_TASK_MM)
        return mm_get_task(mm, task_stat);
    if (__atomic_load_n(&mm->exited, __ATOMIC_ACQUIRE))
        return 0;
    __atomic_fetch_add(&mm->users, 1, __ATOMIC_ACQUIRE);
    return 1;
}

static inline void
mm_put(MmRefObject *mm)
{
    __atomic_fetch_sub(&mm->users, 1, __ATOMIC_RELEASE);
}

/* ---- args.c: argument binding and addresses --------------------------------------- */
int bind_args_slow(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                   const char *const *names, int n, PyObject **out, const char *fname);

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

/* An address as u64: 0 for a valid one (an exact int in [0, 2**64)), -1 for anything
 * else with no exception set (the caller asks dmarw.errors for the error). */
static inline int
parse_addr(PyObject *obj, uint64_t *addr)
{
    if (!PyLong_CheckExact(obj))
        return -1;
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (overflow == 0 && v >= 0) {
        *addr = (uint64_t)v;
        return 0;
    }
    if (overflow <= 0) {
        PyErr_Clear();
        return -1;
    }
    unsigned long long u = PyLong_AsUnsignedLongLong(obj);
    if (u == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return -1;
    }
    *addr = u;
    return 0;
}

/* addr + n > 2**64: the range runs past the top of the address space. */
static inline int
past_end(uint64_t addr, uint64_t n)
{
    return n > 0 && addr + n - 1 < addr;
}

/* A write flag: True/False and exact ints inline, else its truth value (-1 error). */
static inline int
parse_flag(PyObject *o)
{
    if (o == Py_True)
        return 1;
    if (o == Py_False)
        return 0;
    return PyObject_IsTrue(o);
}

/* ---- replay (counter.c) ------------------------------------------------------------ */
typedef struct {
    Py_buffer w, a, sz, b, d;
    int got;
    int have_d;
    Py_ssize_t n;
} Records;
typedef PyObject *(*ReplayOne)(PyObject *target, uint64_t addr, Py_buffer *one, int write);
int records_get(Records *r, PyObject *ow, PyObject *oa, PyObject *os, PyObject *ob, PyObject *od);
void records_release(Records *r);
PyObject *replay_records(Records *r, ReplayOne one, PyObject *target);
PyObject *replay_method(PyObject *target, int ready, PyObject *args, ReplayOne one);

/* ---- type1.c, kvm.c, vfio.c --------------------------------------------------------- */
typedef struct {
    CoreBase base;
} Type1Object;
extern PyTypeObject Type1Type;
/* dma_rw after the argument checks (valid iova, a non-empty buffer that fits): the read
 * side, the walk, the copy. */
PyObject *type1_dma_rw_run(Type1Object *c, uint64_t iova, Py_buffer *v, int write);
PyObject *type1_dma_rw_obj(Type1Object *c, PyObject *iova_obj, PyObject *buf_obj, int write);

typedef struct {
    CoreBase base;
} KvmObject;
extern PyTypeObject KvmType;

typedef struct {
    PyObject_HEAD
    Type1Object *container; /* NULL once closed */
    PyObject *group_name;
} HandleObject;
extern PyTypeObject HandleType;

extern PyTypeObject LockType;
extern PyTypeObject GroupStateType;
int vfio_init(void); /* interned attribute names, from PyInit */
PyObject *vfio_setup(PyObject *self, PyObject *args);
PyObject *vfio_set_group_lock(PyObject *self, PyObject *arg);
PyObject *vfio_dma_rw(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames);
PyObject *vfio_replay(PyObject *self, PyObject *args);

/* module-level functions defined across files */
PyObject *py_cycles(PyObject *self, PyObject *unused);
PyObject *py_tsc_hz(PyObject *self, PyObject *unused);
PyObject *py_counter_kind(PyObject *self, PyObject *unused);
PyObject *py_timer_overhead(PyObject *self, PyObject *arg);
PyObject *py_bitmap_mark(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *py_bitmap_take(PyObject *self, PyObject *args, PyObject *kwargs);
PyObject *py_bitmap_peek(PyObject *self, PyObject *arg);
PyObject *py_hva_read(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *py_hva_write(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *py_set_timing(PyObject *self, PyObject *arg);
void checksum_init(void);
PyObject *py_crc32c(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *py_crc32c_portable(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *py_crc32c_impl(PyObject *self, PyObject *unused);
PyObject *py_crc32c_select(PyObject *self, PyObject *arg);
PyObject *py_crc32c_pages(PyObject *self, PyObject *const *args, Py_ssize_t nargs);

/* ---- pageio.c --------------------------------------------------------------------- */
PyObject *py_send_pages(PyObject *self, PyObject *const *args, Py_ssize_t nargs);

#endif
