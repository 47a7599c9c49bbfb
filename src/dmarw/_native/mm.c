/* mm.c: atomics and address-space references.
 *
 * Atomic: a counter (the kernel's atomic_t / kref): a group's references and container
 * users, a lock class's native count, a region's "gone" flag.
 *
 * MmRef: one address space's user count as a real atomic, its owner's exit flag and its
 * task_lock.  Rules (mmget_not_zero, get_task_mm): a user is admitted unless the owner has
 * exited (AddressSpace.close() calls exit() once, through the space's exit hook);
 * get_task_mm also refuses a kernel-thread owner and takes task_lock (a pthread mutex,
 * counted in the task_lock class) around the check and the count.
 */
#include "dmarw.h"

static PyObject *
Atomic_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"value", NULL};
    long v = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|l:Atomic", kwlist, &v))
        return NULL;
    AtomicObject *a = (AtomicObject *)type->tp_alloc(type, 0);
    if (a != NULL)
        a->v = v;
    return (PyObject *)a;
}

static PyObject *
Atomic_inc(AtomicObject *self, PyObject *unused)
{
    (void)unused;
    return PyLong_FromLong(__atomic_fetch_add(&self->v, 1, __ATOMIC_ACQ_REL));
}

static PyObject *
Atomic_dec(AtomicObject *self, PyObject *unused)
{
    (void)unused;
    return PyLong_FromLong(__atomic_fetch_sub(&self->v, 1, __ATOMIC_ACQ_REL));
}

static PyObject *
Atomic_value(AtomicObject *self, void *closure)
{
    (void)closure;
    return PyLong_FromLong(__atomic_load_n(&self->v, __ATOMIC_SEQ_CST));
}

static PyMethodDef Atomic_methods[] = {
    {"inc", (PyCFunction)Atomic_inc, METH_NOARGS, "add one; returns the old value"},
    {"dec", (PyCFunction)Atomic_dec, METH_NOARGS, "subtract one; returns the old value"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Atomic_getset[] = {
    {"value", (getter)Atomic_value, NULL, "the current value", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject AtomicType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "dmarw._native.Atomic",
    .tp_basicsize = sizeof(AtomicObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Atomic(value=0): a lock-free counter (inc, dec, value).",
    .tp_new = Atomic_new,
    .tp_methods = Atomic_methods,
    .tp_getset = Atomic_getset,
};

static PyObject *
MmRef_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"kthread", NULL};
    int kthread = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|p:MmRef", kwlist, &kthread))
        return NULL;
    MmRefObject *self = (MmRefObject *)type->tp_alloc(type, 0);
    if (self != NULL) {
        self->users = 0;
        self->exited = 0;
        self->kthread = kthread;
        pthread_mutex_init(&self->task_lock, NULL);
    }
    return (PyObject *)self;
}

static void
MmRef_dealloc(MmRefObject *self)
{
    pthread_mutex_destroy(&self->task_lock);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The owner exits: no user is admitted afterwards (under task_lock, as get_task_mm). */
static PyObject *
MmRef_exit(MmRefObject *self, PyObject *unused)
{
    (void)unused;
    mutex_lock_nogil(&self->task_lock);
    __atomic_store_n(&self->exited, 1, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&self->task_lock);
    Py_RETURN_NONE;
}

static PyObject *
MmRef_get(MmRefObject *self, void *closure)
{
    if (closure == NULL)
        return PyLong_FromLong(__atomic_load_n(&self->users, __ATOMIC_SEQ_CST));
    return PyBool_FromLong(__atomic_load_n(&self->exited, __ATOMIC_SEQ_CST));
}

static PyMethodDef MmRef_methods[] = {
    {"exit", (PyCFunction)MmRef_exit, METH_NOARGS, "the owner exits: refuse every later user"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef MmRef_getset[] = {
    {"users", (getter)MmRef_get, NULL, "native users in flight", NULL},
    {"exited", (getter)MmRef_get, NULL, "the owner has exited", (void *)1},
    {NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject MmRefType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "dmarw._native.MmRef",
    .tp_basicsize = sizeof(MmRefObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "MmRef(kthread=False): one address space's user count as a real atomic, its exit flag "
              "and its task_lock.",
    .tp_new = MmRef_new,
    .tp_dealloc = (destructor)MmRef_dealloc,
    .tp_methods = MmRef_methods,
    .tp_getset = MmRef_getset,
};

/* get_task_mm on the native count: the task lock (counted in its class), the exit and
 * kthread checks, the count.  1 counted, 0 refused. */
int
mm_get_task(MmRefObject *mm, StatClass *task_stat)
{
    int timing = stats_timing;
    uint64_t t0 = timing ? read_cycles() : 0;
    mutex_lock_nogil(&mm->task_lock);
    uint64_t waited = timing ? read_cycles() - t0 : 0;
    int ok = !__atomic_load_n(&mm->exited, __ATOMIC_ACQUIRE) && !mm->kthread;
    if (ok)
        __atomic_fetch_add(&mm->users, 1, __ATOMIC_ACQUIRE);
    pthread_mutex_unlock(&mm->task_lock);
    stat_hit(task_stat, timing, waited);
    return ok;
}
