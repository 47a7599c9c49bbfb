/* dmarw._vmm: the vCPU exit loop of dmarw.vmm, in C — what its files share.
 *
 * bus.c     the device buses (Bus): sorted, non-overlapping [start, end) ranges, each
 *           with a device's bound read and write method; the calls into them
 * loop.c    one object per vCPU (VcpuLoop): KVM_RUN with the GIL released, the exit
 *           decoded, bus accesses served in place, kick
 * dirty.c   the dirty-ring harvest and the bitmap helpers of dmarw.vmm.dirty
 * module.c  the module: types, functions, the uapi numbers as <linux/kvm.h> has them
 *
 * Locking: the Bus arrays are replaced only with the GIL held and read only with it held
 * (a device callback runs with the GIL; a range is looked up again at every exit, and a
 * served exit holds its own references to the range's methods).
 */
#ifndef DMARW_VMM_H
#define DMARW_VMM_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <signal.h>
#include <stdint.h>

/* the signal kick() sends to the vCPU thread (a no-op handler, no SA_RESTART) */
#define SIGNAL_KICK (SIGRTMIN + 3)

typedef struct {
    uint64_t start, end;
    PyObject *read;  /* bound device.mmio_read / pio_read */
    PyObject *write; /* bound device.mmio_write / pio_write */
} Range;

typedef struct {
    PyObject_HEAD
    Range *ranges;
    Py_ssize_t n;
} Bus;

extern PyTypeObject vmm_BusType;
extern PyTypeObject vmm_VcpuLoopType;

/* the range holding [addr, addr+len), or NULL */
Range *vmm_bus_find(Bus *b, uint64_t addr, uint64_t len);
/* a copy of *r with its own references (released by vmm_bus_unhold) */
Range vmm_bus_hold(const Range *r);
void vmm_bus_unhold(Range *c);
/* call the range's read(offset, size) / write(offset, size, value); 0, or -1 with an exception */
int vmm_serve_read(Range *r, uint64_t addr, unsigned size, uint8_t *dst);
int vmm_serve_write(Range *r, uint64_t addr, unsigned size, const uint8_t *src);

PyObject *vmm_ring_harvest(PyObject *m, PyObject *args);
PyObject *vmm_or_into(PyObject *m, PyObject *args);
PyObject *vmm_any_set(PyObject *m, PyObject *arg);
PyObject *vmm_constants(PyObject *m, PyObject *ignored);

#endif
