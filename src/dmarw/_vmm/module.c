/* The module dmarw._vmm: its types and functions (see vmm.h). */
#include "vmm.h"

#include <linux/kvm.h>

PyObject *vmm_constants(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(ignored))
{
    return Py_BuildValue(
        "{sksksksksksksksksksksksksksksksksksksksksksksksksksksn}",
        "KVM_GET_API_VERSION", (unsigned long)KVM_GET_API_VERSION,
        "KVM_CREATE_VM", (unsigned long)KVM_CREATE_VM,
        "KVM_CHECK_EXTENSION", (unsigned long)KVM_CHECK_EXTENSION,
        "KVM_GET_VCPU_MMAP_SIZE", (unsigned long)KVM_GET_VCPU_MMAP_SIZE,
        "KVM_CREATE_VCPU", (unsigned long)KVM_CREATE_VCPU,
        "KVM_SET_USER_MEMORY_REGION", (unsigned long)KVM_SET_USER_MEMORY_REGION,
        "KVM_GET_DIRTY_LOG", (unsigned long)KVM_GET_DIRTY_LOG,
        "KVM_CLEAR_DIRTY_LOG", (unsigned long)KVM_CLEAR_DIRTY_LOG,
        "KVM_RESET_DIRTY_RINGS", (unsigned long)KVM_RESET_DIRTY_RINGS,
        "KVM_ENABLE_CAP", (unsigned long)KVM_ENABLE_CAP,
        "KVM_RUN", (unsigned long)KVM_RUN,
        "KVM_GET_REGS", (unsigned long)KVM_GET_REGS,
        "KVM_SET_REGS", (unsigned long)KVM_SET_REGS,
        "KVM_GET_SREGS", (unsigned long)KVM_GET_SREGS,
        "KVM_SET_SREGS", (unsigned long)KVM_SET_SREGS,
        "KVM_GET_MSRS", (unsigned long)KVM_GET_MSRS,
        "KVM_SET_MSRS", (unsigned long)KVM_SET_MSRS,
        "KVM_GET_FPU", (unsigned long)KVM_GET_FPU,
        "KVM_GET_XSAVE", (unsigned long)KVM_GET_XSAVE,
        "KVM_GET_XSAVE2", (unsigned long)KVM_GET_XSAVE2,
        "KVM_GET_XCRS", (unsigned long)KVM_GET_XCRS,
        "KVM_GET_VCPU_EVENTS", (unsigned long)KVM_GET_VCPU_EVENTS,
        "KVM_GET_DEBUGREGS", (unsigned long)KVM_GET_DEBUGREGS,
        "KVM_GET_MSR_INDEX_LIST", (unsigned long)KVM_GET_MSR_INDEX_LIST,
        "KVM_SET_CPUID2", (unsigned long)KVM_SET_CPUID2,
        "KVM_GET_SUPPORTED_CPUID", (unsigned long)KVM_GET_SUPPORTED_CPUID,
        "sizeof_kvm_run", (Py_ssize_t)sizeof(struct kvm_run));
}

static PyMethodDef module_methods[] = {
    {"ring_harvest", vmm_ring_harvest, METH_VARARGS, "Harvest a dirty ring into per-slot bitmaps."},
    {"or_into", vmm_or_into, METH_VARARGS, "dst |= src (bytes)."},
    {"any_set", vmm_any_set, METH_O, "True when any bit of the buffer is set."},
    {"constants", vmm_constants, METH_NOARGS, "The uapi numbers as <linux/kvm.h> defines them."},
    {NULL},
};

static struct PyModuleDef vmm_module = {
    PyModuleDef_HEAD_INIT, "dmarw._vmm", "The native vCPU exit loop and dirty-ring harvest of dmarw.vmm.", -1,
    module_methods,
};

PyMODINIT_FUNC PyInit__vmm(void)
{
    if (PyType_Ready(&vmm_BusType) < 0 || PyType_Ready(&vmm_VcpuLoopType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&vmm_module);
    if (!m)
        return NULL;
    Py_INCREF(&vmm_BusType);
    Py_INCREF(&vmm_VcpuLoopType);
    if (PyModule_AddObject(m, "Bus", (PyObject *)&vmm_BusType) < 0 ||
        PyModule_AddObject(m, "VcpuLoop", (PyObject *)&vmm_VcpuLoopType) < 0 ||
        PyModule_AddIntConstant(m, "SIGNAL_KICK", SIGNAL_KICK) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
