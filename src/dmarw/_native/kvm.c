/* kvm.c: the KVM guest-access path, read_guest / read_guest_into / write_guest.
 *
 * Rule (kvm_read_guest / kvm_write_guest): the range is walked one guest page at a time;
 * a page with no memslot, a write to a read-only slot, or a slot whose host memory is gone
 * is EFAULT — and, unlike the kernel, every page is checked before any byte moves, so a
 * failing call copies nothing.  A write marks each page it touched in its slot's dirty
 * log.  Argument rules (an int gpa, a non-negative length, not past 2**64, a contiguous
 * buffer, a writable one to fill) are checked inline for the valid case and handed to
 * dmarw.errors for every invalid one.
 *
 * Lock: kvm.srcu, read side (locks.c), across the walk and the copy; the GIL is dropped
 * for copies of at least gil_threshold bytes.
 */
#include "dmarw.h"

#define G_FIELDS(op) "sKKK", op, (unsigned long long)gpa, (unsigned long long)n, (unsigned long long)g

static PyObject *
kvm_walk(TableObject *t, const char *op, uint64_t gpa, char *buf, uint64_t n, int write)
{
    uint64_t pos = 0;
    Entry *last = NULL;
    while (pos < n) {
        uint64_t g = gpa + pos;
        uint64_t seg = KVM_PAGE - (g & (KVM_PAGE - 1));
        if (seg > n - pos)
            seg = n - pos;
        Entry *e = (last != NULL && g - last->start < last->size) ? last : table_find(t, g);
        if (e != NULL && e != last && buf == NULL) { /* check only: a slot at a time */
            if (entry_gone(e))
                return dma_error("slot_gone", "sKKKl", op, (unsigned long long)gpa, (unsigned long long)n,
                                 (unsigned long long)g, e->ident);
            uint64_t slot_left = e->size - (g - e->start);
            last = e;
            pos += slot_left < n - pos ? slot_left : n - pos;
            continue;
        }
        if (e == NULL)
            return dma_error("no_memslot", G_FIELDS(op));
        if (e != last) { /* once per slot */
            if (write && !(e->prot & PROT_W))
                return dma_error("slot_read_only", "sKKKl", op, (unsigned long long)gpa, (unsigned long long)n,
                                 (unsigned long long)g, e->ident);
            if (entry_gone(e))
                return dma_error("slot_gone", "sKKKl", op, (unsigned long long)gpa, (unsigned long long)n,
                                 (unsigned long long)g, e->ident);
        }
        last = e;
        pos += seg;
    }
    if (buf == NULL) /* check only (read_guest of a large size, before its buffer is made) */
        Py_RETURN_NONE;
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

/* A valid access (gpa parsed, not past the end): the read side, the walk. */
static PyObject *
kvm_run(KvmObject *self, const char *op, uint64_t gpa, char *buf, uint64_t n, int write)
{
    int token = core_read_lock(&self->base);
    TableObject *t = __atomic_load_n(&self->base.table, __ATOMIC_SEQ_CST);
    Py_INCREF(t);
    PyObject *ret = kvm_walk(t, op, gpa, buf, n, write);
    Py_DECREF(t);
    core_read_unlock(&self->base, token);
    return ret;
}

/* read_guest_into / write_guest: the buffer and address rules, then the access. */
static PyObject *
kvm_buffer_access(KvmObject *self, const char *op, PyObject *gpa_obj, PyObject *buf_obj, int write)
{
    if (!self->base.ready)
        return core_not_ready();
    Py_buffer v;
    if (PyObject_GetBuffer(buf_obj, &v, write ? PyBUF_SIMPLE : PyBUF_WRITABLE) < 0) {
        PyErr_Clear();
        return rules_error("check_rw", "sOOisii", op, gpa_obj, buf_obj, !write, "gpa", 1, 1);
    }
    uint64_t gpa;
    PyObject *ret;
    if (parse_addr(gpa_obj, &gpa) < 0 || past_end(gpa, (uint64_t)v.len))
        ret = rules_error("check_rw", "sOOisii", op, gpa_obj, buf_obj, !write, "gpa", 1, 1);
    else
        ret = kvm_run(self, op, gpa, (char *)v.buf, (uint64_t)v.len, write);
    PyBuffer_Release(&v);
    return ret;
}

/* Kvm.read_guest(gpa, n) -> bytes */
static PyObject *
Kvm_read_guest(KvmObject *self, PyObject *const *args_in, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"gpa", "n"};
    PyObject *args[2];
    if (bind_args(args_in, nargs, kwnames, names, 2, args, "read_guest") < 0)
        return NULL;
    if (!self->base.ready)
        return core_not_ready();
    uint64_t gpa;
    Py_ssize_t n = PyLong_CheckExact(args[1]) ? PyLong_AsSsize_t(args[1]) : -1;
    if (n == -1 && PyErr_Occurred())
        PyErr_Clear();
    if (n < 0 || parse_addr(args[0], &gpa) < 0 || past_end(gpa, (uint64_t)n))
        return rules_error("check_access", "sOOsii", "read_guest", args[0], args[1], "gpa", 1, 1);
    if (n >= (1 << 20)) { /* check the slots first: a size no slot covers allocates nothing */
        PyObject *ok = kvm_run(self, "read_guest", gpa, NULL, (uint64_t)n, 0);
        if (ok == NULL)
            return NULL;
        Py_DECREF(ok);
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, n);
    if (out == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_MemoryError))
            return NULL;
        PyErr_Clear();
        return dma_error("no_memory", "sKn", "read_guest", (unsigned long long)gpa, n);
    }
    PyObject *r = kvm_run(self, "read_guest", gpa, PyBytes_AS_STRING(out), (uint64_t)n, 0);
    if (r == NULL) {
        Py_DECREF(out);
        return NULL;
    }
    Py_DECREF(r);
    return out;
}

/* Kvm.read_guest_into(gpa, buf) */
static PyObject *
Kvm_read_guest_into(KvmObject *self, PyObject *const *args_in, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"gpa", "buf"};
    PyObject *args[2];
    if (bind_args(args_in, nargs, kwnames, names, 2, args, "read_guest_into") < 0)
        return NULL;
    return kvm_buffer_access(self, "read_guest_into", args[0], args[1], 0);
}

/* Kvm.write_guest(gpa, data) */
static PyObject *
Kvm_write_guest(KvmObject *self, PyObject *const *args_in, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"gpa", "data"};
    PyObject *args[2];
    if (bind_args(args_in, nargs, kwnames, names, 2, args, "write_guest") < 0)
        return NULL;
    return kvm_buffer_access(self, "write_guest", args[0], args[1], 1);
}

static PyObject *
kvm_replay_one(PyObject *target, uint64_t addr, Py_buffer *v, int write)
{
    KvmObject *c = (KvmObject *)target;
    const char *op = write ? "write_guest" : "read_guest_into";
    if (past_end(addr, (uint64_t)v->len)) {
        PyObject *a = PyLong_FromUnsignedLongLong(addr);
        PyObject *r = a ? rules_error("check_access", "sOnsii", op, a, v->len, "gpa", 1, 1) : NULL;
        Py_XDECREF(a);
        return r;
    }
    return kvm_run(c, op, addr, (char *)v->buf, (uint64_t)v->len, write);
}

/* Kvm.replay(writes, addrs, sizes, buf, deltas=None): a recorded workload through
 * read_guest_into / write_guest, each call timed. */
static PyObject *
Kvm_replay(KvmObject *self, PyObject *args)
{
    return replay_method((PyObject *)self, self->base.ready, args, kvm_replay_one);
}

static PyMethodDef Kvm_methods[] = {
    {"read_guest", (PyCFunction)(void (*)(void))Kvm_read_guest, METH_FASTCALL | METH_KEYWORDS,
     "read_guest(gpa, n) -> bytes"},
    {"read_guest_into", (PyCFunction)(void (*)(void))Kvm_read_guest_into, METH_FASTCALL | METH_KEYWORDS,
     "read_guest_into(gpa, buf)"},
    {"write_guest", (PyCFunction)(void (*)(void))Kvm_write_guest, METH_FASTCALL | METH_KEYWORDS,
     "write_guest(gpa, data)"},
    {"replay", (PyCFunction)Kvm_replay, METH_VARARGS,
     "replay(writes, addrs, sizes, buf, deltas=None) -> (read_cycles, reads, write_cycles, writes)"},
    {NULL, NULL, 0, NULL},
};

PyTypeObject KvmType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "dmarw._native.Kvm",
    .tp_basicsize = sizeof(KvmObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "The KVM guest-access path (the base of dmarw.native.NativeVm).",
    .tp_base = &CoreBaseType,
    .tp_methods = Kvm_methods,
};
