/*
 * fastmmio.sim._hooks: C callbacks for unicorn on the simulator's exit path (optional).
 *
 * The doorbell sink (fastmmio.sim.cpu.CpuEngine): a store whose EPT exit the hypervisor
 * model answered inside the TLB-fill hook lands in an MMIO region whose only job is the VM
 * entry's flush of unicorn's TLB (uc_ctl with the TLB-flush control). Called by unicorn once
 * per such exit; done here it costs no Python frame and no ctypes round trip.
 *
 * Nothing of unicorn is linked in: the caller hands the address of uc_ctl and the control
 * word in the user data (struct sink below), both taken from the binding at run time.
 * Without this module (no C compiler at install time) the sink's callback is a Python
 * function doing the same (fastmmio.sim.cpu), and tests/unit/test_sim_exit_path.py checks
 * both count the same.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>

typedef int (*uc_ctl_fn)(void *uc, int control, ...);

/* the user data of the sink's write callback; its layout is mirrored by a ctypes
 * Structure in fastmmio.sim.cpu (SINK_DATA_SIZE lets Python check it) */
struct sink {
    uc_ctl_fn ctl;
    int control;
};

/* uc_cb_mmio_write_t */
static void sink_write(void *uc, uint64_t offset, unsigned size, uint64_t value, void *user)
{
    const struct sink *s = user;
    (void)offset;
    (void)size;
    (void)value;
    s->ctl(uc, s->control);
}

/* uc_cb_mmio_read_t: only stores are sent to the sink */
static uint64_t sink_read(void *uc, uint64_t offset, unsigned size, void *user)
{
    (void)uc;
    (void)offset;
    (void)size;
    (void)user;
    return 0;
}

static struct PyModuleDef hooks_module = {
    PyModuleDef_HEAD_INIT, "fastmmio.sim._hooks",
    "C callbacks for unicorn on the simulator's exit path (see the C source).", -1, NULL,
};

PyMODINIT_FUNC PyInit__hooks(void)
{
    PyObject *m = PyModule_Create(&hooks_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObject(m, "SINK_WRITE", PyLong_FromVoidPtr((void *)sink_write)) < 0
        || PyModule_AddObject(m, "SINK_READ", PyLong_FromVoidPtr((void *)sink_read)) < 0
        || PyModule_AddIntConstant(m, "SINK_DATA_SIZE", (long)sizeof(struct sink)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
