/* dmarw._vmm: the vCPU exit loop of dmarw.vmm, in C.
 *
 * One object per vCPU (VcpuLoop) owns the mapped struct kvm_run and runs KVM_RUN with the
 * GIL released.  Each exit is decoded here; an MMIO or port access that falls in a range of
 * one of the two device buses (Bus: sorted, non-overlapping [start, end) ranges, each with
 * a bound read and write method) is served by calling that method with the GIL held, and
 * the vCPU re-enters the guest without returning to Python.  Every other exit returns a
 * tuple that dmarw.vmm.exits turns into an Exit.
 *
 * Kick (any thread): set kvm_run.immediate_exit, then, if the vCPU thread is inside the
 * loop, send it SIGNAL_KICK (a no-op handler without SA_RESTART), so a KVM_RUN in progress
 * returns EINTR and one about to start returns at once.  `lock` guards in_loop/thread so a
 * signal is only ever sent to a thread that is inside run().
 *
 * Locking: the Bus arrays are replaced only with the GIL held and read only with it held
 * (the callback runs with the GIL; a range is looked up again at every exit).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>

#define SIGNAL_KICK (SIGRTMIN + 3)

/* ---------------------------------------------------------------- device bus ---- */

typedef struct {
    uint64_t start, end;
    PyObject *read;  /* bound device.mmio_read / pio_read */
    PyObject *write; /* bound device.mmio_write / pio_write */
} Range;

typedef struct {
    PyObject_HEAD
    Range *ranges;
    Py_ssize_t n;
} Bus;

static void bus_clear(Bus *b)
{
    for (Py_ssize_t i = 0; i < b->n; i++) {
        Py_XDECREF(b->ranges[i].read);
        Py_XDECREF(b->ranges[i].write);
    }
    PyMem_Free(b->ranges);
    b->ranges = NULL;
    b->n = 0;
}

static void bus_dealloc(Bus *b)
{
    bus_clear(b);
    Py_TYPE(b)->tp_free((PyObject *)b);
}

/* Bus.set([(start, size, read, write), ...]) sorted by start, non-overlapping (the Python
 * layer validates; this only checks the order so the binary search is sound). */
static PyObject *bus_set(Bus *b, PyObject *arg)
{
    PyObject *seq = PySequence_Fast(arg, "Bus.set takes a sequence of (start, size, read, write)");
    if (!seq)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    Range *r = PyMem_Calloc(n ? n : 1, sizeof(Range));
    if (!r) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned long long start, size;
        PyObject *rd, *wr;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "KKOO", &start, &size, &rd, &wr))
            goto bad;
        if (size == 0 || start + size < start || (i && start < r[i - 1].end)) {
            PyErr_Format(PyExc_ValueError, "Bus.set: range %zd 0x%llx+0x%llx out of order", i, start, size);
            goto bad;
        }
        r[i].start = start;
        r[i].end = start + size;
        Py_INCREF(rd);
        Py_INCREF(wr);
        r[i].read = rd;
        r[i].write = wr;
        continue;
    bad:
        for (Py_ssize_t j = 0; j < i; j++) {
            Py_DECREF(r[j].read);
            Py_DECREF(r[j].write);
        }
        PyMem_Free(r);
        Py_DECREF(seq);
        return NULL;
    }
    Py_DECREF(seq);
    bus_clear(b);
    b->ranges = r;
    b->n = n;
    Py_RETURN_NONE;
}

static Range *bus_find(Bus *b, uint64_t addr, uint64_t len)
{
    Py_ssize_t lo = 0, hi = b->n;
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) / 2;
        if (b->ranges[mid].end <= addr)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo < b->n && b->ranges[lo].start <= addr && addr + len <= b->ranges[lo].end)
        return &b->ranges[lo];
    return NULL;
}

static PyObject *bus_len(Bus *b, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromSsize_t(b->n);
}

static PyMethodDef bus_methods[] = {
    {"set", (PyCFunction)bus_set, METH_O, "Replace the ranges: [(start, size, read, write)] sorted."},
    {"count", (PyCFunction)bus_len, METH_NOARGS, "Number of ranges."},
    {NULL},
};

static PyTypeObject BusType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "dmarw._vmm.Bus",
    .tp_basicsize = sizeof(Bus),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)bus_dealloc,
    .tp_methods = bus_methods,
    .tp_doc = "Device ranges of one address space (MMIO or ports), looked up at each exit.",
};

/* Call read(offset, size) -> int; store the little-endian low `size` bytes at dst. */
static int serve_read(Range *r, uint64_t addr, unsigned size, uint8_t *dst)
{
    PyObject *args[2];
    args[0] = PyLong_FromUnsignedLongLong(addr - r->start);
    args[1] = PyLong_FromUnsignedLong(size);
    PyObject *res = NULL;
    if (args[0] && args[1])
        res = PyObject_Vectorcall(r->read, args, 2, NULL);
    Py_XDECREF(args[0]);
    Py_XDECREF(args[1]);
    if (!res)
        return -1;
    unsigned long long v = PyLong_AsUnsignedLongLongMask(res);
    Py_DECREF(res);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    memcpy(dst, &v, size); /* x86: little-endian */
    return 0;
}

static int serve_write(Range *r, uint64_t addr, unsigned size, const uint8_t *src)
{
    unsigned long long v = 0;
    memcpy(&v, src, size);
    PyObject *args[3];
    args[0] = PyLong_FromUnsignedLongLong(addr - r->start);
    args[1] = PyLong_FromUnsignedLong(size);
    args[2] = PyLong_FromUnsignedLongLong(v);
    PyObject *res = NULL;
    if (args[0] && args[1] && args[2])
        res = PyObject_Vectorcall(r->write, args, 3, NULL);
    for (int i = 0; i < 3; i++)
        Py_XDECREF(args[i]);
    if (!res)
        return -1;
    Py_DECREF(res);
    return 0;
}

/* ---------------------------------------------------------------- vCPU loop ----- */

typedef struct {
    PyObject_HEAD
    int fd;
    struct kvm_run *run;
    size_t run_size;
    Bus *mmio, *pio;
    PyObject *ring_full; /* callable run on KVM_EXIT_DIRTY_RING_FULL, or None */
    pthread_mutex_t lock;
    pthread_t thread;
    int in_loop;
    int busy; /* a thread is inside run()/run_bare() (read and written with the GIL) */
    /* counters of exits served inside the loop */
    unsigned long long n_mmio, n_pio, n_ring_full, n_entries;
} VcpuLoop;

static void kick_handler(int sig) { (void)sig; }

static int install_kick_handler(void)
{
    static int done;
    if (done)
        return 0;
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = kick_handler; /* no SA_RESTART: KVM_RUN returns EINTR */
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGNAL_KICK, &sa, NULL) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    done = 1;
    return 0;
}

static int loop_init(VcpuLoop *self, PyObject *args, PyObject *kw)
{
    static char *names[] = {"fd", "run_size", "mmio", "pio", "ring_full", NULL};
    int fd;
    Py_ssize_t run_size;
    PyObject *mmio, *pio, *ring_full;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "inO!O!O", names, &fd, &run_size, &BusType, &mmio,
                                     &BusType, &pio, &ring_full))
        return -1;
    if (self->run) {
        PyErr_SetString(PyExc_RuntimeError, "VcpuLoop already initialised");
        return -1;
    }
    if (run_size < (Py_ssize_t)sizeof(struct kvm_run)) {
        PyErr_Format(PyExc_ValueError, "run_size %zd is smaller than struct kvm_run", run_size);
        return -1;
    }
    if (install_kick_handler() < 0)
        return -1;
    void *p = mmap(NULL, (size_t)run_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    self->fd = fd;
    self->run = p;
    self->run_size = (size_t)run_size;
    Py_INCREF(mmio);
    Py_INCREF(pio);
    Py_INCREF(ring_full);
    self->mmio = (Bus *)mmio;
    self->pio = (Bus *)pio;
    self->ring_full = ring_full;
    pthread_mutex_init(&self->lock, NULL);
    return 0;
}

static void loop_dealloc(VcpuLoop *self)
{
    if (self->run) {
        munmap(self->run, self->run_size);
        pthread_mutex_destroy(&self->lock);
    }
    Py_XDECREF(self->mmio);
    Py_XDECREF(self->pio);
    Py_XDECREF(self->ring_full);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int check_ready(VcpuLoop *self)
{
    if (!self->run) {
        PyErr_SetString(PyExc_ValueError, "the vCPU is closed");
        return -1;
    }
    return 0;
}

/* One KVM_RUN with the GIL released; returns 0, or -1 with errno (EINTR: kicked). */
static int enter(VcpuLoop *self)
{
    int r, err;
    pthread_mutex_lock(&self->lock);
    self->thread = pthread_self();
    self->in_loop = 1;
    pthread_mutex_unlock(&self->lock);
    Py_BEGIN_ALLOW_THREADS
    r = ioctl(self->fd, KVM_RUN, 0);
    err = errno;
    Py_END_ALLOW_THREADS
    pthread_mutex_lock(&self->lock);
    self->in_loop = 0;
    pthread_mutex_unlock(&self->lock);
    self->n_entries++;
    errno = err;
    return r < 0 ? -1 : 0;
}

static PyObject *intr_exit(VcpuLoop *self)
{
    __atomic_store_n(&self->run->immediate_exit, 0, __ATOMIC_SEQ_CST);
    return Py_BuildValue("(i)", KVM_EXIT_INTR);
}

/* A copy of a bus range holding its own references: a callback may replace the bus (and
 * free the array the range came from) while the loop still needs the range. */
static Range hold(const Range *r)
{
    Range c = *r;
    Py_INCREF(c.read);
    Py_INCREF(c.write);
    return c;
}

static void unhold(Range *c)
{
    Py_DECREF(c->read);
    Py_DECREF(c->write);
}

/* Serve an in-range port access; 1 served, 0 not ours, -1 error (exception set). */
static int serve_io(VcpuLoop *self, int bare)
{
    struct kvm_run *run = self->run;
    unsigned size = run->io.size;
    uint8_t *data = (uint8_t *)run + run->io.data_offset;
    if (bare) {
        if (run->io.direction == KVM_EXIT_IO_IN)
            memset(data, 0, (size_t)size * run->io.count);
        self->n_pio++;
        return 1;
    }
    Range *found = bus_find(self->pio, run->io.port, size);
    if (!found)
        return 0;
    Range r = hold(found);
    int rc = 0;
    for (uint32_t i = 0; i < run->io.count && rc == 0; i++, data += size)
        rc = run->io.direction == KVM_EXIT_IO_OUT ? serve_write(&r, run->io.port, size, data)
                                                  : serve_read(&r, run->io.port, size, data);
    unhold(&r);
    if (rc < 0)
        return -1;
    self->n_pio++;
    return 1;
}

static int serve_mmio(VcpuLoop *self, int bare)
{
    struct kvm_run *run = self->run;
    unsigned len = run->mmio.len;
    if (len == 0 || len > 8)
        return 0;
    if (bare) {
        if (!run->mmio.is_write)
            memset(run->mmio.data, 0, len);
    } else {
        Range *found = bus_find(self->mmio, run->mmio.phys_addr, len);
        if (!found)
            return 0;
        Range r = hold(found);
        int rc = run->mmio.is_write ? serve_write(&r, run->mmio.phys_addr, len, run->mmio.data)
                                    : serve_read(&r, run->mmio.phys_addr, len, run->mmio.data);
        unhold(&r);
        if (rc < 0)
            return -1;
    }
    self->n_mmio++;
    return 1;
}

static PyObject *decode(VcpuLoop *self)
{
    struct kvm_run *run = self->run;
    switch (run->exit_reason) {
    case KVM_EXIT_IO: {
        PyObject *data;
        if (run->io.direction == KVM_EXIT_IO_OUT)
            data = PyBytes_FromStringAndSize((char *)run + run->io.data_offset,
                                             (Py_ssize_t)run->io.size * run->io.count);
        else {
            data = Py_None;
            Py_INCREF(data);
        }
        if (!data)
            return NULL;
        return Py_BuildValue("(iIIiIN)", KVM_EXIT_IO, (unsigned)run->io.port, (unsigned)run->io.size,
                             run->io.direction == KVM_EXIT_IO_OUT, (unsigned)run->io.count, data);
    }
    case KVM_EXIT_MMIO: {
        PyObject *data;
        if (run->mmio.is_write)
            data = PyBytes_FromStringAndSize((char *)run->mmio.data, run->mmio.len <= 8 ? run->mmio.len : 8);
        else {
            data = Py_None;
            Py_INCREF(data);
        }
        if (!data)
            return NULL;
        return Py_BuildValue("(iKIiN)", KVM_EXIT_MMIO, (unsigned long long)run->mmio.phys_addr,
                             (unsigned)run->mmio.len, (int)run->mmio.is_write, data);
    }
    case KVM_EXIT_FAIL_ENTRY:
        return Py_BuildValue("(iKI)", KVM_EXIT_FAIL_ENTRY,
                             (unsigned long long)run->fail_entry.hardware_entry_failure_reason,
                             (unsigned)run->fail_entry.cpu);
    case KVM_EXIT_INTERNAL_ERROR: {
        unsigned nd = run->internal.ndata > 16 ? 16 : run->internal.ndata;
        PyObject *t = PyTuple_New(nd);
        if (!t)
            return NULL;
        for (unsigned i = 0; i < nd; i++)
            PyTuple_SET_ITEM(t, i, PyLong_FromUnsignedLongLong(run->internal.data[i]));
        return Py_BuildValue("(iIN)", KVM_EXIT_INTERNAL_ERROR, (unsigned)run->internal.suberror, t);
    }
    default:
        return Py_BuildValue("(i)", (int)run->exit_reason);
    }
}

/* The loop: bare=1 serves every MMIO/port exit in C with no callback (reads return 0). */
static PyObject *loop_common(VcpuLoop *self, int bare)
{
    if (check_ready(self) < 0)
        return NULL;
    for (;;) {
        if (enter(self) < 0) {
            if (errno == EINTR || errno == EAGAIN)
                return intr_exit(self);
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        int rc = 0;
        switch (self->run->exit_reason) {
        case KVM_EXIT_MMIO:
            rc = serve_mmio(self, bare);
            break;
        case KVM_EXIT_IO:
            rc = serve_io(self, bare);
            break;
        case KVM_EXIT_DIRTY_RING_FULL:
            if (self->ring_full == Py_None)
                break;
            {
                PyObject *res = PyObject_CallNoArgs(self->ring_full);
                if (!res)
                    return NULL;
                Py_DECREF(res);
            }
            self->n_ring_full++;
            rc = 1;
            break;
        case KVM_EXIT_INTR:
            return intr_exit(self);
        default:
            break;
        }
        if (rc < 0)
            return NULL;
        if (rc == 0)
            return decode(self);
        if (!bare && PyErr_CheckSignals() < 0) /* Ctrl-C in a device-bound loop */
            return NULL;
    }
}

static PyObject *loop_enter(VcpuLoop *self, int bare)
{
    if (check_ready(self) < 0)
        return NULL;
    if (self->busy) {
        errno = EBUSY;
        return PyErr_SetFromErrno(PyExc_OSError); /* one thread runs a vCPU at a time */
    }
    self->busy = 1;
    Py_INCREF(self);
    PyObject *r = loop_common(self, bare);
    self->busy = 0;
    Py_DECREF(self);
    return r;
}

static PyObject *loop_run(VcpuLoop *self, PyObject *Py_UNUSED(ignored)) { return loop_enter(self, 0); }

static PyObject *loop_run_bare(VcpuLoop *self, PyObject *Py_UNUSED(ignored)) { return loop_enter(self, 1); }

static PyObject *loop_kick(VcpuLoop *self, PyObject *Py_UNUSED(ignored))
{
    if (check_ready(self) < 0)
        return NULL;
    __atomic_store_n(&self->run->immediate_exit, 1, __ATOMIC_SEQ_CST);
    pthread_mutex_lock(&self->lock);
    if (self->in_loop)
        pthread_kill(self->thread, SIGNAL_KICK);
    pthread_mutex_unlock(&self->lock);
    Py_RETURN_NONE;
}

/* complete(data): fill the data of the pending read exit (MMIO or port in) before the
 * next run; data is the little-endian bytes the guest loads. */
static PyObject *loop_complete(VcpuLoop *self, PyObject *arg)
{
    if (check_ready(self) < 0)
        return NULL;
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0)
        return NULL;
    struct kvm_run *run = self->run;
    int ok = 0;
    if (run->exit_reason == KVM_EXIT_MMIO && !run->mmio.is_write && (size_t)b.len == run->mmio.len) {
        memcpy(run->mmio.data, b.buf, b.len);
        ok = 1;
    } else if (run->exit_reason == KVM_EXIT_IO && run->io.direction == KVM_EXIT_IO_IN &&
               (size_t)b.len == (size_t)run->io.size * run->io.count &&
               run->io.data_offset + (size_t)b.len <= self->run_size) {
        memcpy((uint8_t *)run + run->io.data_offset, b.buf, b.len);
        ok = 1;
    }
    Py_ssize_t n = b.len;
    PyBuffer_Release(&b);
    if (!ok) {
        errno = EINVAL;
        return PyErr_Format(PyExc_ValueError, "complete: %zd bytes do not match a pending read exit", n);
    }
    Py_RETURN_NONE;
}

static PyObject *loop_stats(VcpuLoop *self, PyObject *Py_UNUSED(ignored))
{
    return Py_BuildValue("{sKsKsKsK}", "mmio", self->n_mmio, "pio", self->n_pio, "ring_full",
                         self->n_ring_full, "entries", self->n_entries);
}

static PyObject *loop_close(VcpuLoop *self, PyObject *Py_UNUSED(ignored))
{
    if (self->busy) {
        errno = EBUSY;
        return PyErr_SetFromErrno(PyExc_OSError); /* kick the vCPU and join its thread first */
    }
    if (self->run) {
        munmap(self->run, self->run_size);
        pthread_mutex_destroy(&self->lock);
        self->run = NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *loop_immediate_exit(VcpuLoop *self, void *Py_UNUSED(c))
{
    if (check_ready(self) < 0)
        return NULL;
    return PyLong_FromLong(__atomic_load_n(&self->run->immediate_exit, __ATOMIC_SEQ_CST));
}

static int loop_set_immediate_exit(VcpuLoop *self, PyObject *v, void *Py_UNUSED(c))
{
    if (check_ready(self) < 0)
        return -1;
    int t = PyObject_IsTrue(v);
    if (t < 0)
        return -1;
    __atomic_store_n(&self->run->immediate_exit, (uint8_t)t, __ATOMIC_SEQ_CST);
    return 0;
}

static PyObject *loop_exit_reason(VcpuLoop *self, void *Py_UNUSED(c))
{
    if (check_ready(self) < 0)
        return NULL;
    return PyLong_FromUnsignedLong(self->run->exit_reason);
}

/* Bytes the guest waits for after the last exit: an MMIO read's length, or a port in's
 * size x count; 0 when the last exit is no read. */
static PyObject *loop_pending_read(VcpuLoop *self, void *Py_UNUSED(c))
{
    if (check_ready(self) < 0)
        return NULL;
    struct kvm_run *run = self->run;
    size_t n = 0;
    if (run->exit_reason == KVM_EXIT_MMIO && !run->mmio.is_write)
        n = run->mmio.len;
    else if (run->exit_reason == KVM_EXIT_IO && run->io.direction == KVM_EXIT_IO_IN)
        n = (size_t)run->io.size * run->io.count;
    return PyLong_FromSize_t(n);
}

static PyMethodDef loop_methods[] = {
    {"run", (PyCFunction)loop_run, METH_NOARGS, "KVM_RUN until an exit no bus serves; the exit tuple."},
    {"run_bare", (PyCFunction)loop_run_bare, METH_NOARGS,
     "As run, but every MMIO/port exit is served in C with no callback (reads return 0)."},
    {"kick", (PyCFunction)loop_kick, METH_NOARGS, "Make a running (or the next) run() return KVM_EXIT_INTR."},
    {"complete", (PyCFunction)loop_complete, METH_O, "Fill the pending read exit's data."},
    {"stats", (PyCFunction)loop_stats, METH_NOARGS, "Counts of exits served inside the loop."},
    {"close", (PyCFunction)loop_close, METH_NOARGS, "Unmap kvm_run (the fd is the caller's); EBUSY while running."},
    {NULL},
};

static PyObject *loop_running(VcpuLoop *self, void *Py_UNUSED(c)) { return PyBool_FromLong(self->busy); }

static PyGetSetDef loop_getset[] = {
    {"running", (getter)loop_running, NULL, "a thread is inside run()", NULL},
    {"immediate_exit", (getter)loop_immediate_exit, (setter)loop_set_immediate_exit, "kvm_run.immediate_exit", NULL},
    {"exit_reason", (getter)loop_exit_reason, NULL, "kvm_run.exit_reason of the last exit", NULL},
    {"pending_read", (getter)loop_pending_read, NULL, "bytes a pending read exit waits for (0: none)", NULL},
    {NULL},
};

static PyTypeObject VcpuLoopType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "dmarw._vmm.VcpuLoop",
    .tp_basicsize = sizeof(VcpuLoop),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)loop_init,
    .tp_dealloc = (destructor)loop_dealloc,
    .tp_methods = loop_methods,
    .tp_getset = loop_getset,
    .tp_doc = "VcpuLoop(fd, run_size, mmio, pio, ring_full): a vCPU's exit loop over its kvm_run.",
};

/* ---------------------------------------------------------------- dirty ring ---- */

/* ring_harvest(addr, entries, fetch, bitmaps) -> (fetch, harvested)
 * Walk the ring of `entries` struct kvm_dirty_gfn at addr from index `fetch`: each entry
 * whose flags say DIRTY (acquire load) sets bit `offset` of bitmaps[slot] (a writable
 * buffer; entries of slots absent from the dict, or past a buffer's end, are dropped) and
 * is handed back with RESET (release store).  The caller issues KVM_RESET_DIRTY_RINGS. */
static PyObject *ring_harvest(PyObject *Py_UNUSED(m), PyObject *args)
{
    unsigned long long addr, fetch;
    unsigned int entries;
    PyObject *bitmaps;
    if (!PyArg_ParseTuple(args, "KIKO!", &addr, &entries, &fetch, &PyDict_Type, &bitmaps))
        return NULL;
    if (!addr || !entries || (entries & (entries - 1))) {
        PyErr_SetString(PyExc_ValueError, "ring_harvest: bad ring");
        return NULL;
    }
    struct kvm_dirty_gfn *ring = (struct kvm_dirty_gfn *)(uintptr_t)addr;
    unsigned long long n = 0;
    uint32_t last_slot = UINT32_MAX;
    Py_buffer buf = {0};
    int have = 0;
    for (;;) {
        struct kvm_dirty_gfn *e = &ring[fetch & (entries - 1)];
        uint32_t flags = __atomic_load_n(&e->flags, __ATOMIC_ACQUIRE);
        if (!(flags & KVM_DIRTY_GFN_F_DIRTY))
            break;
        uint32_t slot = e->slot;
        uint64_t off = e->offset;
        if (slot != last_slot) {
            if (have)
                PyBuffer_Release(&buf);
            have = 0;
            last_slot = slot;
            PyObject *key = PyLong_FromUnsignedLong(slot);
            if (!key)
                return NULL;
            PyObject *bm = PyDict_GetItemWithError(bitmaps, key);
            Py_DECREF(key);
            if (!bm && PyErr_Occurred())
                return NULL;
            if (bm) {
                if (PyObject_GetBuffer(bm, &buf, PyBUF_WRITABLE) < 0)
                    return NULL;
                have = 1;
            }
        }
        if (have && off < (uint64_t)buf.len * 8)
            ((uint8_t *)buf.buf)[off >> 3] |= (uint8_t)(1u << (off & 7));
        __atomic_store_n(&e->flags, KVM_DIRTY_GFN_F_RESET, __ATOMIC_RELEASE);
        fetch++;
        n++;
    }
    if (have)
        PyBuffer_Release(&buf);
    return Py_BuildValue("(KK)", fetch, n);
}

/* or_into(dst, src): dst |= src over min(len) bytes, 8 at a time; returns dst's set bits. */
static PyObject *or_into(PyObject *Py_UNUSED(m), PyObject *args)
{
    Py_buffer d, s;
    if (!PyArg_ParseTuple(args, "w*y*", &d, &s))
        return NULL;
    Py_ssize_t n = d.len < s.len ? d.len : s.len;
    uint8_t *dp = d.buf;
    const uint8_t *sp = s.buf;
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t a, b;
        memcpy(&a, dp + i, 8);
        memcpy(&b, sp + i, 8);
        a |= b;
        memcpy(dp + i, &a, 8);
    }
    for (; i < n; i++)
        dp[i] |= sp[i];
    PyBuffer_Release(&d);
    PyBuffer_Release(&s);
    Py_RETURN_NONE;
}

/* any_set(buf): True when any bit is set (stops at the first non-zero word). */
static PyObject *any_set(PyObject *Py_UNUSED(m), PyObject *arg)
{
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0)
        return NULL;
    const uint8_t *p = b.buf;
    int found = 0;
    Py_ssize_t i = 0;
    for (; !found && i + 64 <= b.len; i += 64) { /* 8 words per step: the compiler vectorises */
        uint64_t w[8], acc = 0;
        memcpy(w, p + i, sizeof(w));
        for (int k = 0; k < 8; k++)
            acc |= w[k];
        found = acc != 0;
    }
    for (; !found && i < b.len; i++)
        found = p[i] != 0;
    PyBuffer_Release(&b);
    return PyBool_FromLong(found);
}

static PyObject *constants(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(ignored))
{
    return Py_BuildValue(
        "{sksksksksksksksksksksksksksksksksksksksksksksksksksksn}",
        "KVM_GET_API_VERSION", (unsigned long)KVM_GET_API_VERSION,
        "KVM_CREATE_VM", (unsigned long)KVM_CREATE_VM,
        "KVM_CHECK_EXTENSION", (unsigned long)KVM_CHECK_EXTENSION,
        "KVM_GET_VCPU_MMAP_SIZE", (unsigned long)KVM_GET_VCPU_MMAP_SIZE,
        "KVM_CREATE_VCPU", (unsigned long)KVM_CREATE_VCPU,
        "KVM_SET_USER_MEMORY_REGION", (unsigned long)KVM_SET_USER_MEMORY_REGION,
        "KVM_GET_DIRTY_LOG", (unsigned long)KVM_GET_DIRTY_LOG,
        "KVM_CLEAR_DIRTY_LOG", (unsigned long)KVM_CLEAR_DIRTY_LOG,
        "KVM_RESET_DIRTY_RINGS", (unsigned long)KVM_RESET_DIRTY_RINGS,
        "KVM_ENABLE_CAP", (unsigned long)KVM_ENABLE_CAP,
        "KVM_RUN", (unsigned long)KVM_RUN,
        "KVM_GET_REGS", (unsigned long)KVM_GET_REGS,
        "KVM_SET_REGS", (unsigned long)KVM_SET_REGS,
        "KVM_GET_SREGS", (unsigned long)KVM_GET_SREGS,
        "KVM_SET_SREGS", (unsigned long)KVM_SET_SREGS,
        "KVM_GET_MSRS", (unsigned long)KVM_GET_MSRS,
        "KVM_SET_MSRS", (unsigned long)KVM_SET_MSRS,
        "KVM_GET_FPU", (unsigned long)KVM_GET_FPU,
        "KVM_GET_XSAVE", (unsigned long)KVM_GET_XSAVE,
        "KVM_GET_XSAVE2", (unsigned long)KVM_GET_XSAVE2,
        "KVM_GET_XCRS", (unsigned long)KVM_GET_XCRS,
        "KVM_GET_VCPU_EVENTS", (unsigned long)KVM_GET_VCPU_EVENTS,
        "KVM_GET_DEBUGREGS", (unsigned long)KVM_GET_DEBUGREGS,
        "KVM_GET_MSR_INDEX_LIST", (unsigned long)KVM_GET_MSR_INDEX_LIST,
        "KVM_SET_CPUID2", (unsigned long)KVM_SET_CPUID2,
        "KVM_GET_SUPPORTED_CPUID", (unsigned long)KVM_GET_SUPPORTED_CPUID,
        "sizeof_kvm_run", (Py_ssize_t)sizeof(struct kvm_run));
}

static PyMethodDef module_methods[] = {
    {"ring_harvest", ring_harvest, METH_VARARGS, "Harvest a dirty ring into per-slot bitmaps."},
    {"or_into", or_into, METH_VARARGS, "dst |= src (bytes)."},
    {"any_set", any_set, METH_O, "True when any bit of the buffer is set."},
    {"constants", constants, METH_NOARGS, "The uapi numbers as <linux/kvm.h> defines them."},
    {NULL},
};

static struct PyModuleDef vmm_module = {
    PyModuleDef_HEAD_INIT, "dmarw._vmm", "The native vCPU exit loop and dirty-ring harvest of dmarw.vmm.", -1,
    module_methods,
};

PyMODINIT_FUNC PyInit__vmm(void)
{
    if (PyType_Ready(&BusType) < 0 || PyType_Ready(&VcpuLoopType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&vmm_module);
    if (!m)
        return NULL;
    Py_INCREF(&BusType);
    Py_INCREF(&VcpuLoopType);
    if (PyModule_AddObject(m, "Bus", (PyObject *)&BusType) < 0 ||
        PyModule_AddObject(m, "VcpuLoop", (PyObject *)&VcpuLoopType) < 0 ||
        PyModule_AddIntConstant(m, "SIGNAL_KICK", SIGNAL_KICK) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
