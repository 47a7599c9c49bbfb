/* locks.c: the native locks: a futex mutex, pthread helpers, one process-wide RCU domain,
 * and the reader/writer lock (with the current table) of every core object.
 *
 * Futex mutex (Drepper, "Futexes are tricky", mutex 3 simplified): 0 free, 1 held, 2 held
 * and maybe waited for; uncontended, one locked compare-exchange to take and one locked
 * exchange to drop.  Process-private.
 *
 * RCU: a reader stores the grace-period counter it started in into its thread's slot and,
 * on unlock, stores 0: no atomic read-modify-write, no shared cache line.  A writer, after
 * publishing, advances the counter, issues membarrier(PRIVATE_EXPEDITED) — a full barrier
 * on every running thread of the process, so a reader's slot store can no longer hide in
 * its store buffer — and waits until no slot holds a counter from before the advance
 * (liburcu's "memb" flavour).  Without membarrier a reader issues a full fence instead.
 * Slots are never freed (a thread's slot is reused after it exits), so a writer walks the
 * list without a lock.  Readers nest (a per-slot depth).
 *
 * SRCU (the KVM core): readers count themselves in the epoch's parity; a grace period
 * advances the epoch and waits until the old parity's count drops to zero.
 *
 * The core lock (CoreBase): strategy mutex (readers and writers exclusive), rwsem
 * (writer-preferring pthread rwlock), rcu (readers lock-free, writers on the futex mutex,
 * synchronize waits for a grace period) or srcu.  Every wait drops the GIL (the holder may
 * need it).  The table pointer is published with a seq_cst store under the write side.
 */
#include "dmarw.h"

#include <linux/futex.h>
#include <linux/membarrier.h>
#include <sched.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

void
fmutex_wait(unsigned *m)
{
    Py_BEGIN_ALLOW_THREADS
    while (__atomic_exchange_n(m, 2, __ATOMIC_ACQUIRE) != 0)
        syscall(SYS_futex, m, FUTEX_WAIT_PRIVATE, 2, NULL, NULL, 0);
    Py_END_ALLOW_THREADS
}

void
fmutex_wake(unsigned *m)
{
    syscall(SYS_futex, m, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
}

/* Take a pthread mutex; if it is busy, wait without the GIL (the holder may need it). */
void
mutex_lock_nogil(pthread_mutex_t *m)
{
    if (pthread_mutex_trylock(m) == 0)
        return;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(m);
    Py_END_ALLOW_THREADS
}

/* ---- rcu ------------------------------------------------------------------------------ */

static RcuSlot *rcu_slots;           /* list head, pushed under rcu_reg_lock */
static pthread_mutex_t rcu_reg_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t rcu_gp_lock = PTHREAD_MUTEX_INITIALIZER;
unsigned long rcu_gp = 1;     /* grace-period counter (atomic) */
static pthread_key_t rcu_key;
_Thread_local RcuSlot *rcu_my_slot __attribute__((tls_model("initial-exec")));
int have_membarrier;

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

int
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

RcuSlot *
rcu_slot_slow(void)
{
    RcuSlot *s;
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

/* Wait for every reader that may have seen what was published before the call.
 * Called with the GIL held; waits without it. */
void
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

/* ---- the core lock ---------------------------------------------------------------------- */

int
core_base_new(CoreBase *c)
{
    c->lock = LOCK_MUTEX;
    c->mm_mode = MM_MMGET_NOT_ZERO;
    c->shift = 12;
    c->ready = 0;
    c->mutex = 0;
    pthread_rwlockattr_t ra;
    pthread_rwlockattr_init(&ra);
    pthread_rwlockattr_setkind_np(&ra, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&c->rwsem, &ra);
    pthread_rwlockattr_destroy(&ra);
    pthread_mutex_init(&c->gp_lock, NULL);
    c->epoch = 1;
    c->table = (TableObject *)PyObject_CallFunction((PyObject *)&TableType, "(())");
    return c->table == NULL ? -1 : 0;
}

void
core_base_clear(CoreBase *c)
{
    Py_CLEAR(c->table);
    stat_class_clear(&c->read_stat);
    stat_class_clear(&c->write_stat);
    stat_class_clear(&c->task_stat);
    pthread_rwlock_destroy(&c->rwsem);
    pthread_mutex_destroy(&c->gp_lock);
}

PyObject *
core_not_ready(void)
{
    PyErr_SetString(PyExc_RuntimeError, "dmarw._native: core object used before _setup()");
    return NULL;
}

/* _setup(lock, mm_ref, shift, read=(class, counter), write=..., task=...): once, from the
 * Python side's lock hook, before the object is used. */
int
core_base_setup(CoreBase *c, PyObject *args, PyObject *kwargs, int kvm)
{
    static char *kwlist[] = {"lock", "mm_ref", "shift", "read", "write", "task", NULL};
    const char *lock = kvm ? "srcu" : "mutex", *mm_ref = "mmget_not_zero";
    int shift = 12;
    PyObject *rd = NULL, *wr = NULL, *tk = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|ssiOOO:_setup", kwlist, &lock, &mm_ref, &shift, &rd, &wr,
                                     &tk))
        return -1;
    if (c->ready) {
        PyErr_SetString(PyExc_RuntimeError, "_setup: already set up");
        return -1;
    }
    int lk = strcmp(lock, "mutex") == 0   ? LOCK_MUTEX
             : strcmp(lock, "rwsem") == 0 ? LOCK_RWSEM
             : strcmp(lock, "rcu") == 0   ? LOCK_RCU
             : strcmp(lock, "srcu") == 0  ? LOCK_SRCU
                                          : -1;
    int mm = strcmp(mm_ref, "mmget_not_zero") == 0 ? MM_MMGET_NOT_ZERO
             : strcmp(mm_ref, "get_task_mm") == 0  ? MM_GET_TASK_MM
                                                   : -1;
    if (lk < 0 || mm < 0 || (kvm != (lk == LOCK_SRCU)) || shift < 12 || shift > 40) {
        PyErr_Format(PyExc_ValueError, "_setup: bad lock %s / mm_ref %s / shift %d", lock, mm_ref, shift);
        return -1;
    }
    PyObject *none2[2] = {NULL, NULL};
    PyObject *pairs[3] = {rd, wr, tk};
    StatClass *dst[3] = {&c->read_stat, &c->write_stat, &c->task_stat};
    for (int i = 0; i < 3; i++) {
        PyObject *cls = none2[0], *cnt = none2[1];
        if (pairs[i] != NULL && pairs[i] != Py_None) {
            if (!PyTuple_Check(pairs[i]) || PyTuple_GET_SIZE(pairs[i]) != 2) {
                PyErr_SetString(PyExc_TypeError, "_setup: a lock class is (LockClass, Atomic)");
                return -1;
            }
            cls = PyTuple_GET_ITEM(pairs[i], 0);
            cnt = PyTuple_GET_ITEM(pairs[i], 1);
        }
        if (stat_class_init(dst[i], cls, cnt) < 0)
            return -1;
    }
    c->lock = lk;
    c->mm_mode = mm;
    c->shift = shift;
    c->ready = 1;
    return 0;
}

/* rwsem reader that must wait: without the GIL, then counted as core_read_lock does. */
int
core_read_lock_slow(CoreBase *c, int timing, uint64_t t0)
{
    Py_BEGIN_ALLOW_THREADS
    pthread_rwlock_rdlock(&c->rwsem);
    Py_END_ALLOW_THREADS
    stat_hit(&c->read_stat, timing, timing ? read_cycles() - t0 : 0);
    return 0;
}

static PyObject *
Core_read_acquire(CoreBase *self, PyObject *unused)
{
    (void)unused;
    if (!self->ready)
        return core_not_ready();
    return PyLong_FromLong(core_read_lock(self));
}

static PyObject *
Core_read_release(CoreBase *self, PyObject *token)
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

/* Writer side: the futex mutex (mutex, rcu, srcu) or the rwsem's write lock. */
static PyObject *
Core_write_acquire(CoreBase *self, PyObject *unused)
{
    (void)unused;
    if (!self->ready)
        return core_not_ready();
    int timing = stats_timing;
    uint64_t t0 = timing ? read_cycles() : 0;
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
    stat_hit(&self->write_stat, timing, timing ? read_cycles() - t0 : 0);
    Py_RETURN_NONE;
}

static PyObject *
Core_write_release(CoreBase *self, PyObject *unused)
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
 * mutex and rwsem: writers exclude readers, nothing to wait for. */
static PyObject *
Core_synchronize(CoreBase *self, PyObject *unused)
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
Core_set_table(CoreBase *self, PyObject *table)
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

static PyObject *
Core_lock_stats(CoreBase *self, PyObject *unused)
{
    (void)unused;
    return Py_BuildValue("{slsl}", "reads", __atomic_load_n(&self->reads, __ATOMIC_RELAXED), "writes",
                         __atomic_load_n(&self->writes, __ATOMIC_RELAXED));
}

static PyObject *
Core_setup(CoreBase *self, PyObject *args, PyObject *kwargs)
{
    if (core_base_setup(self, args, kwargs, PyObject_TypeCheck((PyObject *)self, &KvmType)) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
CoreBase_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    (void)args; /* the Python class's __init__ takes the arguments; _setup() configures */
    (void)kwargs;
    CoreBase *c = (CoreBase *)type->tp_alloc(type, 0);
    if (c != NULL && core_base_new(c) < 0) {
        Py_DECREF(c);
        return NULL;
    }
    return (PyObject *)c;
}

static void
CoreBase_dealloc(CoreBase *self)
{
    core_base_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef core_base_methods[] = {
    {"_setup", (PyCFunction)(void (*)(void))Core_setup, METH_VARARGS | METH_KEYWORDS,
     "_setup(lock, mm_ref, shift, read, write, task): the lock strategy and lock classes, once"},
    {"read_acquire", (PyCFunction)Core_read_acquire, METH_NOARGS, "reader side; returns a token"},
    {"read_release", (PyCFunction)Core_read_release, METH_O, "end the reader side"},
    {"write_acquire", (PyCFunction)Core_write_acquire, METH_NOARGS, "writer side"},
    {"write_release", (PyCFunction)Core_write_release, METH_NOARGS, "end the writer side"},
    {"synchronize", (PyCFunction)Core_synchronize, METH_NOARGS, "grace period (rcu, srcu)"},
    {"set_table", (PyCFunction)Core_set_table, METH_O, "install a Table (write side held)"},
    {"lock_stats", (PyCFunction)Core_lock_stats, METH_NOARGS, "acquisitions of the read and write sides"},
    {NULL, NULL, 0, NULL},
};

PyTypeObject CoreBaseType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "dmarw._native.CoreBase",
    .tp_basicsize = sizeof(CoreBase),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "The reader/writer lock and current Table shared by Type1 and Kvm.",
    .tp_new = CoreBase_new,
    .tp_dealloc = (destructor)CoreBase_dealloc,
    .tp_methods = core_base_methods,
};
