/* The dirty-ring harvest and bitmap helpers of dmarw._vmm (see vmm.h). */
#include "vmm.h"

#include <linux/kvm.h>
#include <string.h>

/* ring_harvest(addr, entries, fetch, bitmaps) -> (fetch, harvested)
 * Walk the ring of `entries` struct kvm_dirty_gfn at addr from index `fetch`: each entry
 * whose flags say DIRTY (acquire load) sets bit `offset` of bitmaps[slot] (a writable
 * buffer; entries of slots absent from the dict, or past a buffer's end, are dropped) and
 * is handed back with RESET (release store).  The caller issues KVM_RESET_DIRTY_RINGS. */
PyObject *vmm_ring_harvest(PyObject *Py_UNUSED(m), PyObject *args)
{
    unsigned long long addr, fetch;
    unsigned int entries;
    PyObject *bitmaps;
    if (!PyArg_ParseTuple(args, "KIKO!", &addr, &entries, &fetch, &PyDict_Type, &bitmaps))
        return NULL;
    if (!addr || !entries || (entries & (entries - 1))) {
        PyErr_SetString(PyExc_ValueError, "ring_harvest: bad ring");
        return NULL;
    }
    struct kvm_dirty_gfn *ring = (struct kvm_dirty_gfn *)(uintptr_t)addr;
    unsigned long long n = 0;
    uint32_t last_slot = UINT32_MAX;
    Py_buffer buf = {0};
    int have = 0;
    for (;;) {
        struct kvm_dirty_gfn *e = &ring[fetch & (entries - 1)];
        uint32_t flags = __atomic_load_n(&e->flags, __ATOMIC_ACQUIRE);
        if (!(flags & KVM_DIRTY_GFN_F_DIRTY))
            break;
        uint32_t slot = e->slot;
        uint64_t off = e->offset;
        if (slot != last_slot) {
            if (have)
                PyBuffer_Release(&buf);
            have = 0;
            last_slot = slot;
            PyObject *key = PyLong_FromUnsignedLong(slot);
            if (!key)
                return NULL;
            PyObject *bm = PyDict_GetItemWithError(bitmaps, key);
            Py_DECREF(key);
            if (!bm && PyErr_Occurred())
                return NULL;
            if (bm) {
                if (PyObject_GetBuffer(bm, &buf, PyBUF_WRITABLE) < 0)
                    return NULL;
                have = 1;
            }
        }
        if (have && off < (uint64_t)buf.len * 8)
            ((uint8_t *)buf.buf)[off >> 3] |= (uint8_t)(1u << (off & 7));
        __atomic_store_n(&e->flags, KVM_DIRTY_GFN_F_RESET, __ATOMIC_RELEASE);
        fetch++;
        n++;
    }
    if (have)
        PyBuffer_Release(&buf);
    return Py_BuildValue("(KK)", fetch, n);
}

/* or_into(dst, src): dst |= src over min(len) bytes, 8 at a time; returns dst's set bits. */
PyObject *vmm_or_into(PyObject *Py_UNUSED(m), PyObject *args)
{
    Py_buffer d, s;
    if (!PyArg_ParseTuple(args, "w*y*", &d, &s))
        return NULL;
    Py_ssize_t n = d.len < s.len ? d.len : s.len;
    uint8_t *dp = d.buf;
    const uint8_t *sp = s.buf;
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t a, b;
        memcpy(&a, dp + i, 8);
        memcpy(&b, sp + i, 8);
        a |= b;
        memcpy(dp + i, &a, 8);
    }
    for (; i < n; i++)
        dp[i] |= sp[i];
    PyBuffer_Release(&d);
    PyBuffer_Release(&s);
    Py_RETURN_NONE;
}

/* any_set(buf): True when any bit is set (stops at the first non-zero word). */
PyObject *vmm_any_set(PyObject *Py_UNUSED(m), PyObject *arg)
{
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0)
        return NULL;
    const uint8_t *p = b.buf;
    int found = 0;
    Py_ssize_t i = 0;
    for (; !found && i + 64 <= b.len; i += 64) { /* 8 words per step: the compiler vectorises */
        uint64_t w[8], acc = 0;
        memcpy(w, p + i, sizeof(w));
        for (int k = 0; k < 8; k++)
            acc |= w[k];
        found = acc != 0;
    }
    for (; !found && i < b.len; i++)
        found = p[i] != 0;
    PyBuffer_Release(&b);
    return PyBool_FromLong(found);
}
