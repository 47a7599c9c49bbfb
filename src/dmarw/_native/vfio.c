/* vfio.c: the VFIO group layer: named locks, a group's native state, the per-call path.
 *
 * Lock: a named sleeping lock (a pthread mutex) counted and timed in a lockstat class
 * like the Python Mutex; shared=True puts the mutex, PTHREAD_PROCESS_SHARED, in its own
 * MAP_SHARED anonymous mapping, so a lock made before fork() is one lock for every process
 * (the host-global vfio.group_lock of the lab's VMs).  GroupState: what the per-call path
 * reads of a Group (its three locks, its counters, how many names are on its unbound list
 * and how many devices are not bound, its container), mutated by dmarw.vfio.Group under
 * the same locks.
 *
 * Rule of the per-call path (vfio_dma_rw, the 2020 kernel's, on every call): find the
 * device's group in the registry under vfio.group_lock and take a reference; check
 * viability under group.unbound_lock and group.device_lock; count a container user under
 * group.mutex (no container: EINVAL); the container's dma_rw; drop the user and the
 * reference (atomics, no lock).  A device whose group is not native, or a registry lock
 * that is not native, takes the Python path (dmarw.vfio), which is the reference.
 */
#include "dmarw.h"

#include <stdio.h>
#include <sys/mman.h>

typedef struct {
    PyObject_HEAD
    pthread_mutex_t *m;  /* &own, or the start of the shared mapping */
    pthread_mutex_t own;
    int shared;
    StatClass stat;
    PyObject *name;
} LockObject;

static PyObject *
Lock_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"lock_class", "counter", "shared", NULL};
    PyObject *cls, *counter = NULL;
    int shared = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|Op:Lock", kwlist, &cls, &counter, &shared))
        return NULL;
    PyObject *name = PyObject_GetAttrString(cls, "name");
    if (name == NULL)
        return NULL;
    PyObject *made = NULL; /* (class, counter) from dmarw.native.lock_class when none was given */
    if (counter == NULL || counter == Py_None) {
        PyObject *mod = PyImport_ImportModule("dmarw.native");
        made = mod ? PyObject_CallMethod(mod, "lock_class", "O", name) : NULL;
        Py_XDECREF(mod);
        if (made == NULL || !PyTuple_Check(made) || PyTuple_GET_SIZE(made) != 2) {
            if (made != NULL)
                PyErr_SetString(PyExc_TypeError, "dmarw.native.lock_class: expected (class, counter)");
            Py_XDECREF(made);
            Py_DECREF(name);
            return NULL;
        }
        counter = PyTuple_GET_ITEM(made, 1);
    }
    LockObject *l = (LockObject *)type->tp_alloc(type, 0);
    if (l == NULL) {
        Py_XDECREF(made);
        Py_DECREF(name);
        return NULL;
    }
    l->name = name;
    int bad = stat_class_init(&l->stat, cls, counter) < 0;
    Py_XDECREF(made);
    if (bad) {
        Py_DECREF(l);
        return NULL;
    }
    if (shared) {
        void *p = mmap(NULL, sizeof(pthread_mutex_t), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
                       -1, 0);
        if (p == MAP_FAILED) {
            PyErr_SetFromErrno(PyExc_OSError);
            Py_DECREF(l);
            return NULL;
        }
        pthread_mutexattr_t ma;
        pthread_mutexattr_init(&ma);
        pthread_mutexattr_setpshared(&ma, PTHREAD_PROCESS_SHARED);
        int rc = pthread_mutex_init((pthread_mutex_t *)p, &ma);
        pthread_mutexattr_destroy(&ma);
        l->m = p;
        l->shared = 1;
        if (rc != 0) {
            errno = rc;
            PyErr_SetFromErrno(PyExc_OSError);
            Py_DECREF(l);
            return NULL;
        }
    } else {
        pthread_mutex_init(&l->own, NULL);
        l->m = &l->own;
    }
    return (PyObject *)l;
}

static void
Lock_dealloc(LockObject *self)
{
    if (self->m != NULL) {
        if (self->shared)
            munmap(self->m, sizeof(pthread_mutex_t)); /* other processes keep their mapping */
        else
            pthread_mutex_destroy(self->m);
    }
    stat_class_clear(&self->stat);
    Py_XDECREF(self->name);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Take the lock (waiting without the GIL), counted in its class, timed while collecting. */
static inline void
lock_take(LockObject *l)
{
    int timing = stats_timing;
    uint64_t t0 = timing ? read_cycles() : 0;
    mutex_lock_nogil(l->m);
    stat_hit(&l->stat, timing, timing ? read_cycles() - t0 : 0);
}

static inline void
lock_drop(LockObject *l)
{
    pthread_mutex_unlock(l->m);
}

static PyObject *
Lock_acquire(LockObject *self, PyObject *unused)
{
    (void)unused;
    lock_take(self);
    Py_RETURN_TRUE;
}

static PyObject *
Lock_release(LockObject *self, PyObject *unused)
{
    (void)unused;
    lock_drop(self);
    Py_RETURN_NONE;
}

static PyObject *
Lock_enter(LockObject *self, PyObject *unused)
{
    (void)unused;
    lock_take(self);
    Py_INCREF(self);
    return (PyObject *)self;
}

static PyObject *
Lock_exit(LockObject *self, PyObject *args)
{
    (void)args;
    lock_drop(self);
    Py_RETURN_FALSE;
}

static PyObject *
Lock_get_name(LockObject *self, void *closure)
{
    (void)closure;
    Py_INCREF(self->name);
    return self->name;
}

static PyObject *
Lock_get_shared(LockObject *self, void *closure)
{
    (void)closure;
    return PyBool_FromLong(self->shared);
}

static PyMethodDef Lock_methods[] = {
    {"acquire", (PyCFunction)Lock_acquire, METH_NOARGS, "take the lock (counted, timed while collecting)"},
    {"release", (PyCFunction)Lock_release, METH_NOARGS, "release the lock (held by the caller)"},
    {"__enter__", (PyCFunction)Lock_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)Lock_exit, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Lock_getset[] = {
    {"name", (getter)Lock_get_name, NULL, "the lock class", NULL},
    {"shared", (getter)Lock_get_shared, NULL, "process-shared (made before fork)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject LockType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "dmarw._native.Lock",
    .tp_basicsize = sizeof(LockObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Lock(lock_class, counter=None, shared=False): a named pthread mutex counted in dmarw.lockstat.",
    .tp_new = Lock_new,
    .tp_dealloc = (destructor)Lock_dealloc,
    .tp_methods = Lock_methods,
    .tp_getset = Lock_getset,
};

typedef struct {
    PyObject_HEAD
    PyObject *name;          /* the group's name (its registry key) */
    LockObject *unbound_lock, *device_lock, *mutex;
    AtomicObject *refs, *users;
    long unbound;            /* names on the unbound list (under unbound_lock) */
    long devices_unbound;    /* devices not bound (under device_lock) */
    PyObject *container;     /* the attached container or NULL (under mutex) */
    Type1Object *core;       /* the container when it is native, else NULL */
} GroupStateObject;

static PyObject *
GroupState_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"name", "unbound_lock", "device_lock", "mutex", "refs", "users", NULL};
    PyObject *name;
    LockObject *ul, *dl, *mx;
    AtomicObject *refs, *users;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "UO!O!O!O!O!:GroupState", kwlist, &name, &LockType, &ul,
                                     &LockType, &dl, &LockType, &mx, &AtomicType, &refs, &AtomicType,
                                     &users))
        return NULL;
    GroupStateObject *g = (GroupStateObject *)type->tp_alloc(type, 0);
    if (g == NULL)
        return NULL;
    Py_INCREF(name);
    g->name = name;
    Py_INCREF(ul);
    g->unbound_lock = ul;
    Py_INCREF(dl);
    g->device_lock = dl;
    Py_INCREF(mx);
    g->mutex = mx;
    Py_INCREF(refs);
    g->refs = refs;
    Py_INCREF(users);
    g->users = users;
    return (PyObject *)g;
}

static void
GroupState_dealloc(GroupStateObject *self)
{
    Py_XDECREF(self->name);
    Py_XDECREF(self->unbound_lock);
    Py_XDECREF(self->device_lock);
    Py_XDECREF(self->mutex);
    Py_XDECREF(self->refs);
    Py_XDECREF(self->users);
    Py_XDECREF(self->container);
    Py_XDECREF(self->core);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* set_container(c or None): called by the Python Group under group.mutex. */
static PyObject *
GroupState_set_container(GroupStateObject *self, PyObject *c)
{
    Type1Object *core = NULL;
    if (c != Py_None) {
        if (PyObject_TypeCheck(c, &Type1Type)) {
            core = (Type1Object *)c;
            Py_INCREF(core);
        }
        Py_INCREF(c);
    }
    PyObject *old = self->container;
    Type1Object *oldcore = self->core;
    self->container = c == Py_None ? NULL : c;
    self->core = core;
    Py_XDECREF(old);
    Py_XDECREF(oldcore);
    Py_RETURN_NONE;
}

static PyObject *
GroupState_get_long(GroupStateObject *self, void *closure)
{
    return PyLong_FromLong(closure ? self->devices_unbound : self->unbound);
}

static int
GroupState_set_long(GroupStateObject *self, PyObject *value, void *closure)
{
    long v = value == NULL ? -1 : PyLong_AsLong(value);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (v < 0) {
        PyErr_SetString(PyExc_ValueError, "GroupState: counts are >= 0");
        return -1;
    }
    if (closure)
        self->devices_unbound = v;
    else
        self->unbound = v;
    return 0;
}

static PyObject *
GroupState_get_obj(GroupStateObject *self, void *closure)
{
    PyObject *o = NULL;
    switch ((int)(intptr_t)closure) {
    case 0: o = self->name; break;
    case 1: o = (PyObject *)self->unbound_lock; break;
    case 2: o = (PyObject *)self->device_lock; break;
    case 3: o = (PyObject *)self->mutex; break;
    case 4: o = (PyObject *)self->refs; break;
    case 5: o = (PyObject *)self->users; break;
    default: o = self->container ? self->container : Py_None;
    }
    Py_INCREF(o);
    return o;
}

static PyMethodDef GroupState_methods[] = {
    {"set_container", (PyCFunction)GroupState_set_container, METH_O,
     "attach (a container) or detach (None); the caller holds group.mutex"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef GroupState_getset[] = {
    {"unbound", (getter)GroupState_get_long, (setter)GroupState_set_long,
     "names on the unbound list (set under unbound_lock)", NULL},
    {"devices_unbound", (getter)GroupState_get_long, (setter)GroupState_set_long,
     "devices not bound (set under device_lock)", (void *)1},
    {"name", (getter)GroupState_get_obj, NULL, "the group's name", (void *)0},
    {"unbound_lock", (getter)GroupState_get_obj, NULL, "group.unbound_lock", (void *)1},
    {"device_lock", (getter)GroupState_get_obj, NULL, "group.device_lock", (void *)2},
    {"mutex", (getter)GroupState_get_obj, NULL, "group.mutex", (void *)3},
    {"refs", (getter)GroupState_get_obj, NULL, "group references", (void *)4},
    {"container_users", (getter)GroupState_get_obj, NULL, "container users", (void *)5},
    {"container", (getter)GroupState_get_obj, NULL, "the attached container", (void *)6},
    {NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject GroupStateType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "dmarw._native.GroupState",
    .tp_basicsize = sizeof(GroupStateObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "GroupState(name, unbound_lock, device_lock, mutex, refs, users): a group as the "
              "native per-call path sees it.",
    .tp_new = GroupState_new,
    .tp_dealloc = (destructor)GroupState_dealloc,
    .tp_methods = GroupState_methods,
    .tp_getset = GroupState_getset,
};

static PyObject *str_native_state; /* "native_state", interned by vfio_init */
static PyObject *str_group;        /* "group" */
static PyObject *str_dma_rw;       /* "dma_rw" */

int
vfio_init(void)
{
    str_native_state = PyUnicode_InternFromString("native_state");
    str_group = PyUnicode_InternFromString("group");
    str_dma_rw = PyUnicode_InternFromString("dma_rw");
    return str_native_state && str_group && str_dma_rw ? 0 : -1;
}

static PyObject *vfio_groups;     /* the registry: dmarw.vfio._registry.groups */
static PyObject *vfio_fallback;   /* the Python per-call path */
static LockObject *vfio_group_lock; /* the registry lock when it is native, else NULL */

/* vfio_setup(groups, fallback): the registry dict and the Python per-call path. */
PyObject *
vfio_setup(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *groups, *fb;
    if (!PyArg_ParseTuple(args, "O!O:vfio_setup", &PyDict_Type, &groups, &fb))
        return NULL;
    Py_INCREF(groups);
    Py_XSETREF(vfio_groups, groups);
    Py_INCREF(fb);
    Py_XSETREF(vfio_fallback, fb);
    Py_RETURN_NONE;
}

/* vfio_set_group_lock(lock or None): the registry lock the native path takes (None: the
 * registry lock is not native, so every call takes the Python path). */
PyObject *
vfio_set_group_lock(PyObject *self, PyObject *arg)
{
    (void)self;
    if (arg != Py_None && !PyObject_TypeCheck(arg, &LockType)) {
        PyErr_SetString(PyExc_TypeError, "vfio_set_group_lock: expected a Lock or None");
        return NULL;
    }
    LockObject *old = vfio_group_lock;
    vfio_group_lock = arg == Py_None ? NULL : (LockObject *)arg;
    Py_XINCREF(vfio_group_lock);
    Py_XDECREF(old);
    Py_RETURN_NONE;
}

/* "vfio_dma_rw 0x..+0x..: <detail>" as DmaError(err). */
static PyObject *
vfio_error(int err, uint64_t iova, uint64_t n, PyObject *detail)
{
    if (detail == NULL)
        return NULL;
    char where[64];
    snprintf(where, sizeof where, "vfio_dma_rw 0x%llx+0x%llx", (unsigned long long)iova, (unsigned long long)n);
    PyObject *msg = PyUnicode_FromFormat("%s: %U", where, detail);
    Py_DECREF(detail);
    if (msg == NULL)
        return NULL;
    errors_raise("fail", "iN", err, msg);
    return NULL;
}

typedef struct {
    GroupStateObject *st; /* a reference while entered */
    PyObject *container;
    Type1Object *core;
} VfioRef;

/* Steps 1-3 of the per-call path on a device with a native group: registry lookup under
 * vfio.group_lock and a group reference, viability under group.unbound_lock and
 * group.device_lock, a container user under group.mutex.  1 entered, 0 not a native
 * device (nothing done, no error), -1 error (every reference dropped again). */
static int
vfio_enter(PyObject *device, uint64_t iova, uint64_t n, VfioRef *r)
{
    LockObject *gl = vfio_group_lock;
    if (gl == NULL || vfio_groups == NULL)
        return 0;
    PyObject *sto = PyObject_GetAttr(device, str_native_state);
    if (sto == NULL || !PyObject_TypeCheck(sto, &GroupStateType)) {
        Py_XDECREF(sto);
        PyErr_Clear();
        return 0;
    }
    GroupStateObject *st = (GroupStateObject *)sto;
    PyObject *grp = PyObject_GetAttr(device, str_group);
    if (grp == NULL) {
        Py_DECREF(st);
        return -1;
    }
    Py_INCREF(gl);
    lock_take(gl);
    PyObject *found = PyDict_GetItemWithError(vfio_groups, st->name);
    int registered = found != NULL && found == grp;
    if (registered)
        __atomic_fetch_add(&st->refs->v, 1, __ATOMIC_ACQ_REL);
    lock_drop(gl);
    Py_DECREF(gl);
    Py_DECREF(grp);
    if (!registered) {
        Py_DECREF(st);
        if (PyErr_Occurred())
            return -1;
        vfio_error(ENODEV, iova, n, PyUnicode_FromFormat("%R: group is not registered", device));
        return -1;
    }
    lock_take(st->unbound_lock);
    int viable = st->unbound == 0;
    lock_drop(st->unbound_lock);
    if (viable) {
        lock_take(st->device_lock);
        viable = st->devices_unbound == 0;
        lock_drop(st->device_lock);
    }
    if (!viable) {
        __atomic_fetch_sub(&st->refs->v, 1, __ATOMIC_ACQ_REL);
        vfio_error(EINVAL, iova, n, PyUnicode_FromFormat("group %R is not viable (unbound device)", st->name));
        Py_DECREF(st);
        return -1;
    }
    lock_take(st->mutex);
    PyObject *c = st->container;
    Type1Object *core = st->core;
    if (c != NULL) {
        Py_INCREF(c);
        Py_XINCREF(core);
        __atomic_fetch_add(&st->users->v, 1, __ATOMIC_ACQ_REL);
    }
    lock_drop(st->mutex);
    if (c == NULL) {
        __atomic_fetch_sub(&st->refs->v, 1, __ATOMIC_ACQ_REL);
        vfio_error(EINVAL, iova, n, PyUnicode_FromFormat("group %R is not attached to a container", st->name));
        Py_DECREF(st);
        return -1;
    }
    r->st = st;
    r->container = c;
    r->core = core;
    return 1;
}

/* Step 5: drop the container user and the group reference (atomics, no lock). */
static void
vfio_leave(VfioRef *r)
{
    __atomic_fetch_sub(&r->st->users->v, 1, __ATOMIC_ACQ_REL);
    __atomic_fetch_sub(&r->st->refs->v, 1, __ATOMIC_ACQ_REL);
    Py_XDECREF(r->core);
    Py_DECREF(r->container);
    Py_DECREF(r->st);
}

/* vfio_dma_rw(device, iova, buf, write): the per-call path in one call when the device's
 * group is native and the registry lock is native; otherwise the Python path. */
PyObject *
vfio_dma_rw(PyObject *self, PyObject *const *args_in, Py_ssize_t nargs, PyObject *kwnames)
{
    (void)self;
    static const char *const names[] = {"device", "iova", "buf", "write"};
    PyObject *args[4];
    if (bind_args(args_in, nargs, kwnames, names, 4, args, "vfio_dma_rw") < 0)
        return NULL;
    uint64_t iova;
    Py_buffer v;
    if (parse_addr(args[1], &iova) < 0)
        goto fallback; /* unusual addresses: the Python path words the error */
    if (PyObject_GetBuffer(args[2], &v, PyBUF_SIMPLE) < 0) {
        PyErr_Clear();
        goto fallback;
    }
    int write = parse_flag(args[3]);
    if (write < 0) {
        PyBuffer_Release(&v);
        return NULL;
    }
    VfioRef r;
    int in = vfio_enter(args[0], iova, (uint64_t)v.len, &r);
    if (in <= 0) {
        PyBuffer_Release(&v);
        if (in < 0)
            return NULL;
        goto fallback;
    }
    PyObject *ret;
    if (r.core == NULL) {
        PyObject *call[4] = {r.container, args[1], args[2], args[3]};
        ret = PyObject_VectorcallMethod(str_dma_rw, call, 4 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    } else if (!r.core->base.ready || v.len == 0 || past_end(iova, (uint64_t)v.len) || (!write && v.readonly)) {
        ret = type1_dma_rw_obj(r.core, args[1], args[2], write); /* the rules word the error */
    } else {
        ret = type1_dma_rw_run(r.core, iova, &v, write);
    }
    PyBuffer_Release(&v);
    vfio_leave(&r);
    return ret;
fallback:
    if (vfio_fallback == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "vfio_dma_rw: vfio_setup() was not called");
        return NULL;
    }
    return PyObject_Vectorcall(vfio_fallback, args_in, nargs, kwnames);
}

/* One per-call dma_rw for vfio_replay: the device's native group and container only. */
static PyObject *
vfio_replay_one(PyObject *device, uint64_t iova, Py_buffer *v, int write)
{
    VfioRef r;
    int in = vfio_enter(device, iova, (uint64_t)v->len, &r);
    if (in <= 0) {
        if (in == 0)
            PyErr_SetString(PyExc_TypeError,
                            "vfio_replay: the device's group or the registry lock is not native");
        return NULL;
    }
    PyObject *ret;
    if (r.core == NULL) {
        PyErr_SetString(PyExc_TypeError, "vfio_replay: the group's container is not native");
        ret = NULL;
    } else {
        ret = (v->len == 0 || past_end(iova, (uint64_t)v->len))
                  ? rules_error("check_access", "sKn", "dma_rw", (unsigned long long)iova, v->len)
                  : type1_dma_rw_run(r.core, iova, v, write);
    }
    vfio_leave(&r);
    return ret;
}

/* vfio_replay(device, writes, addrs, sizes, buf, deltas=None): Core.replay through the
 * per-call path (steps 1-5 on every record), each call timed with the cycle counter. */
PyObject *
vfio_replay(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *dev, *ow, *oa, *os, *ob, *od = NULL;
    if (!PyArg_ParseTuple(args, "OOOOO|O:vfio_replay", &dev, &ow, &oa, &os, &ob, &od))
        return NULL;
    Records r;
    if (records_get(&r, ow, oa, os, ob, od) < 0)
        return NULL;
    PyObject *ret = replay_records(&r, vfio_replay_one, dev);
    records_release(&r);
    return ret;
}

