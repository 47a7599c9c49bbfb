/* The vCPU exit loop of dmarw._vmm.
 *
 * One object per vCPU (VcpuLoop) owns the mapped struct kvm_run and runs KVM_RUN with the
 * GIL released.  Each exit is decoded here; an MMIO or port access that falls in a range of
 * one of the two device buses is served by calling the device with the GIL held, and the
 * vCPU re-enters the guest without returning to Python.  Every other exit returns a tuple
 * that dmarw.vmm.exits turns into an Exit.
 *
 * Kick (any thread): set kvm_run.immediate_exit, then, if the vCPU thread is inside the
 * loop, send it SIGNAL_KICK (a no-op handler without SA_RESTART), so a KVM_RUN in progress
 * returns EINTR and one about to start returns at once.  `lock` guards in_loop/thread so a
 * signal is only ever sent to a thread that is inside run(); `busy` (GIL) lets one thread
 * at a time into run() and keeps close() out while it is there.
 */
#include "vmm.h"

#include <errno.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>

typedef struct {
    PyObject_HEAD
    int fd;
    struct kvm_run *run;
    size_t run_size;
    Bus *mmio, *pio;
    PyObject *ring_full; /* callable run on KVM_EXIT_DIRTY_RING_FULL, or None */
    /* this vCPU's dirty ring, for the half-full probe before each KVM_RUN (NULL: none) */
    struct kvm_dirty_gfn *ring;
    uint64_t ring_mask;
    Py_buffer fetch; /* a u64: the harvest's next index, kept by dmarw.vmm.dirty */
    int have_fetch;
    pthread_mutex_t lock;
    pthread_t thread;
    int in_loop;
    int busy; /* a thread is inside run()/run_bare() (read and written with the GIL) */
    /* counters of exits served inside the loop */
    unsigned long long n_mmio, n_pio, n_ring_full, n_ring_early, n_entries;
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
    static char *names[] = {"fd", "run_size", "mmio", "pio", "ring_full", "ring", NULL};
    int fd;
    Py_ssize_t run_size;
    PyObject *mmio, *pio, *ring_full, *ring = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "inO!O!O|O", names, &fd, &run_size, &vmm_BusType, &mmio,
                                     &vmm_BusType, &pio, &ring_full, &ring))
        return -1;
    unsigned long long ring_addr = 0;
    unsigned int ring_entries = 0;
    PyObject *fetch = NULL;
    if (ring != Py_None) {
        if (!PyArg_ParseTuple(ring, "KIO;ring is (address, entries, fetch buffer)", &ring_addr, &ring_entries, &fetch))
            return -1;
        if (!ring_addr || !ring_entries || (ring_entries & (ring_entries - 1))) {
            PyErr_SetString(PyExc_ValueError, "ring: a mapped ring of a power-of-two entries");
            return -1;
        }
    }
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
    if (fetch) {
        if (PyObject_GetBuffer(fetch, &self->fetch, PyBUF_WRITABLE) < 0)
            return -1;
        if (self->fetch.len != 8) {
            PyBuffer_Release(&self->fetch);
            PyErr_SetString(PyExc_ValueError, "ring: the fetch buffer is one u64");
            return -1;
        }
        self->have_fetch = 1;
        self->ring = (struct kvm_dirty_gfn *)(uintptr_t)ring_addr;
        self->ring_mask = ring_entries - 1;
    }
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
    if (self->have_fetch)
        PyBuffer_Release(&self->fetch);
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
    Range *found = vmm_bus_find(self->pio, run->io.port, size);
    if (!found)
        return 0;
    Range r = vmm_bus_hold(found);
    int rc = 0;
    for (uint32_t i = 0; i < run->io.count && rc == 0; i++, data += size)
        rc = run->io.direction == KVM_EXIT_IO_OUT ? vmm_serve_write(&r, run->io.port, size, data)
                                                  : vmm_serve_read(&r, run->io.port, size, data);
    vmm_bus_unhold(&r);
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
        Range *found = vmm_bus_find(self->mmio, run->mmio.phys_addr, len);
        if (!found)
            return 0;
        Range r = vmm_bus_hold(found);
        int rc = run->mmio.is_write ? vmm_serve_write(&r, run->mmio.phys_addr, len, run->mmio.data)
                                    : vmm_serve_read(&r, run->mmio.phys_addr, len, run->mmio.data);
        vmm_bus_unhold(&r);
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

/* True when the ring is at least half full: the entry half a ring past the harvest's
 * next index is already dirty.  Harvesting then, before KVM_RUN, keeps room for what a
 * hypervisor that emulates instructions in batches pushes past KVM's 64-entry reserve. */
static int ring_half_full(VcpuLoop *self)
{
    if (!self->ring)
        return 0;
    uint64_t fetch;
    memcpy(&fetch, self->fetch.buf, 8);
    struct kvm_dirty_gfn *e = &self->ring[(fetch + (self->ring_mask + 1) / 2) & self->ring_mask];
    return (__atomic_load_n(&e->flags, __ATOMIC_ACQUIRE) & KVM_DIRTY_GFN_F_DIRTY) != 0;
}

/* ring_full(kvm_full): True for KVM's KVM_EXIT_DIRTY_RING_FULL, False for the loop's own
 * half-full harvest. */
static int harvest_ring(VcpuLoop *self, int kvm_full)
{
    PyObject *res = PyObject_CallOneArg(self->ring_full, kvm_full ? Py_True : Py_False);
    if (!res)
        return -1;
    Py_DECREF(res);
    return 0;
}

/* The loop: bare=1 serves every MMIO/port exit in C with no callback (reads return 0). */
static PyObject *loop_common(VcpuLoop *self, int bare)
{
    if (check_ready(self) < 0)
        return NULL;
    for (;;) {
        if (self->ring_full != Py_None && ring_half_full(self)) {
            if (harvest_ring(self, 0) < 0)
                return NULL;
            self->n_ring_early++;
        }
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
            if (harvest_ring(self, 1) < 0)
                return NULL;
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
    return Py_BuildValue("{sKsKsKsKsK}", "mmio", self->n_mmio, "pio", self->n_pio, "ring_full",
                         self->n_ring_full, "ring_half_full", self->n_ring_early, "entries", self->n_entries);
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

PyTypeObject vmm_VcpuLoopType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "dmarw._vmm.VcpuLoop",
    .tp_basicsize = sizeof(VcpuLoop),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)loop_init,
    .tp_dealloc = (destructor)loop_dealloc,
    .tp_methods = loop_methods,
    .tp_getset = loop_getset,
    .tp_doc = "VcpuLoop(fd, run_size, mmio, pio, ring_full, ring=None): a vCPU's exit loop over its kvm_run;\n"
              "ring = (address, entries, fetch) of its dirty ring, harvested before KVM_RUN when half full.",
};
