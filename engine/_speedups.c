/* The engine's per-order and per-input loops in C: the snapshot encoder's per-order loop
 * (encode_orders, below), and the consumer's input loop (take_inputs) and output loop
 * (encode_chained), each described where it starts.
 *
 * encode_orders, for engine.codec.snapshot_bytes: a primary's matching stands still
 * while a snapshot is encoded, ~1 us per resting order in Python on this machine, ~0.4 us
 * here. tests/test_book.py holds it to the Python loop it replaces (_orders_py) and to
 * the stored format's pinned hash.
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
#include <openssl/evp.h>
#include <limits.h>
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

/* ---- outputs: encode_chained ----------------------------------------------------------
 *
 * encode_chained(raws, starts, positions, first, chain, emit, cls, kinds, framed) -> chain:
 * the consumer's hot path (engine.consumer.Consumer._process), one call per batch of
 * inputs. For each input i from `first` on whose events raws[starts[i]:starts[i + 1]]
 * are not none: blob = struct "<qH" (positions[i], number of events), then each event
 * framed (u16 length, then the event's canonical bytes: u8 tag, its int fields as "<q" in
 * field order, then its str fields as one length byte and ASCII, in field order); chain =
 * sha256(chain + blob) (OpenSSL's, as hashlib's); emit(cls((positions[i], blob, chain))),
 * built as tuple.__new__ would (cls: a tuple subclass of 3 fields without a __dict__).
 * Returns the last chain.
 *
 * kinds[tag] is the tag's field kinds (bytes of b"s" and b"i", engine.events.FIELD_KINDS).
 * An event this loop does not take as it is (a tag outside `kinds`, a field that is not
 * an int in int64 or an exact str of at most 255 ASCII characters, a tuple too short) is
 * framed by framed[tag](event) instead: the Python encoder (engine.codec._FRAMED) gives
 * it its bytes or raises its error. So the bytes and the refusals are the Python
 * encoder's (tests/test_consumer.py compares both). An input with 65,536 events or more
 * raises AssertionError (its count is a u16), as the Python loop did; a negative start
 * (never the consumer's), which a Python slice would count from the end, IndexError.
 *
 * Each event is held (a reference) while it is read: the fallback and emit run Python
 * code, which must not free what is read.
 */

/* SHA-256 by OpenSSL, the library behind hashlib.sha256: one context for every call
 * (each call holds the GIL throughout), and the algorithm fetched once (OpenSSL 3 fetches
 * EVP_sha256() again at every init, under a lock: ~5% of this loop). */
static EVP_MD *sha256_md;
static EVP_MD_CTX *sha_ctx;

/* Appends the framed event at b->len, or returns 0 (nothing written, no error) when the
 * event is not taken as it is; -1 on an error. */
static int
frame_fast(Buf *b, PyObject *r, PyObject *kinds)
{
    if (!PyTuple_CheckExact(r) || PyTuple_GET_SIZE(r) < 1)
        return 0;
    PyObject *t = PyTuple_GET_ITEM(r, 0);
    if (!PyLong_CheckExact(t))
        return 0;
    long tag = PyLong_AsLong(t);
    if (tag == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    if (tag < 0 || tag > 255 || tag >= PyTuple_GET_SIZE(kinds))
        return 0;
    PyObject *k = PyTuple_GET_ITEM(kinds, tag);
    if (!PyBytes_CheckExact(k))
        return 0;
    const char *kind = PyBytes_AS_STRING(k);
    Py_ssize_t nf = PyBytes_GET_SIZE(k);
    if (PyTuple_GET_SIZE(r) < nf + 1)
        return 0;
    if (buf_reserve(b, 3 + nf * 256) < 0)
        return -1;
    char *start = b->p + b->len, *out = start + 3;
    start[2] = (char)tag;
    for (Py_ssize_t f = 0; f < nf; f++) {
        if (kind[f] != 'i')
            continue;
        PyObject *v = PyTuple_GET_ITEM(r, f + 1);
        if (!PyLong_Check(v))
            return 0;
        int overflow = 0;
        long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
        if (x == -1 && PyErr_Occurred()) {
            PyErr_Clear();
            return 0;
        }
        if (overflow)
            return 0;
        put_le(out, (uint64_t)x, 8);
        out += 8;
    }
    for (Py_ssize_t f = 0; f < nf; f++) {
        if (kind[f] != 's')
            continue;
        PyObject *v = PyTuple_GET_ITEM(r, f + 1);
        if (!PyUnicode_CheckExact(v) || PyUnicode_READY(v) < 0) {
            PyErr_Clear();
            return 0;
        }
        Py_ssize_t n = PyUnicode_GET_LENGTH(v);
        if (!PyUnicode_IS_ASCII(v) || n > 255)
            return 0;
        *out++ = (char)n;
        memcpy(out, PyUnicode_1BYTE_DATA(v), (size_t)n);
        out += n;
    }
    Py_ssize_t len = out - start;
    put_le(start, (uint64_t)(len - 2), 2);
    b->len += len;
    return 1;
}

/* The framed event by the Python encoder framed[r[0]](r), appended. */
static int
frame_slow(Buf *b, PyObject *r, PyObject *framed)
{
    PyObject *tag = PySequence_GetItem(r, 0);
    if (tag == NULL)
        return -1;
    PyObject *enc = PyObject_GetItem(framed, tag);
    Py_DECREF(tag);
    if (enc == NULL)
        return -1;
    PyObject *data = PyObject_CallOneArg(enc, r);
    Py_DECREF(enc);
    if (data == NULL)
        return -1;
    if (!PyBytes_Check(data)) {
        Py_DECREF(data);
        PyErr_SetString(PyExc_TypeError, "an event encoder returned something else than bytes");
        return -1;
    }
    Py_ssize_t n = PyBytes_GET_SIZE(data);
    int rc = buf_reserve(b, n);
    if (rc == 0) {
        memcpy(b->p + b->len, PyBytes_AS_STRING(data), (size_t)n);
        b->len += n;
    }
    Py_DECREF(data);
    return rc;
}

static int
as_ssize(PyObject *list, Py_ssize_t i, Py_ssize_t *out)
{
    if (i >= PyList_GET_SIZE(list)) {
        PyErr_SetString(PyExc_IndexError, "list index out of range");
        return -1;
    }
    PyObject *v = PyList_GET_ITEM(list, i);
    Py_INCREF(v);
    *out = PyNumber_AsSsize_t(v, PyExc_OverflowError);
    Py_DECREF(v);
    return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
}

PyDoc_STRVAR(encode_chained_doc,
"encode_chained(raws, starts, positions, first, chain, emit, cls, kinds, framed)\n"
"-> chain: each input's outputs blob and chain hash (see the module's comment).");

static PyObject *
encode_chained(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 9) {
        PyErr_SetString(PyExc_TypeError, "encode_chained takes 9 arguments");
        return NULL;
    }
    PyObject *raws = args[0], *starts = args[1], *positions = args[2], *chain = args[4];
    PyObject *emit = args[5], *kinds = args[7], *framed = args[8];
    PyTypeObject *cls = (PyTypeObject *)args[6];
    if (!PyList_Check(raws) || !PyList_Check(starts) || !PyList_Check(positions)
            || !PyTuple_Check(kinds) || !PyBytes_Check(chain)) {
        PyErr_SetString(PyExc_TypeError,
                        "encode_chained: raws, starts and positions are lists, kinds a "
                        "tuple, chain bytes");
        return NULL;
    }
    if (!PyType_Check(args[6]) || !PyType_IsSubtype(cls, &PyTuple_Type)
            || cls->tp_dictoffset != 0) {
        PyErr_SetString(PyExc_TypeError, "encode_chained: cls is a tuple subclass without "
                                         "a __dict__");
        return NULL;
    }
    Py_ssize_t first = PyNumber_AsSsize_t(args[3], PyExc_OverflowError);
    if (first == -1 && PyErr_Occurred())
        return NULL;
    if (first < 0) {
        PyErr_SetString(PyExc_ValueError, "encode_chained: first is negative");
        return NULL;
    }
    if (PyBytes_GET_SIZE(chain) != 32) {
        PyErr_SetString(PyExc_ValueError, "a chain hash is 32 bytes");
        return NULL;
    }
    Buf b = {NULL, 0, 0};
    PyObject *position = NULL; /* held from its read until it moves into its Pending */
    Py_INCREF(chain);
    for (Py_ssize_t i = first; i < PyList_GET_SIZE(positions); i++) {
        Py_ssize_t start, end;
        if (as_ssize(starts, i, &start) < 0 || as_ssize(starts, i + 1, &end) < 0)
            goto fail;
        if (start == end)
            continue;
        /* raws[j] is read from start on, bounded above only: a negative start would read
         * before the list's items (process_batch's starts are never negative) */
        if (start < 0) {
            PyErr_SetString(PyExc_IndexError, "an input's events start before raws");
            goto fail;
        }
        if (end < start || end - start >= 65536) { /* that order: end - start can't overflow */
            PyErr_SetString(PyExc_AssertionError, "an input's events number 65,536 or more");
            goto fail;
        }
        /* as_ssize may have run Python code (a start's __index__) that shortened positions */
        if (i >= PyList_GET_SIZE(positions)) {
            PyErr_SetString(PyExc_IndexError, "list index out of range");
            goto fail;
        }
        position = PyList_GET_ITEM(positions, i);
        Py_INCREF(position);
        long long pos = PyLong_AsLongLong(position);
        if ((pos == -1 && PyErr_Occurred()) || buf_reserve(&b, 32 + 10) < 0)
            goto fail;
        /* chain + blob in one buffer: the blob is hashed after the chain (every chain is
         * 32 bytes: the one given, checked above, then digests) */
        memcpy(b.p, PyBytes_AS_STRING(chain), 32);
        put_le(b.p + 32, (uint64_t)pos, 8);
        put_le(b.p + 40, (uint64_t)(end - start), 2);
        b.len = 42;
        for (Py_ssize_t j = start; j < end; j++) {
            if (j >= PyList_GET_SIZE(raws)) {
                PyErr_SetString(PyExc_IndexError, "list index out of range");
                goto fail;
            }
            PyObject *r = PyList_GET_ITEM(raws, j);
            Py_INCREF(r);
            int rc = frame_fast(&b, r, kinds);
            if (rc == 0)
                rc = frame_slow(&b, r, framed);
            Py_DECREF(r);
            if (rc < 0)
                goto fail;
        }
        unsigned char md[32];
        unsigned int md_len = 0;
        if (!EVP_DigestInit_ex(sha_ctx, sha256_md, NULL)
                || !EVP_DigestUpdate(sha_ctx, b.p, (size_t)b.len)
                || !EVP_DigestFinal_ex(sha_ctx, md, &md_len) || md_len != 32) {
            PyErr_SetString(PyExc_RuntimeError, "OpenSSL's SHA-256 failed");
            goto fail;
        }
        PyObject *next = PyBytes_FromStringAndSize((const char *)md, 32);
        if (next == NULL)
            goto fail;
        PyObject *blob = PyBytes_FromStringAndSize(b.p + 32, b.len - 32);
        PyObject *p = blob == NULL ? NULL : cls->tp_alloc(cls, 3);
        if (p == NULL) {
            Py_XDECREF(blob);
            Py_DECREF(next);
            goto fail;
        }
        PyTuple_SET_ITEM(p, 0, position); /* the references move into p */
        position = NULL;
        PyTuple_SET_ITEM(p, 1, blob);
        Py_INCREF(next);
        PyTuple_SET_ITEM(p, 2, next);
        Py_SETREF(chain, next);
        PyObject *res = PyObject_CallOneArg(emit, p);
        Py_DECREF(p);
        if (res == NULL)
            goto fail;
        Py_DECREF(res);
    }
    PyMem_Free(b.p);
    return chain;
fail:
    PyMem_Free(b.p);
    Py_XDECREF(position);
    Py_DECREF(chain);
    return NULL;
}

/* ---- inputs: take_inputs --------------------------------------------------------------
 *
 * take_inputs(records, i, input_stream, last, control_types, plans, slow, interned,
 * intern, pairs, intern_pair) -> (positions, commands, i): the consumer's input loop
 * (engine.consumer.Consumer.on_records), for records[i:] (a list of records with the
 * attributes stream, position, type, data, timestamp_ns: pb.RecordedEvent). It takes the
 * records of `input_stream` in order, skips those at or before `last` (already
 * processed), and decodes each other one that is not of a type in `control_types` into
 * a command, with its timestamp as the command's time; it stops at the first record that
 * is of another stream or a control (returning its index) or at the end.
 *
 * A command is decoded here when its bytes are well formed for its tag's plan:
 * plans[tag] = (cls, kinds, pair), kinds one byte per field after ts_ns (b"q" int64,
 * b"b" bool byte 0 or 1, b"s" str, b"n" str interned through interned/intern, keyed by
 * its bytes), pair: the first two fields (symbol and account) are interned as one, through
 * pairs/intern_pair keyed by their bytes with both length bytes. That is
 * engine.codec._compile_fast_decoder's well-formed case. Anything else (no plan for the
 * tag, a wrong length, a bool byte over 1, a non-ASCII string, data not bytes) is
 * slow(data, ts_ns): the Python decoder, which decodes it or gives None for what is not a
 * command. So both take the same bytes to the same command (tests/test_consumer.py).
 */

static PyObject *s_stream, *s_position, *s_type, *s_data, *s_timestamp_ns;

static uint64_t
get_le(const unsigned char *p, int size)
{
    uint64_t v = 0;
    for (int i = size - 1; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static int
all_ascii(const unsigned char *p, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++)
        if (p[i] & 0x80)
            return 0;
    return 1;
}

/* cache[key] or intern(key) for bytes p[0..n): a new reference; NULL without an error
 * when intern refuses it (UnicodeDecodeError: not ASCII), NULL with one on an error. */
static PyObject *
interned_get(const unsigned char *p, Py_ssize_t n, PyObject *cache, PyObject *intern)
{
    PyObject *key = PyBytes_FromStringAndSize((const char *)p, n);
    if (key == NULL)
        return NULL;
    PyObject *v = PyDict_GetItemWithError(cache, key);
    if (v != NULL) {
        Py_INCREF(v);
    } else if (!PyErr_Occurred()) {
        v = PyObject_CallOneArg(intern, key);
        if (v == NULL && PyErr_ExceptionMatches(PyExc_UnicodeDecodeError))
            PyErr_Clear();
    }
    Py_DECREF(key);
    return v;
}

/* The command of well-formed bytes for `plan`, or NULL: with an error set on an error,
 * without one when the bytes are not taken as they are (the caller's slow path). */
static PyObject *
decode_plan(const unsigned char *p, Py_ssize_t n, PyObject *ts, PyObject *plan,
            PyObject *const *ctx)
{
    if (!PyTuple_Check(plan) || PyTuple_GET_SIZE(plan) != 3
            || !PyBytes_Check(PyTuple_GET_ITEM(plan, 1)) || !PyType_Check(PyTuple_GET_ITEM(plan, 0)))
        return NULL;
    PyTypeObject *cls = (PyTypeObject *)PyTuple_GET_ITEM(plan, 0);
    const char *kinds = PyBytes_AS_STRING(PyTuple_GET_ITEM(plan, 1));
    Py_ssize_t nf = PyBytes_GET_SIZE(PyTuple_GET_ITEM(plan, 1));
    int pair = PyObject_IsTrue(PyTuple_GET_ITEM(plan, 2));
    if (pair < 0)
        return NULL;
    if (pair && (nf < 2 || kinds[0] != 'n' || kinds[1] != 'n'))
        return NULL;
    /* the length first: every string's length byte followed, the whole exact */
    Py_ssize_t off = 9, pair_end = 0;
    for (Py_ssize_t f = 0; f < nf; f++) {
        switch (kinds[f]) {
        case 'q': off += 8; break;
        case 'b': off += 1; break;
        case 's': case 'n':
            if (off >= n)
                return NULL;
            off += 1 + p[off];
            break;
        default:
            return NULL;
        }
        if (f == 1)
            pair_end = off;
    }
    if (n < 9 || off != n)
        return NULL;
    PyObject *cmd = cls->tp_alloc(cls, nf + 1);
    if (cmd == NULL)
        return NULL;
    if (ts == Py_None)
        ts = PyLong_FromLongLong((long long)get_le(p + 1, 8));
    else
        Py_INCREF(ts);
    if (ts == NULL)
        goto fail;
    PyTuple_SET_ITEM(cmd, 0, ts);
    off = 9;
    Py_ssize_t f = 0;
    if (pair) {
        PyObject *two = interned_get(p + 9, pair_end - 9, ctx[2], ctx[3]);
        if (two == NULL)
            goto fail;
        if (!PyTuple_Check(two) || PyTuple_GET_SIZE(two) != 2) {
            Py_DECREF(two);
            PyErr_SetString(PyExc_TypeError, "an interned pair is a tuple of two");
            goto fail;
        }
        for (int k = 0; k < 2; k++) {
            Py_INCREF(PyTuple_GET_ITEM(two, k));
            PyTuple_SET_ITEM(cmd, 1 + k, PyTuple_GET_ITEM(two, k));
        }
        Py_DECREF(two);
        off = pair_end;
        f = 2;
    }
    for (; f < nf; f++) {
        PyObject *v;
        switch (kinds[f]) {
        case 'q':
            v = PyLong_FromLongLong((long long)get_le(p + off, 8));
            off += 8;
            break;
        case 'b':
            if (p[off] > 1)
                goto not_taken;
            v = p[off] ? Py_True : Py_False;
            Py_INCREF(v);
            off += 1;
            break;
        case 'n':
            v = interned_get(p + off + 1, p[off], ctx[0], ctx[1]);
            if (v == NULL)
                goto fail;
            off += 1 + p[off];
            break;
        default: /* 's' */
            if (!all_ascii(p + off + 1, p[off]))
                goto not_taken;
            v = PyUnicode_New(p[off], 127);
            if (v != NULL)
                memcpy(PyUnicode_1BYTE_DATA(v), p + off + 1, p[off]);
            off += 1 + p[off];
        }
        if (v == NULL)
            goto fail;
        PyTuple_SET_ITEM(cmd, f + 1, v);
    }
    return cmd;
not_taken:
fail:
    Py_DECREF(cmd);
    return NULL;
}

/* The command of a record's data p[0..n): decode_plan, else slow(data, ts), `data` the
 * bytes object holding them, or NULL (made only for the slow path). */
static PyObject *
decode_input(const unsigned char *p, Py_ssize_t n, PyObject *data, PyObject *ts,
             PyObject *plans, PyObject *slow, PyObject *const *ctx)
{
    if (n > 0 && p[0] < PyTuple_GET_SIZE(plans)) {
        PyObject *cmd = decode_plan(p, n, ts, PyTuple_GET_ITEM(plans, p[0]), ctx);
        if (cmd != NULL || PyErr_Occurred())
            return cmd;
    }
    if (data != NULL)
        return PyObject_CallFunctionObjArgs(slow, data, ts, NULL);
    data = PyBytes_FromStringAndSize((const char *)p, n);
    if (data == NULL)
        return NULL;
    PyObject *cmd = PyObject_CallFunctionObjArgs(slow, data, ts, NULL);
    Py_DECREF(data);
    return cmd;
}

/* Appends `position` and `cmd` to the run taken so far: 0, or -1 on an error. Both
 * references are released either way. */
static int
taken(PyObject *positions, PyObject *cmds, PyObject *position, PyObject *cmd)
{
    int rc = (position == NULL || cmd == NULL || PyList_Append(positions, position) < 0
              || PyList_Append(cmds, cmd) < 0) ? -1 : 0;
    Py_XDECREF(position);
    Py_XDECREF(cmd);
    return rc;
}

PyDoc_STRVAR(take_inputs_doc,
"take_inputs(records, i, input_stream, last, control_types, plans, slow, interned, intern,\n"
"pairs, intern_pair) -> (positions, commands, i): see the module's comment.");

static PyObject *
take_inputs(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 11) {
        PyErr_SetString(PyExc_TypeError, "take_inputs takes 11 arguments");
        return NULL;
    }
    PyObject *records = args[0], *input_stream = args[2], *control_types = args[4];
    PyObject *plans = args[5], *slow = args[6];
    PyObject *const *ctx = args + 7;
    if (!PyList_Check(records) || !PyTuple_Check(plans) || !PyDict_Check(ctx[0])
            || !PyDict_Check(ctx[2])) {
        PyErr_SetString(PyExc_TypeError, "take_inputs: records is a list, plans a tuple, the "
                                         "caches dicts");
        return NULL;
    }
    Py_ssize_t i = PyNumber_AsSsize_t(args[1], PyExc_OverflowError);
    if (i == -1 && PyErr_Occurred())
        return NULL;
    long long last = PyLong_AsLongLong(args[3]);
    if (last == -1 && PyErr_Occurred())
        return NULL;
    PyObject *positions = PyList_New(0), *cmds = PyList_New(0);
    if (positions == NULL || cmds == NULL)
        goto fail;
    for (; i >= 0 && i < PyList_GET_SIZE(records); i++) {
        PyObject *e = PyList_GET_ITEM(records, i);
        Py_INCREF(e);
        PyObject *stream = PyObject_GetAttr(e, s_stream);
        int ours = stream == NULL ? -1 : PyObject_RichCompareBool(stream, input_stream, Py_EQ);
        Py_XDECREF(stream);
        if (ours <= 0) {
            Py_DECREF(e);
            if (ours < 0)
                goto fail;
            break;
        }
        PyObject *position = PyObject_GetAttr(e, s_position);
        long long pos = position == NULL ? -1 : PyLong_AsLongLong(position);
        if (pos == -1 && PyErr_Occurred()) {
            Py_XDECREF(position);
            Py_DECREF(e);
            goto fail;
        }
        if (pos <= last) {
            Py_DECREF(position);
            Py_DECREF(e);
            continue; /* already in the snapshot or already processed */
        }
        PyObject *kind = PyObject_GetAttr(e, s_type);
        int control = kind == NULL ? -1 : PySequence_Contains(control_types, kind);
        Py_XDECREF(kind);
        if (control != 0) {
            Py_DECREF(position);
            Py_DECREF(e);
            if (control < 0)
                goto fail;
            break;
        }
        PyObject *data = PyObject_GetAttr(e, s_data);
        PyObject *ts = data == NULL ? NULL : PyObject_GetAttr(e, s_timestamp_ns);
        PyObject *cmd = NULL;
        if (ts != NULL) {
            /* data that is not bytes goes to slow as it is */
            int b = PyBytes_Check(data);
            cmd = decode_input(b ? (const unsigned char *)PyBytes_AS_STRING(data) : NULL,
                               b ? PyBytes_GET_SIZE(data) : 0, data, ts, plans, slow, ctx);
        }
        Py_XDECREF(data);
        Py_XDECREF(ts);
        Py_DECREF(e);
        if (taken(positions, cmds, position, cmd) < 0)
            goto fail;
        last = pos;
    }
    return Py_BuildValue("(NNn)", positions, cmds, i);
fail:
    Py_XDECREF(positions);
    Py_XDECREF(cmds);
    return NULL;
}

/* ---- inputs from a RecordBatch's bytes: take_raw_inputs, record_frame ---------------
 *
 * take_raw_inputs(buf, off, input_stream, last, control_types, output_stream, output_type,
 * plans, slow, interned, intern, pairs, intern_pair) -> (positions, commands, outputs,
 * off): take_inputs for the records of a serialized RecordBatch (`buf`, bytes, from byte
 * `off`), read where they lie, without a protobuf object or attribute reads per record
 * (pb.RecordBatch's parse, the list of its events and take_inputs' reads cost ~0.6 us a
 * record more than this: ~970 against ~340 ns, decoding included). The group's committed
 * outputs met on the way (records of `output_stream` of type `output_type`) do not stop
 * it: each is (the last input position before it, its revision, its data) in `outputs`;
 * records of other streams, and other records of `output_stream`, are passed over (the
 * consumer has nothing to do with them). Streams and types are UTF-8 bytes,
 * `control_types` a tuple of them.
 *
 * Top-level fields other than the records (field 1) are skipped, as a protobuf parser
 * skips them (Subscribe's first and last positions, fields 2 and 3). A record is taken
 * here when it parses as protobuf parses it: fields in any order, the last of a repeated
 * singular field winning, unknown fields skipped, every string field (type,
 * content_type, stream, metadata keys and values) valid UTF-8. Any other record (a wire
 * type that is not a known field's, a group, a string that is not UTF-8, bytes cut
 * short, a tag or a length prefix over 5 bytes, a tag over UINT32_MAX) ends the run at
 * its offset, as a control does: the caller reads it with record_frame and protobuf
 * (which refuses what is not a record); record_frame raises ValueError where the batch
 * itself is not walked here (a top-level group, bytes that are not protobuf): the
 * caller parses the rest with protobuf.
 */

typedef struct {
    const unsigned char *stream, *type, *data;
    Py_ssize_t stream_n, type_n, data_n;
    uint64_t position, revision, timestamp;
} raw_record;

/* A varint at p[*off..n): 0 and the value, or -1 when cut short or over 10 bytes. */
static int
read_varint(const unsigned char *p, Py_ssize_t n, Py_ssize_t *off, uint64_t *v)
{
    uint64_t r = 0;
    for (int shift = 0; shift < 70; shift += 7) {
        if (*off >= n)
            return -1;
        unsigned char b = p[(*off)++];
        r |= (uint64_t)(b & 0x7f) << shift;
        if (b < 0x80) {
            *v = r;
            return 0;
        }
    }
    return -1;
}

/* A tag as protobuf (upb) reads one: 0, or -1 when cut short, over 5 bytes, over
 * UINT32_MAX or of field number 0. */
static int
read_tag(const unsigned char *p, Py_ssize_t n, Py_ssize_t *off, uint64_t *tag)
{
    Py_ssize_t at = *off;
    if (read_varint(p, n, off, tag) < 0 || *off - at > 5 || *tag > UINT32_MAX || *tag >> 3 == 0)
        return -1;
    return 0;
}

/* Past one field of wire type `wt` whose tag was read: 0, or -1 (a group, cut short, a
 * length over 5 bytes, which upb refuses). */
static int
skip_field(const unsigned char *p, Py_ssize_t n, Py_ssize_t *off, int wt,
           const unsigned char **body, Py_ssize_t *body_n)
{
    uint64_t v;
    switch (wt) {
    case 0:
        return read_varint(p, n, off, &v);
    case 1:
        if (n - *off < 8)
            return -1;
        *off += 8;
        return 0;
    case 5:
        if (n - *off < 4)
            return -1;
        *off += 4;
        return 0;
    case 2: {
        Py_ssize_t at = *off;
        if (read_varint(p, n, off, &v) < 0 || *off - at > 5 || v > (uint64_t)(n - *off))
            return -1;
        if (body != NULL) {
            *body = p + *off;
            *body_n = (Py_ssize_t)v;
        }
        *off += (Py_ssize_t)v;
        return 0;
    }
    default:
        return -1;
    }
}

/* 1 when p[0..n) is valid UTF-8 as protobuf checks a string field, else 0. */
static int
utf8_ok(const unsigned char *p, Py_ssize_t n)
{
    if (all_ascii(p, n))
        return 1;
    PyObject *s = PyUnicode_DecodeUTF8((const char *)p, n, "strict");
    if (s == NULL) {
        PyErr_Clear();
        return 0;
    }
    Py_DECREF(s);
    return 1;
}

/* A map<string, string> entry's bytes: 1 when every string in it is valid UTF-8. */
static int
map_entry_ok(const unsigned char *p, Py_ssize_t n)
{
    Py_ssize_t off = 0;
    while (off < n) {
        uint64_t tag;
        const unsigned char *b = NULL;
        Py_ssize_t bn = 0;
        if (read_tag(p, n, &off, &tag) < 0)
            return 0;
        int field = (int)(tag >> 3 > 3 ? 3 : tag >> 3), wt = (int)(tag & 7);
        if ((field == 1 || field == 2) && wt != 2)
            return 0;
        if (skip_field(p, n, &off, wt, &b, &bn) < 0)
            return 0;
        if ((field == 1 || field == 2) && !utf8_ok(b, bn))
            return 0;
    }
    return 1;
}

/* A RecordedEvent's bytes: 1 with *r filled when this code takes it, else 0. */
static int
parse_record(const unsigned char *p, Py_ssize_t n, raw_record *r)
{
    memset(r, 0, sizeof(*r));
    r->stream = r->type = r->data = p;
    Py_ssize_t off = 0;
    while (off < n) {
        uint64_t tag;
        if (read_tag(p, n, &off, &tag) < 0)
            return 0;
        uint64_t field = tag >> 3;
        int wt = (int)(tag & 7);
        if (field >= 1 && field <= 6) {
            const unsigned char *b;
            Py_ssize_t bn;
            if (wt != 2 || skip_field(p, n, &off, 2, &b, &bn) < 0)
                return 0;
            switch (field) {
            case 2:
                if (!utf8_ok(b, bn))
                    return 0;
                r->type = b, r->type_n = bn;
                break;
            case 3:
                if (!utf8_ok(b, bn))
                    return 0;
                break;
            case 4:
                if (!map_entry_ok(b, bn))
                    return 0;
                break;
            case 5:
                r->data = b, r->data_n = bn;
                break;
            case 6:
                if (!utf8_ok(b, bn))
                    return 0;
                r->stream = b, r->stream_n = bn;
                break;
            default: /* 1: the id, bytes */
                break;
            }
        } else if (field >= 7 && field <= 10) {
            if (wt != 1 || n - off < 8)
                return 0;
            uint64_t v = get_le(p + off, 8);
            off += 8;
            if (field == 7)
                r->revision = v;
            else if (field == 8)
                r->position = v;
            else if (field == 10)
                r->timestamp = v;
        } else if (skip_field(p, n, &off, wt, NULL, NULL) < 0) {
            return 0;
        }
    }
    return 1;
}

/* The next record frame of a RecordBatch at or after *off (other top-level fields are
 * skipped): 1 with its body, 0 at the end, -1 (*off at the field) for bytes this code
 * does not walk: not a RecordBatch's, or a group (which protobuf skips). */
static int
next_frame(const unsigned char *p, Py_ssize_t n, Py_ssize_t *off,
           const unsigned char **body, Py_ssize_t *body_n)
{
    while (*off < n) {
        Py_ssize_t at = *off;
        uint64_t tag;
        if (read_tag(p, n, off, &tag) < 0) {
            *off = at;
            return -1;
        }
        if (tag == 0x0a) {
            if (skip_field(p, n, off, 2, body, body_n) < 0) {
                *off = at;
                return -1;
            }
            return 1;
        }
        if (skip_field(p, n, off, (int)(tag & 7), NULL, NULL) < 0) {
            *off = at;
            return -1;
        }
    }
    return 0;
}

static int
in_types(const unsigned char *p, Py_ssize_t n, PyObject *types)
{
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(types); k++) {
        PyObject *t = PyTuple_GET_ITEM(types, k);
        if (PyBytes_GET_SIZE(t) == n && memcmp(PyBytes_AS_STRING(t), p, n) == 0)
            return 1;
    }
    return 0;
}

PyDoc_STRVAR(take_raw_inputs_doc,
"take_raw_inputs(buf, off, input_stream, last, control_types, output_stream, output_type,\n"
"plans, slow, interned, intern, pairs, intern_pair) -> (positions, commands, outputs, off):\n"
"see the module's comment.");

static PyObject *
take_raw_inputs(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 13) {
        PyErr_SetString(PyExc_TypeError, "take_raw_inputs takes 13 arguments");
        return NULL;
    }
    PyObject *buf = args[0], *input_stream = args[2], *control_types = args[4];
    PyObject *output_stream = args[5], *output_type = args[6];
    PyObject *plans = args[7], *slow = args[8];
    PyObject *const *ctx = args + 9;
    if (!PyBytes_Check(buf) || !PyBytes_Check(input_stream) || !PyTuple_Check(control_types)
            || !PyBytes_Check(output_stream) || !PyBytes_Check(output_type)
            || !PyTuple_Check(plans) || !PyDict_Check(ctx[0]) || !PyDict_Check(ctx[2])) {
        PyErr_SetString(PyExc_TypeError, "take_raw_inputs: buf, streams and output type are "
                                         "bytes, control_types and plans tuples, the caches "
                                         "dicts");
        return NULL;
    }
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(control_types); k++)
        if (!PyBytes_Check(PyTuple_GET_ITEM(control_types, k))) {
            PyErr_SetString(PyExc_TypeError, "take_raw_inputs: control types are bytes");
            return NULL;
        }
    Py_ssize_t off = PyNumber_AsSsize_t(args[1], PyExc_OverflowError);
    if (off == -1 && PyErr_Occurred())
        return NULL;
    long long last = PyLong_AsLongLong(args[3]);
    if (last == -1 && PyErr_Occurred())
        return NULL;
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(buf);
    Py_ssize_t n = PyBytes_GET_SIZE(buf);
    if (off < 0 || off > n) {
        PyErr_SetString(PyExc_IndexError, "take_raw_inputs: off outside buf");
        return NULL;
    }
    const unsigned char *want = (const unsigned char *)PyBytes_AS_STRING(input_stream);
    Py_ssize_t want_n = PyBytes_GET_SIZE(input_stream);
    const unsigned char *outs = (const unsigned char *)PyBytes_AS_STRING(output_stream);
    Py_ssize_t outs_n = PyBytes_GET_SIZE(output_stream);
    const unsigned char *out_type = (const unsigned char *)PyBytes_AS_STRING(output_type);
    Py_ssize_t out_type_n = PyBytes_GET_SIZE(output_type);
    PyObject *positions = PyList_New(0), *cmds = PyList_New(0), *outputs = PyList_New(0);
    if (positions == NULL || cmds == NULL || outputs == NULL)
        goto fail;
    while (off < n) {
        Py_ssize_t at = off;
        const unsigned char *body;
        Py_ssize_t body_n;
        raw_record r;
        int got = next_frame(p, n, &off, &body, &body_n);
        if (got <= 0) {  /* the end (after skipped fields), or not a frame: stop there */
            if (got < 0)
                off = at;
            break;
        }
        if (!parse_record(body, body_n, &r) || r.position > (uint64_t)LLONG_MAX) {
            off = at;
            break;
        }
        if (r.stream_n != want_n || memcmp(r.stream, want, want_n) != 0) {
            if (r.stream_n != outs_n || memcmp(r.stream, outs, outs_n) != 0
                    || r.type_n != out_type_n || memcmp(r.type, out_type, out_type_n) != 0)
                continue; /* nothing the consumer reads */
            PyObject *item = Py_BuildValue("(LKy#)", last, (unsigned long long)r.revision,
                                           (const char *)r.data, r.data_n);
            if (item == NULL || PyList_Append(outputs, item) < 0) {
                Py_XDECREF(item);
                goto fail;
            }
            Py_DECREF(item);
            continue;
        }
        if ((long long)r.position <= last)
            continue; /* already in the snapshot or already processed */
        if (in_types(r.type, r.type_n, control_types)) {
            off = at;
            break;
        }
        PyObject *position = PyLong_FromUnsignedLongLong(r.position);
        PyObject *ts = position == NULL ? NULL : PyLong_FromUnsignedLongLong(r.timestamp);
        PyObject *cmd = ts == NULL ? NULL
            : decode_input(r.data, r.data_n, NULL, ts, plans, slow, ctx);
        Py_XDECREF(ts);
        if (taken(positions, cmds, position, cmd) < 0)
            goto fail;
        last = (long long)r.position;
    }
    return Py_BuildValue("(NNNn)", positions, cmds, outputs, off);
fail:
    Py_XDECREF(positions);
    Py_XDECREF(cmds);
    Py_XDECREF(outputs);
    return NULL;
}

PyDoc_STRVAR(record_frame_doc,
"record_frame(buf, off) -> (start, end) | None: the bytes of the next record of a\n"
"RecordBatch at or after byte off (other fields skipped); None at the end; ValueError\n"
"for bytes there it does not walk (not a RecordBatch's, or a group).");

static PyObject *
record_frame(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "record_frame(buf: bytes, off: int)");
        return NULL;
    }
    Py_ssize_t off = PyNumber_AsSsize_t(args[1], PyExc_OverflowError);
    if (off == -1 && PyErr_Occurred())
        return NULL;
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    Py_ssize_t n = PyBytes_GET_SIZE(args[0]);
    if (off < 0 || off > n) {
        PyErr_SetString(PyExc_IndexError, "record_frame: off outside buf");
        return NULL;
    }
    const unsigned char *body;
    Py_ssize_t body_n;
    int got = next_frame(p, n, &off, &body, &body_n);
    if (got < 0) {
        PyErr_Format(PyExc_ValueError, "not a record batch at byte %zd", off);
        return NULL;
    }
    if (got == 0)
        Py_RETURN_NONE;
    return Py_BuildValue("(nn)", (Py_ssize_t)(body - p), (Py_ssize_t)(body - p) + body_n);
}

static PyMethodDef methods[] = {
    {"encode_orders", encode_orders, METH_VARARGS, encode_orders_doc},
    {"encode_chained", (PyCFunction)(void (*)(void))encode_chained, METH_FASTCALL,
     encode_chained_doc},
    {"take_inputs", (PyCFunction)(void (*)(void))take_inputs, METH_FASTCALL, take_inputs_doc},
    {"take_raw_inputs", (PyCFunction)(void (*)(void))take_raw_inputs, METH_FASTCALL,
     take_raw_inputs_doc},
    {"record_frame", (PyCFunction)(void (*)(void))record_frame, METH_FASTCALL,
     record_frame_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "engine._speedups",
    "The engine's per-order snapshot loop and per-input consumer loops in C.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
#if OPENSSL_VERSION_NUMBER >= 0x30000000L
    sha256_md = EVP_MD_fetch(NULL, "SHA256", NULL);
#else
    sha256_md = (EVP_MD *)EVP_sha256();
#endif
    sha_ctx = EVP_MD_CTX_new();
    if (sha256_md == NULL || sha_ctx == NULL) {
        PyErr_SetString(PyExc_ImportError, "OpenSSL's SHA-256 is not available");
        return NULL;
    }
    s_stream = PyUnicode_InternFromString("stream");
    s_position = PyUnicode_InternFromString("position");
    s_type = PyUnicode_InternFromString("type");
    s_data = PyUnicode_InternFromString("data");
    s_timestamp_ns = PyUnicode_InternFromString("timestamp_ns");
    if (s_stream == NULL || s_position == NULL || s_type == NULL
            || s_data == NULL || s_timestamp_ns == NULL)
        return NULL;
    return PyModule_Create(&module);
}
