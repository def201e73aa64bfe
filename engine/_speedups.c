/* The engine's snapshot encoder's per-order loop in C (engine.codec.snapshot_bytes): a
 * primary's matching stands still while a snapshot is encoded, ~1 us per resting order
 * in Python on this machine, ~0.4 us here. tests/test_book.py holds it to the Python
 * loop it replaces (_orders_py) and to the stored format's pinned hash.
 *
 * encode_orders(queues, by_account) -> (bytes, count): for each queue (a price level's
 * deque of orders, in the order given) and each order in it whose qty is not 0,
 * struct "<qqqBBBI" of (oid, price, qty, side, post_only, stp, by_account[account])
 * then the client order id as one length byte and its ASCII bytes. An order is the
 * engine's list [qty, oid, account, cid, side, price, post_only, stp]. The same bytes
 * as the Python loop wherever both succeed; its refusals: KeyError for an account not in
 * by_account, UnicodeEncodeError for a non-ASCII id, OverflowError for a field out of
 * its range (the Python loop's struct.error), ValueError for an id over 255 bytes (the
 * caller's CodecError), TypeError for an order that is not a list of 8 fields.
 *
 * An order's fields are held (a reference each) while it is encoded: a truth test or a
 * dict look-up may run Python code (never with the engine's ints, strs and Account
 * objects, which compare by identity), and that code must not free what is read.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    char *p;
    Py_ssize_t len, cap;
} Buf;

static int
buf_reserve(Buf *b, Py_ssize_t more)
{
    if (b->len + more <= b->cap)
        return 0;
    Py_ssize_t cap = b->cap ? b->cap : 1 << 16;
    while (cap < b->len + more) {
        if (cap > PY_SSIZE_T_MAX / 2) {
            PyErr_NoMemory();
            return -1;
        }
        cap *= 2;
    }
    char *p = PyMem_Realloc(b->p, (size_t)cap);
    if (p == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->p = p;
    b->cap = cap;
    return 0;
}

static void
put_le(char *out, uint64_t v, int size)
{
    for (int i = 0; i < size; i++)
        out[i] = (char)((v >> (8 * i)) & 0xFF);
}

/* An int field in [lo, hi] (struct's range for its format), or -1 with an error. */
static int
field(PyObject **o, Py_ssize_t i, long long lo, unsigned long long hi, uint64_t *out)
{
    PyObject *v = o[i];
    int overflow = 0;
    long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (x == -1 && PyErr_Occurred())
        return -1;
    if (overflow || x < lo || (x >= 0 && (unsigned long long)x > hi)) {
        PyErr_Format(PyExc_OverflowError, "order field %zd out of range", i);
        return -1;
    }
    *out = (uint64_t)x;
    return 0;
}

enum { QTY, OID, ACCT, CID, SIDE, PRICE, POST_ONLY, STP, ORDER_FIELDS };
#define ORDER_SIZE (8 + 8 + 8 + 1 + 1 + 1 + 4)

static int
encode_fields(Buf *b, PyObject **o, PyObject *by_account)
{
    int live = PyObject_IsTrue(o[QTY]);
    if (live <= 0)
        return live; /* 0: a filled or cancelled order still queued; -1: an error */
    uint64_t oid, price, qty, side, post_only, stp, acct;
    if (field(o, OID, INT64_MIN, INT64_MAX, &oid) < 0
            || field(o, PRICE, INT64_MIN, INT64_MAX, &price) < 0
            || field(o, QTY, INT64_MIN, INT64_MAX, &qty) < 0
            || field(o, SIDE, 0, 255, &side) < 0
            || field(o, POST_ONLY, 0, 255, &post_only) < 0
            || field(o, STP, 0, 255, &stp) < 0)
        return -1;
    PyObject *index = PyDict_GetItemWithError(by_account, o[ACCT]);
    if (index == NULL) {
        if (!PyErr_Occurred()) {
            PyObject *key = PyTuple_Pack(1, o[ACCT]); /* a tuple key stays one key */
            if (key != NULL) {
                PyErr_SetObject(PyExc_KeyError, key);
                Py_DECREF(key);
            }
        }
        return -1;
    }
    Py_INCREF(index);
    int overflow = 0;
    long long ai = PyLong_AsLongLongAndOverflow(index, &overflow);
    Py_DECREF(index);
    if (ai == -1 && PyErr_Occurred())
        return -1;
    if (overflow || ai < 0 || ai > 0xFFFFFFFFLL) {
        PyErr_SetString(PyExc_OverflowError, "account index out of range");
        return -1;
    }
    acct = (uint64_t)ai;
    PyObject *cid = o[CID];
    if (!PyUnicode_Check(cid)) {
        PyErr_SetString(PyExc_TypeError, "a client order id is a str");
        return -1;
    }
    if (PyUnicode_READY(cid) < 0)
        return -1;
    if (!PyUnicode_IS_ASCII(cid)) {
        Py_XDECREF(PyUnicode_AsASCIIString(cid)); /* raises the UnicodeEncodeError */
        return -1;
    }
    Py_ssize_t n = PyUnicode_GET_LENGTH(cid);
    if (n > 255) {
        PyErr_SetString(PyExc_ValueError, "string longer than 255 bytes");
        return -1;
    }
    if (buf_reserve(b, ORDER_SIZE + 1 + n) < 0)
        return -1;
    char *out = b->p + b->len;
    put_le(out, oid, 8);
    put_le(out + 8, price, 8);
    put_le(out + 16, qty, 8);
    out[24] = (char)side;
    out[25] = (char)post_only;
    out[26] = (char)stp;
    put_le(out + 27, acct, 4);
    out[ORDER_SIZE] = (char)n;
    memcpy(out + ORDER_SIZE + 1, PyUnicode_1BYTE_DATA(cid), (size_t)n);
    b->len += ORDER_SIZE + 1 + n;
    return 1;
}

static int
encode_order(Buf *b, PyObject *o, PyObject *by_account)
{
    if (!PyList_CheckExact(o) || PyList_GET_SIZE(o) < ORDER_FIELDS) {
        PyErr_SetString(PyExc_TypeError, "an order is a list of 8 fields");
        return -1;
    }
    PyObject *fields[ORDER_FIELDS];
    for (int k = 0; k < ORDER_FIELDS; k++) {
        fields[k] = PyList_GET_ITEM(o, k);
        Py_INCREF(fields[k]);
    }
    int r = encode_fields(b, fields, by_account);
    for (int k = 0; k < ORDER_FIELDS; k++)
        Py_DECREF(fields[k]);
    return r;
}

PyDoc_STRVAR(encode_orders_doc,
"encode_orders(queues, by_account) -> (bytes, count): the snapshot's orders of these\n"
"queues in their order (see the module's comment).");

static PyObject *
encode_orders(PyObject *self, PyObject *args)
{
    PyObject *queues, *by_account;
    if (!PyArg_ParseTuple(args, "OO!:encode_orders", &queues, &PyDict_Type, &by_account))
        return NULL;
    PyObject *outer = PyObject_GetIter(queues);
    if (outer == NULL)
        return NULL;
    Buf b = {NULL, 0, 0};
    Py_ssize_t count = 0;
    PyObject *queue;
    while ((queue = PyIter_Next(outer)) != NULL) {
        PyObject *inner = PyObject_GetIter(queue);
        Py_DECREF(queue);
        if (inner == NULL)
            goto fail;
        PyObject *o;
        while ((o = PyIter_Next(inner)) != NULL) {
            int r = encode_order(&b, o, by_account);
            Py_DECREF(o);
            if (r < 0) {
                Py_DECREF(inner);
                goto fail;
            }
            count += r;
        }
        Py_DECREF(inner);
        if (PyErr_Occurred())
            goto fail;
    }
    if (PyErr_Occurred())
        goto fail;
    Py_DECREF(outer);
    PyObject *data = PyBytes_FromStringAndSize(b.p ? b.p : "", b.len);
    PyMem_Free(b.p);
    if (data == NULL)
        return NULL;
    return Py_BuildValue("(Nn)", data, count);
fail:
    Py_DECREF(outer);
    PyMem_Free(b.p);
    return NULL;
}

static PyMethodDef methods[] = {
    {"encode_orders", encode_orders, METH_VARARGS, encode_orders_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "engine._speedups",
    "The engine's snapshot encoder's per-order loop in C.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModule_Create(&module);
}
