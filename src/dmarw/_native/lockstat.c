/* lockstat.c: lock statistics for the native locks, in dmarw.lockstat's lock classes.
 *
 * Rule: every acquisition is counted in its class; while a lockstat.collect() block is
 * open (set_timing(True), called by lockstat when the first block opens) the wait is
 * timed with the cycle counter and reported in ns through the class's public timed(ns).
 * Off, the count is one plain increment of the class's native counter (an Atomic the
 * Python side made for it) and nothing else: no Python call, no flag lookup beyond one
 * global int.  Lock: the GIL (every update is made holding it).
 */
#include "dmarw.h"

int stats_timing;

int
stat_class_init(StatClass *sc, PyObject *cls, PyObject *count)
{
    sc->cls = NULL;
    sc->count = NULL;
    if (cls == NULL || cls == Py_None)
        return 0;
    if (count == Py_None)
        count = NULL; /* untimed acquisitions go uncounted (a probe lock used only while timing) */
    if (count != NULL && !PyObject_TypeCheck(count, &AtomicType)) {
        PyErr_SetString(PyExc_TypeError, "a lock class's native counter is an Atomic");
        return -1;
    }
    Py_INCREF(cls);
    Py_XINCREF(count);
    sc->cls = cls;
    sc->count = (AtomicObject *)count;
    return 0;
}

void
stat_class_clear(StatClass *sc)
{
    Py_CLEAR(sc->cls);
    Py_CLEAR(sc->count);
}

/* A timed acquisition: LockClass.timed(ns), ns from the counter's ticks. */
void
stat_timed(StatClass *sc, uint64_t ticks)
{
    if (sc->cls == NULL)
        return;
    PyObject *v = PyFloat_FromDouble((double)ticks * 1e9 / calibrate(0));
    PyObject *r = v ? PyObject_CallMethod(sc->cls, "timed", "O", v) : NULL;
    Py_XDECREF(v);
    if (r == NULL)
        PyErr_Clear(); /* statistics never fail an access */
    Py_XDECREF(r);
}

PyObject *
py_set_timing(PyObject *self, PyObject *arg)
{
    (void)self;
    int on = PyObject_IsTrue(arg);
    if (on < 0)
        return NULL;
    stats_timing = on;
    Py_RETURN_NONE;
}
