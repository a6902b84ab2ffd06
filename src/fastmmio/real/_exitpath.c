/*
 * fastmmio.real._exitpath: the run loop's per-exit host path in C (optional).
 *
 * One Engine drives one vCPU through KVM_RUN with the GIL released for the whole batch and
 * does per exit exactly what the pure-Python loop in fastmmio/real/runloop.py does (that loop
 * is the reference; tests/kvm/test_exitpath.py checks both give identical BatchResults):
 *
 *   - time inside the KVM_RUN ioctl (CLOCK_MONOTONIC, the clock of time.perf_counter_ns);
 *   - drain the coalesced MMIO ring after every return (struct kvm_coalesced_mmio_ring: the
 *     kernel appends at `last`, userspace consumes from `first` and stores `last` there);
 *   - KVM_EXIT_IO: an OUT to the done port ends the batch; other OUTs are recorded; an IN gets
 *     the device's read value (truncated to the width) in every element of a string IN;
 *   - KVM_EXIT_MMIO: a write is recorded, a read gets the device's read value;
 *   - count (kind, address, width, direction, data) in a histogram and keep the first `cap`
 *     exits and the first `cap` coalesced entries in order.
 *
 * Anything else goes back to Python: the done OUT (ST_DONE), KVM_RUN returning EINTR/EAGAIN
 * (ST_INTR: the watchdog's immediate_exit plus pthread_kill, or another signal whose Python
 * handler then runs), another errno (ST_ERRNO), an exit reason the device model does not
 * serve (ST_EXIT), a full histogram table (ST_FULL: Python moves it into its dict and calls
 * run() again; the exit has been handled), or a width or offset no KVM reports (ST_BAD).
 *
 * No struct layout is written here: every offset inside struct kvm_run and the coalesced ring
 * comes from Python (fastmmio.real.binding, the single description of the uapi), as does the
 * KVM_RUN request number and the exit reason values.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>

enum { ST_DONE = 0, ST_INTR = 1, ST_ERRNO = 2, ST_EXIT = 3, ST_FULL = 4, ST_BAD = 5 };
enum { K_IO = 0, K_MMIO = 1, K_COALESCED_MMIO = 2, K_COALESCED_PIO = 3 };

#define HIST_CAP 256

/* the layout tuple, in this order (fastmmio/real/exitpath.py builds it) */
enum {
    L_RUN_REQUEST, L_EXIT_REASON, L_EXIT_IO, L_EXIT_MMIO, L_IO_OUT,
    L_IO_DIRECTION, L_IO_SIZE, L_IO_PORT, L_IO_COUNT, L_IO_DATA_OFFSET,
    L_MMIO_PHYS_ADDR, L_MMIO_DATA, L_MMIO_LEN, L_MMIO_IS_WRITE,
    L_RING_HEADER, L_RING_ENTRY, L_ENT_PHYS_ADDR, L_ENT_LEN, L_ENT_PIO, L_ENT_DATA,
    L_COUNT
};

typedef struct {
    uint64_t addr;
    uint64_t data;
    uint32_t size;
    uint32_t count;
    uint8_t kind;
    uint8_t is_write;
} rec_t;

typedef struct {
    rec_t key; /* key.count is 0 */
    uint64_t n;
} hent_t;

typedef struct {
    PyObject_HEAD
    int fd;
    int busy;
    unsigned long run_request;
    uint8_t *run;
    uint64_t run_size;
    uint64_t lay[L_COUNT];
    int64_t ring_off; /* -1: no ring */
    uint32_t ring_max;
    uint32_t done_port;
    uint8_t read_bytes[8];
    Py_ssize_t cap;
    /* batch state */
    uint64_t n_io, n_mmio, n_coalesced;
    int64_t inside_ns;
    rec_t *sample;
    Py_ssize_t n_sample;
    rec_t *csample;
    Py_ssize_t n_csample;
    hent_t hist[HIST_CAP];
    int n_hist;
} Engine;

static inline uint64_t rd(const uint8_t *p, unsigned n)
{
    uint64_t v = 0;
    memcpy(&v, p, n); /* x86: little endian, as int.from_bytes(..., "little") */
    return v;
}

static inline int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void hist_add(Engine *e, const rec_t *r, uint64_t n)
{
    for (int i = e->n_hist - 1; i >= 0; i--) {
        rec_t *k = &e->hist[i].key;
        if (k->kind == r->kind && k->addr == r->addr && k->size == r->size &&
            k->is_write == r->is_write && k->data == r->data) {
            e->hist[i].n += n;
            return;
        }
    }
    hent_t *h = &e->hist[e->n_hist++];
    h->key = *r;
    h->key.count = 0;
    h->n = n;
}

/* 0, or ST_BAD when the ring's indices point outside it */
static int drain_ring(Engine *e)
{
    uint8_t *ring = e->run + e->ring_off;
    uint32_t first = __atomic_load_n((uint32_t *)ring, __ATOMIC_ACQUIRE);
    uint32_t last = __atomic_load_n((uint32_t *)(ring + 4), __ATOMIC_ACQUIRE);
    if (first == last)
        return 0;
    if (first >= e->ring_max || last >= e->ring_max)
        return ST_BAD;
    uint32_t n = (uint32_t)((((int64_t)last - first) % e->ring_max + e->ring_max) % e->ring_max);
    Py_ssize_t room = e->cap - e->n_csample;
    uint32_t i = first;
    for (Py_ssize_t k = 0; room > 0 && k < (Py_ssize_t)n && k < room; k++) {
        const uint8_t *ent = ring + e->lay[L_RING_HEADER] + (uint64_t)i * e->lay[L_RING_ENTRY];
        rec_t *r = &e->csample[e->n_csample++];
        uint32_t len = (uint32_t)rd(ent + e->lay[L_ENT_LEN], 4);
        r->addr = rd(ent + e->lay[L_ENT_PHYS_ADDR], 8);
        r->size = len;
        r->kind = rd(ent + e->lay[L_ENT_PIO], 4) ? K_COALESCED_PIO : K_COALESCED_MMIO;
        r->is_write = 1;
        r->data = rd(ent + e->lay[L_ENT_DATA], len < 8 ? len : 8);
        r->count = 1;
        i = (i + 1) % e->ring_max;
    }
    __atomic_store_n((uint32_t *)ring, last, __ATOMIC_RELEASE);
    e->n_coalesced += n;
    return 0;
}

/* Runs without the GIL. Returns a status; *value gets the errno, exit reason or 0. */
static int loop(Engine *e, long *value)
{
    uint8_t *run = e->run;
    const uint64_t *L = e->lay;
    *value = 0;
    for (;;) {
        int64_t t0 = now_ns();
        int r = ioctl(e->fd, e->run_request, 0UL);
        int err = errno;
        e->inside_ns += now_ns() - t0;
        if (e->ring_off >= 0 && drain_ring(e) != 0)
            return ST_BAD;
        if (r < 0) {
            *value = err;
            return (err == EINTR || err == EAGAIN) ? ST_INTR : ST_ERRNO;
        }
        uint32_t reason = (uint32_t)rd(run + L[L_EXIT_REASON], 4);
        *value = reason;
        rec_t rec;
        uint64_t n;
        if (reason == L[L_EXIT_IO]) {
            uint8_t dir = run[L[L_IO_DIRECTION]];
            uint32_t size = run[L[L_IO_SIZE]];
            uint32_t port = (uint32_t)rd(run + L[L_IO_PORT], 2);
            uint32_t count = (uint32_t)rd(run + L[L_IO_COUNT], 4);
            uint64_t off = rd(run + L[L_IO_DATA_OFFSET], 8);
            if (dir == L[L_IO_OUT] && port == e->done_port)
                return ST_DONE;
            uint64_t span = dir == L[L_IO_OUT] ? size : (uint64_t)size * count;
            if (size > 8 || off > e->run_size || span > e->run_size - off)
                return ST_BAD;
            if (dir == L[L_IO_OUT]) {
                rec.data = rd(run + off, size);
                rec.is_write = 1;
            } else {
                if (size == 0)
                    return ST_BAD;
                for (uint32_t i = 0; i < count; i++)
                    memcpy(run + off + (uint64_t)i * size, e->read_bytes, size);
                rec.data = rd(e->read_bytes, size);
                rec.is_write = 0;
            }
            rec.kind = K_IO;
            rec.addr = port;
            rec.size = size;
            rec.count = count;
            n = count;
            e->n_io++;
        } else if (reason == L[L_EXIT_MMIO]) {
            uint32_t len = (uint32_t)rd(run + L[L_MMIO_LEN], 4);
            rec.addr = rd(run + L[L_MMIO_PHYS_ADDR], 8);
            if (run[L[L_MMIO_IS_WRITE]]) {
                rec.data = rd(run + L[L_MMIO_DATA], len < 8 ? len : 8);
                rec.is_write = 1;
            } else {
                if (len == 0 || len > 8)
                    return ST_BAD;
                memcpy(run + L[L_MMIO_DATA], e->read_bytes, len);
                rec.data = rd(e->read_bytes, len);
                rec.is_write = 0;
            }
            rec.kind = K_MMIO;
            rec.size = len;
            rec.count = 1;
            n = 1;
            e->n_mmio++;
        } else {
            return ST_EXIT;
        }
        hist_add(e, &rec, n);
        if (e->n_sample < e->cap)
            e->sample[e->n_sample++] = rec;
        if (e->n_hist == HIST_CAP) {
            *value = 0;
            return ST_FULL;
        }
    }
}

/* ---------------------------------------------------------------------------------------- */

static PyObject *kind_names[4];

static void Engine_dealloc(Engine *e)
{
    free(e->sample);
    free(e->csample);
    Py_TYPE(e)->tp_free((PyObject *)e);
}

static int Engine_init(Engine *e, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fd", "run_addr", "run_size", "layout", "ring_off", "ring_max",
                             "done_port", "read_value", "cap", NULL};
    int fd;
    unsigned long long run_addr, run_size, read_value;
    long long ring_off;
    unsigned int ring_max, done_port;
    Py_ssize_t cap;
    PyObject *layout;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iKKO!LIIKn", kwlist, &fd, &run_addr, &run_size,
                                     &PyTuple_Type, &layout, &ring_off, &ring_max, &done_port,
                                     &read_value, &cap))
        return -1;
    if (PyTuple_GET_SIZE(layout) != L_COUNT) {
        PyErr_Format(PyExc_ValueError, "layout: %d values expected", (int)L_COUNT);
        return -1;
    }
    for (int i = 0; i < L_COUNT; i++) {
        unsigned long long v = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(layout, i));
        if (v == (unsigned long long)-1 && PyErr_Occurred())
            return -1;
        e->lay[i] = v;
    }
    if (cap < 0 || !run_addr || (ring_off >= 0 && ring_max == 0)) {
        PyErr_SetString(PyExc_ValueError, "bad engine arguments");
        return -1;
    }
    e->fd = fd;
    e->run_request = (unsigned long)e->lay[L_RUN_REQUEST];
    e->run = (uint8_t *)(uintptr_t)run_addr;
    e->run_size = run_size;
    e->ring_off = ring_off;
    e->ring_max = ring_max;
    e->done_port = done_port;
    memcpy(e->read_bytes, &read_value, 8);
    e->cap = cap;
    free(e->sample);
    free(e->csample);
    e->sample = calloc(cap ? cap : 1, sizeof(rec_t));
    e->csample = calloc(cap ? cap : 1, sizeof(rec_t));
    if (!e->sample || !e->csample) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static PyObject *Engine_reset(Engine *e, PyObject *unused)
{
    e->n_io = e->n_mmio = e->n_coalesced = 0;
    e->inside_ns = 0;
    e->n_sample = e->n_csample = 0;
    e->n_hist = 0;
    Py_RETURN_NONE;
}

static PyObject *Engine_detach(Engine *e, PyObject *unused)
{
    e->run = NULL;
    Py_RETURN_NONE;
}

static PyObject *Engine_run(Engine *e, PyObject *unused)
{
    if (e->run == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "engine detached from kvm_run");
        return NULL;
    }
    if (e->busy) {
        PyErr_SetString(PyExc_RuntimeError, "engine already running");
        return NULL;
    }
    int status;
    long value;
    e->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    status = loop(e, &value);
    Py_END_ALLOW_THREADS
    e->busy = 0;
    return Py_BuildValue("(il)", status, value);
}

static PyObject *rec_tuple(const rec_t *r)
{
    return Py_BuildValue("(OKINNI)", kind_names[r->kind], (unsigned long long)r->addr, r->size,
                         PyBool_FromLong(r->is_write), PyLong_FromUnsignedLongLong(r->data),
                         r->count);
}

static PyObject *rec_list(const rec_t *recs, Py_ssize_t n)
{
    PyObject *list = PyList_New(n);
    if (!list)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *t = rec_tuple(&recs[i]);
        if (!t) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, t);
    }
    return list;
}

/* [((kind, addr, size, is_write, data), n), ...] in first-seen order; empties the table */
static PyObject *Engine_take_histogram(Engine *e, PyObject *unused)
{
    PyObject *list = PyList_New(e->n_hist);
    if (!list)
        return NULL;
    for (int i = 0; i < e->n_hist; i++) {
        const rec_t *k = &e->hist[i].key;
        PyObject *t = Py_BuildValue("((OKINN)K)", kind_names[k->kind], (unsigned long long)k->addr,
                                    k->size, PyBool_FromLong(k->is_write),
                                    PyLong_FromUnsignedLongLong(k->data),
                                    (unsigned long long)e->hist[i].n);
        if (!t) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, t);
    }
    e->n_hist = 0;
    return list;
}

/* (n_io, n_mmio, n_coalesced, inside_ns, exits, coalesced) for the batch so far */
static PyObject *Engine_totals(Engine *e, PyObject *unused)
{
    PyObject *s = rec_list(e->sample, e->n_sample);
    PyObject *c = s ? rec_list(e->csample, e->n_csample) : NULL;
    if (!c) {
        Py_XDECREF(s);
        return NULL;
    }
    return Py_BuildValue("(KKKLNN)", (unsigned long long)e->n_io, (unsigned long long)e->n_mmio,
                         (unsigned long long)e->n_coalesced, (long long)e->inside_ns, s, c);
}

static PyMethodDef Engine_methods[] = {
    {"run", (PyCFunction)Engine_run, METH_NOARGS,
     "KVM_RUN until something needs Python: (status, errno | exit reason | 0)."},
    {"reset", (PyCFunction)Engine_reset, METH_NOARGS, "Start a new batch."},
    {"detach", (PyCFunction)Engine_detach, METH_NOARGS,
     "Forget the kvm_run mapping (before it is unmapped); run() then raises."},
    {"take_histogram", (PyCFunction)Engine_take_histogram, METH_NOARGS,
     "The histogram entries counted since the last call, in first-seen order; empties it."},
    {"totals", (PyCFunction)Engine_totals, METH_NOARGS,
     "(n_io, n_mmio, n_coalesced, inside_ns, exit samples, coalesced samples)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "fastmmio.real._exitpath.Engine",
    .tp_basicsize = sizeof(Engine),
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One vCPU's run loop in C (see fastmmio.real.exitpath).",
    .tp_methods = Engine_methods,
    .tp_init = (initproc)Engine_init,
    .tp_new = PyType_GenericNew,
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "_exitpath",
    "The run loop's per-exit host path in C (see fastmmio.real.exitpath).", -1, NULL,
};

PyMODINIT_FUNC PyInit__exitpath(void)
{
    static const char *names[4] = {"io", "mmio", "coalesced-mmio", "coalesced-pio"};
    for (int i = 0; i < 4; i++) {
        kind_names[i] = PyUnicode_InternFromString(names[i]);
        if (!kind_names[i])
            return NULL;
    }
    if (PyType_Ready(&EngineType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (!m)
        return NULL;
    Py_INCREF(&EngineType);
    if (PyModule_AddObject(m, "Engine", (PyObject *)&EngineType) < 0 ||
        PyModule_AddIntConstant(m, "ST_DONE", ST_DONE) < 0 ||
        PyModule_AddIntConstant(m, "ST_INTR", ST_INTR) < 0 ||
        PyModule_AddIntConstant(m, "ST_ERRNO", ST_ERRNO) < 0 ||
        PyModule_AddIntConstant(m, "ST_EXIT", ST_EXIT) < 0 ||
        PyModule_AddIntConstant(m, "ST_FULL", ST_FULL) < 0 ||
        PyModule_AddIntConstant(m, "ST_BAD", ST_BAD) < 0 ||
        PyModule_AddIntConstant(m, "HIST_CAP", HIST_CAP) < 0 ||
        PyModule_AddIntConstant(m, "LAYOUT_FIELDS", L_COUNT) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
