/* module.c: dmarw._native's set-up, its function table, and how C raises an error.
 *
 * Rule: every failure raised from C is made by dmarw.errors, the one place that words
 * messages for both cores: C passes the failure's key and its fields (dma_error) or, for
 * bad arguments, hands the arguments back to the Python rules (rules_error).  The module
 * imports dmarw.errors lazily, on the first failure.  No lock: GIL held throughout.
 */
#include "dmarw.h"

#include <stdarg.h>

Py_ssize_t gil_threshold = 65536;
static PyObject *errors_module; /* dmarw.errors, imported on the first failure */

static PyObject *
errors_attr(const char *name)
{
    if (errors_module == NULL) {
        errors_module = PyImport_ImportModule("dmarw.errors");
        if (errors_module == NULL)
            return NULL;
    }
    return PyObject_GetAttrString(errors_module, name);
}

/* Call dmarw.errors.<fn>(*fields); if the result is an exception instance, raise it. */
static PyObject *
call_errors(const char *fn, const char *fmt, va_list ap, int raise_result)
{
    PyObject *f = errors_attr(fn);
    if (f == NULL)
        return NULL;
    PyObject *args = Py_VaBuildValue(fmt, ap);
    if (args == NULL) {
        Py_DECREF(f);
        return NULL;
    }
    if (!PyTuple_Check(args)) {
        PyObject *t = PyTuple_Pack(1, args);
        Py_DECREF(args);
        args = t;
        if (args == NULL) {
            Py_DECREF(f);
            return NULL;
        }
    }
    PyObject *r = PyObject_Call(f, args, NULL);
    Py_DECREF(f);
    Py_DECREF(args);
    if (r == NULL)
        return NULL;
    if (raise_result) {
        PyErr_SetObject((PyObject *)Py_TYPE(r), r);
        Py_DECREF(r);
        return NULL;
    }
    return r;
}

PyObject *
dma_error(const char *key, const char *fmt, ...)
{
    PyObject *k = PyUnicode_FromString(key);
    if (k == NULL)
        return NULL;
    /* error(key, *fields): prepend the key to the fields */
    va_list ap;
    va_start(ap, fmt);
    PyObject *fields = Py_VaBuildValue(fmt, ap);
    va_end(ap);
    if (fields == NULL) {
        Py_DECREF(k);
        return NULL;
    }
    PyObject *f = errors_attr("error");
    if (f == NULL) {
        Py_DECREF(k);
        Py_DECREF(fields);
        return NULL;
    }
    Py_ssize_t n = PyTuple_Check(fields) ? PyTuple_GET_SIZE(fields) : 1;
    PyObject *args = PyTuple_New(n + 1);
    if (args != NULL) {
        PyTuple_SET_ITEM(args, 0, k);
        k = NULL;
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *it = PyTuple_Check(fields) ? PyTuple_GET_ITEM(fields, i) : fields;
            Py_INCREF(it);
            PyTuple_SET_ITEM(args, i + 1, it);
        }
    }
    Py_XDECREF(k);
    Py_DECREF(fields);
    PyObject *exc = args ? PyObject_Call(f, args, NULL) : NULL;
    Py_DECREF(f);
    Py_XDECREF(args);
    if (exc != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
    return NULL;
}

PyObject *
rules_error(const char *fn, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    PyObject *r = call_errors(fn, fmt, ap, 0);
    va_end(ap);
    if (r == NULL)
        return NULL; /* the rules raised: the usual case */
    Py_DECREF(r);
    PyErr_Format(PyExc_SystemError, "dmarw._native: dmarw.errors.%s accepted arguments the native core refused",
                 fn);
    return NULL;
}

PyObject *
errors_raise(const char *fn, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    PyObject *r = call_errors(fn, fmt, ap, 1);
    va_end(ap);
    return r;
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

static PyMethodDef module_methods[] = {
    {"cycles", py_cycles, METH_NOARGS, "the cycle counter (rdtsc, or CLOCK_MONOTONIC ns)"},
    {"tsc_hz", py_tsc_hz, METH_NOARGS, "counter ticks per second (calibrated once)"},
    {"counter_kind", py_counter_kind, METH_NOARGS, "'rdtsc' or 'clock_monotonic'"},
    {"timer_overhead", py_timer_overhead, METH_O, "median cycles of a back-to-back counter pair"},
    {"bitmap_mark", (PyCFunction)(void (*)(void))py_bitmap_mark, METH_FASTCALL,
     "bitmap_mark(buf, first, last): atomically set bits first..last"},
    {"bitmap_take", (PyCFunction)(void (*)(void))py_bitmap_take, METH_VARARGS | METH_KEYWORDS,
     "bitmap_take(buf, keep=None) -> bytes: get and clear, re-setting keep"},
    {"bitmap_peek", py_bitmap_peek, METH_O, "bitmap_peek(buf) -> bytes"},
    {"hva_read", (PyCFunction)(void (*)(void))py_hva_read, METH_FASTCALL,
     "hva_read(hva, buf): fill buf from a host address (unchecked)"},
    {"hva_write", (PyCFunction)(void (*)(void))py_hva_write, METH_FASTCALL,
     "hva_write(hva, data): copy data to a host address (unchecked)"},
    {"set_timing", py_set_timing, METH_O,
     "set_timing(on): time acquisitions (a lockstat.collect() block is open) or only count them"},
    {"vfio_setup", vfio_setup, METH_VARARGS, "vfio_setup(groups, fallback): the registry and the Python path"},
    {"vfio_set_group_lock", vfio_set_group_lock, METH_O,
     "the registry lock the native per-call path takes (a Lock), or None"},
    {"vfio_dma_rw", (PyCFunction)(void (*)(void))vfio_dma_rw, METH_FASTCALL | METH_KEYWORDS,
     "vfio_dma_rw(device, iova, buf, write): the per-call path (registry lookup under "
     "vfio.group_lock, viability under group.unbound_lock and group.device_lock, a container "
     "user under group.mutex, the container's dma_rw, references dropped) in one call"},
    {"vfio_replay", vfio_replay, METH_VARARGS,
     "vfio_replay(device, writes, addrs, sizes, buf, deltas=None) -> (read_cycles, reads, "
     "write_cycles, writes): Type1.replay through the per-call path"},
    {"crc32c", (PyCFunction)(void (*)(void))py_crc32c, METH_FASTCALL,
     "crc32c(data, value=0) -> int: CRC32C of a contiguous buffer, chained from value"},
    {"crc32c_portable", (PyCFunction)(void (*)(void))py_crc32c_portable, METH_FASTCALL,
     "crc32c_portable(data, value=0) -> int: the same by the table-driven loop"},
    {"crc32c_pages", (PyCFunction)(void (*)(void))py_crc32c_pages, METH_FASTCALL,
     "crc32c_pages(data, page_size) -> bytes: the CRC32C of each page, little-endian u32s"},
    {"crc32c_impl", py_crc32c_impl, METH_NOARGS, "'vpclmulqdq', 'sse4.2' or 'table': how crc32c runs here"},
    {"crc32c_select", py_crc32c_select, METH_O,
     "crc32c_select(name) -> str: run crc32c and crc32c_pages the named way (one this CPU has); returns the previous"},
    {"send_pages", (PyCFunction)(void (*)(void))py_send_pages, METH_FASTCALL,
     "send_pages(fd, buf, timeout, head=None, pipe=None) -> int: write head (copied) and buf (by vmsplice and splice, no copy) to the socket"},
    {"set_gil_threshold", set_gil_threshold, METH_O,
     "copies of at least this many bytes release the GIL; returns the old value"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT, "dmarw._native", "dmarw's native core", -1, module_methods,
    NULL, NULL, NULL, NULL,
};

static int
add_type(PyObject *m, const char *name, PyTypeObject *t)
{
    if (PyType_Ready(t) < 0)
        return -1;
    Py_INCREF(t);
    if (PyModule_AddObject(m, name, (PyObject *)t) < 0) {
        Py_DECREF(t);
        return -1;
    }
    return 0;
}

PyMODINIT_FUNC
PyInit__native(void)
{
    use_tsc = cpu_has_invariant_tsc();
    checksum_init();
    if (rcu_init() < 0) {
        PyErr_SetString(PyExc_OSError, "dmarw._native: pthread_key_create failed");
        return NULL;
    }
    if (vfio_init() < 0)
        return NULL;
    PyObject *m = PyModule_Create(&native_module);
    if (m == NULL)
        return NULL;
    if (add_type(m, "Atomic", &AtomicType) < 0 || add_type(m, "MmRef", &MmRefType) < 0 ||
        add_type(m, "Table", &TableType) < 0 || add_type(m, "CoreBase", &CoreBaseType) < 0 || add_type(m, "Type1", &Type1Type) < 0 ||
        add_type(m, "Kvm", &KvmType) < 0 || add_type(m, "Handle", &HandleType) < 0 ||
        add_type(m, "Lock", &LockType) < 0 || add_type(m, "GroupState", &GroupStateType) < 0 ||
        PyModule_AddIntConstant(m, "HAVE_RDTSC", HAVE_RDTSC) < 0 ||
        PyModule_AddIntConstant(m, "HAVE_MEMBARRIER", have_membarrier) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
