/* The device buses of dmarw._vmm (see vmm.h). */
#include "vmm.h"

#include <string.h>

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

Range *vmm_bus_find(Bus *b, uint64_t addr, uint64_t len)
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

PyTypeObject vmm_BusType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "dmarw._vmm.Bus",
    .tp_basicsize = sizeof(Bus),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)bus_dealloc,
    .tp_methods = bus_methods,
    .tp_doc = "Device ranges of one address space (MMIO or ports), looked up at each exit.",
};

/* Call read(offset, size) -> int; store the little-endian low `size` bytes at dst. */
int vmm_serve_read(Range *r, uint64_t addr, unsigned size, uint8_t *dst)
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

int vmm_serve_write(Range *r, uint64_t addr, unsigned size, const uint8_t *src)
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

/* A copy of a bus range holding its own references: a callback may replace the bus (and
 * free the array the range came from) while the loop still needs the range. */
Range vmm_bus_hold(const Range *r)
{
    Range c = *r;
    Py_INCREF(c.read);
    Py_INCREF(c.write);
    return c;
}

void vmm_bus_unhold(Range *c)
{
    Py_DECREF(c->read);
    Py_DECREF(c->write);
}
