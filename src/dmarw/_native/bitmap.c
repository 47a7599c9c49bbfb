/* bitmap.c: atomic dirty bitmaps over a writable buffer of u64 words, and raw copies.
 *
 * Rule: bit k is page k of the window, little-endian u64 words (the kernel's layout).  A
 * page range is marked with one atomic fetch_or per word; get-and-clear is one exchange
 * per non-zero word, so a bit set by a write that completed is either reported or still
 * set, never lost.  No lock (atomics only).  The raw copies between a host address and a
 * buffer check nothing: the caller owns the address.
 */
#include "dmarw.h"

int
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

PyObject *
py_bitmap_mark(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
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
PyObject *
py_bitmap_take(PyObject *self, PyObject *args, PyObject *kwargs)
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

PyObject *
py_bitmap_peek(PyObject *self, PyObject *arg)
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

/* ---- raw hva copies (the lab's bare-copy baseline) ---------------------------------- */

void
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
PyObject *
py_hva_read(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
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
PyObject *
py_hva_write(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
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

