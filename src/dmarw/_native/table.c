/* table.c: the mapping table, one immutable native snapshot of a container's mappings or
 * a VM's memslots, built by the Python side on every publish.
 *
 * Rule: entries sorted by start, non-empty, disjoint; lookup by binary search
 * (table_find, in dmarw.h).  Memory safety: a Table holds a buffer export on every
 * mapping's mmap, so the memory it points at cannot be unmapped while the Table lives
 * (mmap.close() refuses with BufferError); each entry also holds the region's "gone" flag
 * (set when the region is released, an EFAULT for later accesses).  A reader takes a
 * strong reference to the Table under the GIL before it may drop the GIL for a large copy.
 * Lock: none of its own; published under the core's write side.
 */
#include "dmarw.h"

static void
Table_clear_entries(TableObject *t)
{
    for (Py_ssize_t i = 0; i < t->n; i++) {
        Entry *e = &t->e[i];
        if (e->have_view)
            PyBuffer_Release(&e->view);
        if (e->have_bits)
            PyBuffer_Release(&e->bview);
        Py_XDECREF((PyObject *)e->gone);
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

/* Table(entries): each entry is a tuple
 *   (start, size, map, offset, prot, bitmap_words_or_None, gone, mmref_or_None, ident)
 * with gone an Atomic (non-zero once the region is released) and ident the memslot id.
 * A map that can no longer export its buffer (closed) makes an entry whose accesses fail
 * with EFAULT. */
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
        PyObject *map, *bits, *gone, *mm;
        Py_ssize_t offset;
        int prot;
        long ident;
        if (!PyArg_ParseTuple(item, "KKOniOO!Ol:Table entry", &start, &size, &map, &offset, &prot, &bits,
                              &AtomicType, &gone, &mm, &ident))
            goto fail;
        Entry *e = &t->e[i];
        t->n = i + 1;
        e->start = start;
        e->size = size;
        e->prot = prot;
        e->ident = ident;
        Py_INCREF(gone);
        e->gone = (AtomicObject *)gone;
        if (size == 0 || start + size - 1 < start ||
            (i > 0 && start < t->e[i - 1].start + t->e[i - 1].size)) {
            PyErr_SetString(PyExc_ValueError, "Table: entries must be sorted, non-empty, disjoint");
            goto fail;
        }
        if (mm != Py_None) {
            if (!PyObject_TypeCheck(mm, &MmRefType)) {
                PyErr_SetString(PyExc_TypeError, "Table: mm must be an MmRef or None");
                goto fail;
            }
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

PyTypeObject TableType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "dmarw._native.Table",
    .tp_basicsize = sizeof(TableObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "An immutable native snapshot of mappings (built on every publish).",
    .tp_new = Table_new,
    .tp_dealloc = (destructor)Table_dealloc,
    .tp_getset = Table_getset,
};
