/* type1.c: the type1 IOMMU container's reader path, dma_rw, and the external-user handle.
 *
 * Rule (vfio_dma_rw over vfio_iommu_type1): under the read side of the container's lock,
 * every chunk of [iova, iova+len) is translated and checked before any byte moves — an
 * uncovered byte is EINVAL, a mapping lacking READ (any access) or WRITE (a write) EPERM;
 * the owner's address space is counted once per distinct space (mmget_not_zero or
 * get_task_mm; refused: EPERM); a released backing is EFAULT; then the copy, and a write
 * marks pages off>>shift .. (off+len-1)>>shift of each mapping it touched.  The argument
 * rules (an int iova, a contiguous buffer, non-empty, not past 2**64, a writable buffer
 * for a read) are checked inline for the valid case; every invalid case is handed to
 * dmarw.errors.check_rw, the rules both cores share, which raises.
 *
 * Lock: the container's core lock (locks.c), read side, held across the walk and the copy;
 * the GIL is dropped for copies of at least gil_threshold bytes (the Table reference and
 * the read side keep the memory mapped).
 */
#include "dmarw.h"

typedef struct {
    Entry *e;
    uint64_t off; /* offset in the mapping */
    uint64_t len;
} Chunk;

static inline void
copy_one(char *m, char *buf, size_t n, int write)
{
    if (write)
        memmove(m, buf, n);
    else
        memmove(buf, m, n);
}

static void
copy_chunks(Chunk *ch, Py_ssize_t nch, char *buf, int write)
{
    uint64_t pos = 0;
    for (Py_ssize_t i = 0; i < nch; i++) {
        copy_one(ch[i].e->mem + ch[i].off, buf + pos, ch[i].len, write);
        pos += ch[i].len;
    }
}

#define RW_FIELDS "sKK", "dma_rw", (unsigned long long)iova, (unsigned long long)n

/* The walk, under the read side.  The one-mapping case (nearly every access) runs the same
 * checks in the same order inline, without the chunk and held-reference bookkeeping; the
 * errors are raised in one place for both. */
static PyObject *
type1_walk(Type1Object *c, TableObject *t, uint64_t iova, Py_buffer *v, int write)
{
    uint64_t n = (uint64_t)v->len;
    int need = write ? (PROT_R | PROT_W) : PROT_R;
    int shift = c->base.shift;
    Entry *e = table_find(t, iova), *bad = NULL;
    uint64_t cur = iova;
    if (e != NULL && !(need & ~e->prot) && n <= e->size - (iova - e->start)) {
        uint64_t off = iova - e->start;
        MmRefObject *mm = e->mm;
        if (mm != NULL && !mm_get(mm, c->base.mm_mode, &c->base.task_stat))
            return dma_error("owner_exited", RW_FIELDS);
        PyObject *ret = NULL;
        if (!entry_gone(e)) {
            char *m = e->mem + off;
            if ((Py_ssize_t)n >= gil_threshold) {
                Py_BEGIN_ALLOW_THREADS
                copy_one(m, (char *)v->buf, (size_t)n, write);
                Py_END_ALLOW_THREADS
            } else {
                copy_one(m, (char *)v->buf, (size_t)n, write);
            }
            if (write && e->have_bits)
                bits_mark((uint64_t *)e->bview.buf, off >> shift, (off + n - 1) >> shift);
            Py_INCREF(Py_None);
            ret = Py_None;
        } else {
            dma_error("host_gone", "sKKKK", "dma_rw", (unsigned long long)iova, (unsigned long long)n,
                      (unsigned long long)e->start, (unsigned long long)e->size);
        }
        if (mm != NULL)
            mm_put(mm);
        return ret;
    }
    /* the general case: one chunk per mapping, every chunk checked before any copy */
    Chunk small[SMALL_CHUNKS];
    Chunk *ch = small;
    Py_ssize_t cap = SMALL_CHUNKS, nch = 0;
    MmRefObject *held[SMALL_CHUNKS];
    Py_ssize_t nheld = 0;
    PyObject *ret = NULL;
    uint64_t pos = 0;
    while (pos < n) {
        cur = iova + pos;
        e = table_find(t, cur);
        if (e == NULL) {
            dma_error("not_mapped", "sKKK", "dma_rw", (unsigned long long)iova, (unsigned long long)n,
                      (unsigned long long)cur);
            goto out;
        }
        if (need & ~e->prot) {
            dma_error("no_perm", "sKKKKi", "dma_rw", (unsigned long long)iova, (unsigned long long)n,
                      (unsigned long long)e->start, (unsigned long long)e->size, e->prot);
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
        if (!mm_get(mm, c->base.mm_mode, &c->base.task_stat)) {
            dma_error("owner_exited", RW_FIELDS);
            goto out;
        }
        held[nheld++] = mm;
    }
    for (Py_ssize_t i = 0; i < nch && bad == NULL; i++)
        if (entry_gone(ch[i].e))
            bad = ch[i].e;
    if (bad != NULL) {
        dma_error("host_gone", "sKKKK", "dma_rw", (unsigned long long)iova, (unsigned long long)n,
                  (unsigned long long)bad->start, (unsigned long long)bad->size);
        goto out;
    }
    if ((Py_ssize_t)n >= gil_threshold) {
        Py_BEGIN_ALLOW_THREADS
        copy_chunks(ch, nch, (char *)v->buf, write);
        Py_END_ALLOW_THREADS
    } else {
        copy_chunks(ch, nch, (char *)v->buf, write);
    }
    if (write) {
        for (Py_ssize_t i = 0; i < nch; i++) {
            Entry *x = ch[i].e;
            if (x->have_bits)
                bits_mark((uint64_t *)x->bview.buf, ch[i].off >> shift, (ch[i].off + ch[i].len - 1) >> shift);
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

PyObject *
type1_dma_rw_run(Type1Object *c, uint64_t iova, Py_buffer *v, int write)
{
    int token = core_read_lock(&c->base);
    TableObject *t = __atomic_load_n(&c->base.table, __ATOMIC_SEQ_CST);
    Py_INCREF(t);
    PyObject *ret = type1_walk(c, t, iova, v, write);
    Py_DECREF(t);
    core_read_unlock(&c->base, token);
    return ret;
}

/* The rules of the arguments, then the call; any invalid argument goes to check_rw. */
PyObject *
type1_dma_rw_obj(Type1Object *c, PyObject *iova_obj, PyObject *buf_obj, int write)
{
    if (!c->base.ready)
        return core_not_ready();
    Py_buffer v;
    if (PyObject_GetBuffer(buf_obj, &v, PyBUF_SIMPLE) < 0) {
        PyErr_Clear();
        return rules_error("check_rw", "sOOi", "dma_rw", iova_obj, buf_obj, !write);
    }
    uint64_t iova;
    PyObject *ret;
    if (parse_addr(iova_obj, &iova) < 0 || v.len == 0 || past_end(iova, (uint64_t)v.len) ||
        (!write && v.readonly))
        ret = rules_error("check_rw", "sOOi", "dma_rw", iova_obj, buf_obj, !write);
    else
        ret = type1_dma_rw_run(c, iova, &v, write);
    PyBuffer_Release(&v);
    return ret;
}

/* Type1.dma_rw(iova, buf, write) */
static PyObject *
Type1_dma_rw(Type1Object *self, PyObject *const *args_in, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"iova", "buf", "write"};
    PyObject *args[3];
    if (bind_args(args_in, nargs, kwnames, names, 3, args, "dma_rw") < 0)
        return NULL;
    int write = parse_flag(args[2]);
    if (write < 0)
        return NULL;
    return type1_dma_rw_obj(self, args[0], args[1], write);
}

/* One replayed record: the same checks and walk as dma_rw. */
static PyObject *
type1_replay_one(PyObject *target, uint64_t addr, Py_buffer *v, int write)
{
    Type1Object *c = (Type1Object *)target;
    if (v->len == 0 || past_end(addr, (uint64_t)v->len)) {
        PyObject *a = PyLong_FromUnsignedLongLong(addr);
        PyObject *r = a ? rules_error("check_access", "sOn", "dma_rw", a, v->len) : NULL;
        Py_XDECREF(a);
        return r;
    }
    return type1_dma_rw_run(c, addr, v, write);
}

/* Type1.replay(writes, addrs, sizes, buf, deltas=None) -> (read_cycles, reads,
 * write_cycles, writes): a recorded workload through dma_rw, each call timed. */
static PyObject *
Type1_replay(Type1Object *self, PyObject *args)
{
    return replay_method((PyObject *)self, self->base.ready, args, type1_replay_one);
}

static PyMethodDef Type1_methods[] = {
    {"dma_rw", (PyCFunction)(void (*)(void))Type1_dma_rw, METH_FASTCALL | METH_KEYWORDS,
     "dma_rw(iova, buf, write): translate, check, copy and dirty-mark in one call"},
    {"replay", (PyCFunction)Type1_replay, METH_VARARGS,
     "replay(writes, addrs, sizes, buf, deltas=None) -> (read_cycles, reads, write_cycles, writes)"},
    {NULL, NULL, 0, NULL},
};

PyTypeObject Type1Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "dmarw._native.Type1",
    .tp_basicsize = sizeof(Type1Object),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "The type1 container's native reader path (the base of dmarw.native.NativeContainer).",
    .tp_base = &CoreBaseType,
    .tp_methods = Type1_methods,
};

/* ---- the external-user handle ------------------------------------------------------- */
/* Holds the container while open (vfio_group_get_external_user): its dma_rw is the
 * container's, with one check that the handle is open.  _attach/_detach are called by
 * dmarw.vfio.ExternalUser under its own lock. */

static void
Handle_dealloc(HandleObject *self)
{
    Py_CLEAR(self->container);
    Py_CLEAR(self->group_name);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Handle_attach(HandleObject *self, PyObject *args)
{
    PyObject *c, *name;
    if (!PyArg_ParseTuple(args, "O!O:_attach", &Type1Type, &c, &name))
        return NULL;
    Py_INCREF(c);
    Py_INCREF(name);
    Py_XSETREF(self->container, (Type1Object *)c);
    Py_XSETREF(self->group_name, name);
    Py_RETURN_NONE;
}

static PyObject *
Handle_detach(HandleObject *self, PyObject *unused)
{
    (void)unused;
    Py_CLEAR(self->container);
    Py_RETURN_NONE;
}

static PyObject *
Handle_dma_rw(HandleObject *self, PyObject *const *args_in, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"iova", "buf", "write"};
    PyObject *args[3];
    if (bind_args(args_in, nargs, kwnames, names, 3, args, "dma_rw") < 0)
        return NULL;
    int write = parse_flag(args[2]);
    if (write < 0)
        return NULL;
    Type1Object *c = self->container;
    if (c == NULL)
        return dma_error("closed_handle", "sO", "dma_rw", self->group_name ? self->group_name : Py_None);
    Py_INCREF(c);
    PyObject *ret = type1_dma_rw_obj(c, args[0], args[1], write);
    Py_DECREF(c);
    return ret;
}

static PyMethodDef Handle_methods[] = {
    {"dma_rw", (PyCFunction)(void (*)(void))Handle_dma_rw, METH_FASTCALL | METH_KEYWORDS,
     "dma_rw(iova, buf, write): the container's dma_rw while the handle is open"},
    {"_attach", (PyCFunction)Handle_attach, METH_VARARGS, "_attach(container, group_name)"},
    {"_detach", (PyCFunction)Handle_detach, METH_NOARGS, "drop the container (close)"},
    {NULL, NULL, 0, NULL},
};

PyTypeObject HandleType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "dmarw._native.Handle",
    .tp_basicsize = sizeof(HandleObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "An external user's hold on a native container (base of the native ExternalUser).",
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)Handle_dealloc,
    .tp_methods = Handle_methods,
};
