/* args.c: argument binding for the METH_FASTCALL entry points.
 *
 * Rule: positional and keyword arguments bind to the parameter names as a Python def
 * would (the all-positional call is inline, bind_args in dmarw.h); addresses are read
 * with the public PyLong API (parse_addr, dmarw.h), and anything but an exact int in
 * [0, 2**64) is handed to dmarw.errors' rules, which word the error.  No lock.
 */
#include "dmarw.h"

int
bind_args_slow(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, const char *const *names, int n,
               PyObject **out, const char *fname)
{
    nargs = PyVectorcall_NARGS(nargs);
    if (kwnames == NULL && nargs == n) {
        for (int i = 0; i < n; i++)
            out[i] = args[i];
        return 0;
    }
    if (nargs > n) {
        PyErr_Format(PyExc_TypeError, "%s() takes %d arguments (%zd given)", fname, n, nargs);
        return -1;
    }
    for (int i = 0; i < n; i++)
        out[i] = i < nargs ? args[i] : NULL;
    Py_ssize_t nk = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    for (Py_ssize_t k = 0; k < nk; k++) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, k);
        int j = 0;
        while (j < n && PyUnicode_CompareWithASCIIString(key, names[j]) != 0)
            j++;
        if (j == n || out[j] != NULL) {
            PyErr_Format(PyExc_TypeError, "%s() got %s argument %R", fname,
                         j == n ? "an unexpected keyword" : "multiple values for", key);
            return -1;
        }
        out[j] = args[nargs + k];
    }
    for (int i = 0; i < n; i++) {
        if (out[i] == NULL) {
            PyErr_Format(PyExc_TypeError, "%s() missing argument '%s'", fname, names[i]);
            return -1;
        }
    }
    return 0;
}
