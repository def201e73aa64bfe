/* The store's per-event loops in C: with them in Python, the event loop and the writer
 * thread held the GIL for ~3.5 us per event between them, and batched ingest was a
 * quarter of the raw LMDB ceiling. tests/test_speedups.py holds each function to its
 * Python definition.
 *
 * scan_append_stream: an AppendStream message's bytes -> its appends, ids and event
 * bodies, without building a protobuf object per event and serializing it again. It
 * takes only messages in the form that upb's serializer writes (fields in number order,
 * each once but the repeated ones, minimal varints, valid UTF-8) without event metadata
 * (the store keeps it with its entries in key order, which the serializer does not
 * promise) whose events pass the per-event checks; for anything else it answers None and the caller takes
 * the protobuf path, which parses and names what is wrong. So it never decides a
 * refusal of an event: it only recognises a message that the protobuf path would parse
 * with every event passing `prepare`'s checks, and returns what that path would. The
 * checks of an append as a whole (its stream name, expected kind and revision, total
 * size, repeated ids) are validation.prepare_scanned's, shared with `prepare`. The bytes
 * (immutable: a bytes object) are scanned with the GIL released.
 *
 * encode_run: records.encode_run, the writer's loop.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* ---- scanning ------------------------------------------------------------------------ */

/* A varint at p[*off..n): 0 and the value, or -1 when it is truncated, longer than ten
 * bytes, or not minimal (a trailing zero byte: not what a serializer writes). */
static int
read_varint(const unsigned char *p, Py_ssize_t n, Py_ssize_t *off, uint64_t *out)
{
    uint64_t v = 0;
    Py_ssize_t i = *off;
    for (int shift = 0; shift < 70; shift += 7) {
        if (i >= n)
            return -1;
        unsigned char b = p[i++];
        if (shift == 63 && b > 1)
            return -1;
        v |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            if (b == 0 && shift > 0)
                return -1;
            *off = i;
            *out = v;
            return 0;
        }
    }
    return -1;
}

/* A length-delimited field's value: its offset and length, within n. */
static int
read_len(const unsigned char *p, Py_ssize_t n, Py_ssize_t *off, Py_ssize_t *start,
         Py_ssize_t *len)
{
    uint64_t v;
    if (read_varint(p, n, off, &v) < 0 || v > (uint64_t)(n - *off))
        return -1;
    *start = *off;
    *len = (Py_ssize_t)v;
    *off += (Py_ssize_t)v;
    return 0;
}

/* Strict UTF-8 (no overlong forms, no surrogates, nothing above U+10FFFF): what upb
 * and Python's decoder accept. */
static int
utf8_valid(const unsigned char *s, Py_ssize_t n)
{
    Py_ssize_t i = 0;
    while (i < n) {
        unsigned char c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        if (c >= 0xc2 && c <= 0xdf) {
            if (i + 1 >= n || (s[i + 1] & 0xc0) != 0x80)
                return 0;
            i += 2;
        }
        else if (c >= 0xe0 && c <= 0xef) {
            if (i + 2 >= n || (s[i + 1] & 0xc0) != 0x80 || (s[i + 2] & 0xc0) != 0x80)
                return 0;
            if (c == 0xe0 && s[i + 1] < 0xa0)
                return 0; /* overlong */
            if (c == 0xed && s[i + 1] >= 0xa0)
                return 0; /* surrogate */
            i += 3;
        }
        else if (c >= 0xf0 && c <= 0xf4) {
            if (i + 3 >= n || (s[i + 1] & 0xc0) != 0x80 || (s[i + 2] & 0xc0) != 0x80
                    || (s[i + 3] & 0xc0) != 0x80)
                return 0;
            if (c == 0xf0 && s[i + 1] < 0x90)
                return 0; /* overlong */
            if (c == 0xf4 && s[i + 1] >= 0x90)
                return 0; /* above U+10FFFF */
            i += 4;
        }
        else
            return 0;
    }
    return 1;
}

typedef struct {
    Py_ssize_t off, len;      /* the serialized ProposedEvent */
    Py_ssize_t type_off, type_len;
} Event;

typedef struct {
    Py_ssize_t stream_off, stream_len;
    uint64_t expected, revision;
    Py_ssize_t first, count;  /* its events in the Event array */
    Py_ssize_t total;         /* summed event bytes */
} Append;

typedef struct {
    const unsigned char *p;
    Py_ssize_t n;
    Py_ssize_t max_event, max_type, max_events, max_appends;
    uint64_t correlation_id;
    Event *events;
    Py_ssize_t n_events, cap_events;
    Append *appends;
    Py_ssize_t n_appends, cap_appends;
    Py_ssize_t *trace;        /* trace_context entries: key offset, length, value ... */
    Py_ssize_t n_trace, cap_trace;
} Scan;

static const unsigned char NIL_ID[16];

/* One ProposedEvent at p[start..start+len): id (16 bytes, not nil), type (1..max_type
 * bytes of UTF-8), then optionally content_type (1..max_type), data (non-empty), each
 * once and in this order; no metadata. Returns 0 when it is one. */
static int
scan_event(Scan *s, Py_ssize_t start, Py_ssize_t len, Event *ev)
{
    const unsigned char *p = s->p;
    Py_ssize_t end = start + len, off = start, fs, fl;
    if (len > s->max_event)
        return -1;
    if (end - off < 18 || p[off] != 0x0a || p[off + 1] != 16)
        return -1;
    if (memcmp(p + off + 2, NIL_ID, 16) == 0)
        return -1;
    off += 18;
    if (off >= end || p[off] != 0x12)
        return -1;
    off++;
    if (read_len(p, end, &off, &fs, &fl) < 0 || fl == 0 || fl > s->max_type
            || !utf8_valid(p + fs, fl))
        return -1;
    ev->type_off = fs;
    ev->type_len = fl;
    if (off < end && p[off] == 0x1a) {
        off++;
        if (read_len(p, end, &off, &fs, &fl) < 0 || fl == 0 || fl > s->max_type
                || !utf8_valid(p + fs, fl))
            return -1;
    }
    if (off < end && p[off] == 0x2a) {
        off++;
        if (read_len(p, end, &off, &fs, &fl) < 0 || fl == 0)
            return -1;
    }
    if (off != end)
        return -1; /* metadata, an unknown field, a repeat or another order */
    ev->off = start;
    ev->len = len;
    return 0;
}

/* Room for one more of `n` items of `size` bytes in *buf (capacity *cap). A failed
 * allocation makes the scan give up: the protobuf path then has the message. */
static int
reserve(void **buf, Py_ssize_t *cap, Py_ssize_t n, size_t size)
{
    if (n < *cap)
        return 0;
    Py_ssize_t more = *cap ? *cap * 2 : 64;
    void *grown = realloc(*buf, (size_t)more * size);
    if (grown == NULL)
        return -1;
    *buf = grown;
    *cap = more;
    return 0;
}

/* One AppendRequest: stream (non-empty), expected and expected_revision when set, then
 * 1..max_events events. */
static int
scan_append(Scan *s, Py_ssize_t start, Py_ssize_t len)
{
    const unsigned char *p = s->p;
    Py_ssize_t end = start + len, off = start;
    Append a = {0};
    if (off >= end || p[off] != 0x0a)
        return -1;
    off++;
    if (read_len(p, end, &off, &a.stream_off, &a.stream_len) < 0 || a.stream_len == 0)
        return -1;
    if (off < end && p[off] == 0x10) {
        off++;
        if (read_varint(p, end, &off, &a.expected) < 0 || a.expected == 0
                || a.expected > 0x7fffffff)
            return -1;
    }
    if (off < end && p[off] == 0x18) {
        off++;
        if (read_varint(p, end, &off, &a.revision) < 0 || a.revision == 0)
            return -1;
    }
    a.first = s->n_events;
    while (off < end) {
        Py_ssize_t fs, fl;
        Event *ev;
        if (p[off] != 0x22)
            return -1;
        off++;
        if (read_len(p, end, &off, &fs, &fl) < 0)
            return -1;
        if (++a.count > s->max_events)
            return -1;
        if (reserve((void **)&s->events, &s->cap_events, s->n_events, sizeof(Event)) < 0)
            return -1;
        ev = &s->events[s->n_events++];
        if (scan_event(s, fs, fl, ev) < 0)
            return -1;
        a.total += fl;
    }
    if (a.count == 0)
        return -1;
    if (reserve((void **)&s->appends, &s->cap_appends, s->n_appends, sizeof(Append)) < 0)
        return -1;
    s->appends[s->n_appends++] = a;
    return 0;
}

/* One trace_context entry at p[start..start+len), as a serializer writes a map entry:
 * its key, then its value, both present (empty or not) and UTF-8. */
static int
scan_trace_entry(Scan *s, Py_ssize_t start, Py_ssize_t len)
{
    const unsigned char *p = s->p;
    Py_ssize_t end = start + len, off = start, ks, kl, vs, vl;
    if (off >= end || p[off++] != 0x0a || read_len(p, end, &off, &ks, &kl) < 0
            || !utf8_valid(p + ks, kl))
        return -1;
    if (off >= end || p[off++] != 0x12 || read_len(p, end, &off, &vs, &vl) < 0
            || !utf8_valid(p + vs, vl) || off != end)
        return -1;
    if (reserve((void **)&s->trace, &s->cap_trace, s->n_trace + 3, sizeof(Py_ssize_t)) < 0)
        return -1;
    s->trace[s->n_trace++] = ks;
    s->trace[s->n_trace++] = kl;
    s->trace[s->n_trace++] = vs;
    s->trace[s->n_trace++] = vl;
    return 0;
}

/* The AppendStreamRequest: correlation_id when set, up to max_appends appends, then its
 * trace_context entries. */
static int
scan_message(Scan *s)
{
    const unsigned char *p = s->p;
    Py_ssize_t n = s->n, off = 0, fs, fl;
    if (off < n && p[off] == 0x08) {
        off++;
        if (read_varint(p, n, &off, &s->correlation_id) < 0 || s->correlation_id == 0)
            return -1;
    }
    while (off < n && p[off] == 0x12) {
        off++;
        if (read_len(p, n, &off, &fs, &fl) < 0)
            return -1;
        if (s->n_appends >= s->max_appends)
            return -1;
        if (scan_append(s, fs, fl) < 0)
            return -1;
    }
    while (off < n && p[off] == 0x1a) {
        off++;
        if (read_len(p, n, &off, &fs, &fl) < 0 || scan_trace_entry(s, fs, fl) < 0)
            return -1;
    }
    return off == n ? 0 : -1;
}

static PyObject *
build(Scan *s)
{
    const char *p = (const char *)s->p;
    PyObject *appends = PyList_New(s->n_appends);
    if (appends == NULL)
        return NULL;
    for (Py_ssize_t a = 0; a < s->n_appends; a++) {
        Append *ap = &s->appends[a];
        PyObject *stream = PyUnicode_DecodeUTF8(p + ap->stream_off, ap->stream_len, NULL);
        if (stream == NULL) {
            /* Not UTF-8: the protobuf path refuses the message. */
            Py_DECREF(appends);
            if (PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
                PyErr_Clear();
                Py_RETURN_NONE;
            }
            return NULL;
        }
        PyObject *ids = PyList_New(ap->count), *bodies = PyList_New(ap->count);
        PyObject *types = PySet_New(NULL);
        PyObject *item = NULL;
        if (ids == NULL || bodies == NULL || types == NULL)
            goto fail;
        Event *prev = NULL;
        for (Py_ssize_t i = 0; i < ap->count; i++) {
            Event *ev = &s->events[ap->first + i];
            PyObject *id = PyBytes_FromStringAndSize(p + ev->off + 2, 16);
            PyObject *body = PyBytes_FromStringAndSize(p + ev->off, ev->len);
            if (id == NULL || body == NULL) {
                Py_XDECREF(id);
                Py_XDECREF(body);
                goto fail;
            }
            PyList_SET_ITEM(ids, i, id);
            PyList_SET_ITEM(bodies, i, body);
            /* Events of one append nearly always share their type: a str per change. */
            if (prev == NULL || prev->type_len != ev->type_len
                    || memcmp(p + prev->type_off, p + ev->type_off, ev->type_len) != 0) {
                PyObject *t = PyUnicode_DecodeUTF8(p + ev->type_off, ev->type_len, NULL);
                if (t == NULL || PySet_Add(types, t) < 0) {
                    Py_XDECREF(t);
                    goto fail;
                }
                Py_DECREF(t);
            }
            prev = ev;
        }
        item = Py_BuildValue("(NKKNNnN)", stream, (unsigned long long)ap->expected,
                             (unsigned long long)ap->revision, ids, bodies, ap->total,
                             types);
        if (item == NULL) {
            /* Py_BuildValue's N steals references even when it fails. */
            Py_DECREF(appends);
            return NULL;
        }
        PyList_SET_ITEM(appends, a, item);
        continue;
fail:
        Py_DECREF(stream);
        Py_XDECREF(ids);
        Py_XDECREF(bodies);
        Py_XDECREF(types);
        Py_DECREF(appends);
        return NULL;
    }
    /* Entries in order, a later one replacing an earlier one with its key: as protobuf. */
    PyObject *trace = PyDict_New();
    if (trace == NULL) {
        Py_DECREF(appends);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < s->n_trace; i += 4) {
        PyObject *k = PyUnicode_DecodeUTF8(p + s->trace[i], s->trace[i + 1], NULL);
        PyObject *v = k ? PyUnicode_DecodeUTF8(p + s->trace[i + 2], s->trace[i + 3], NULL)
                        : NULL;
        int rc = v ? PyDict_SetItem(trace, k, v) : -1;
        Py_XDECREF(k);
        Py_XDECREF(v);
        if (rc < 0) {
            Py_DECREF(appends);
            Py_DECREF(trace);
            return NULL;
        }
    }
    return Py_BuildValue("(KNN)", (unsigned long long)s->correlation_id, appends, trace);
}

PyDoc_STRVAR(scan_append_stream_doc,
"scan_append_stream(data, max_event_bytes, max_type_bytes, max_append_events,\n"
"                   max_appends_per_message)\n"
"-> (correlation_id, [(stream, expected, expected_revision, ids, bodies, total,\n"
"                      types), ...], trace_context) or None");

static PyObject *
scan_append_stream(PyObject *self, PyObject *args)
{
    PyObject *data;
    Scan s = {0};
    int rc;
    if (!PyArg_ParseTuple(args, "Snnnn", &data, &s.max_event, &s.max_type, &s.max_events,
                          &s.max_appends))
        return NULL;
    s.p = (const unsigned char *)PyBytes_AS_STRING(data);
    s.n = PyBytes_GET_SIZE(data);
    Py_BEGIN_ALLOW_THREADS
    rc = scan_message(&s);
    Py_END_ALLOW_THREADS
    PyObject *out;
    if (rc < 0) {
        out = Py_None;
        Py_INCREF(out);
    }
    else
        out = build(&s);
    free(s.events);
    free(s.appends);
    free(s.trace);
    return out;
}

/* ---- records ------------------------------------------------------------------------- */

#define HEADER_SIZE 36

static unsigned char *
put_varint(unsigned char *o, uint64_t v)
{
    while (v >= 0x80) {
        *o++ = (unsigned char)((v & 0x7f) | 0x80);
        v >>= 7;
    }
    *o++ = (unsigned char)v;
    return o;
}

static unsigned char *
put_fixed(unsigned char *o, unsigned char tag, uint64_t v)
{
    *o++ = tag;
    for (int i = 0; i < 8; i++) {
        *o++ = (unsigned char)(v & 0xff);
        v >>= 8;
    }
    return o;
}

/* An "O&" converter: an int in 0..2**64-1, else OverflowError (not wrapped, as "K"). */
static int
as_u64(PyObject *obj, void *out)
{
    unsigned long long v = PyLong_AsUnsignedLongLong(obj);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return 0;
    *(unsigned long long *)out = v;
    return 1;
}

PyDoc_STRVAR(encode_run_doc,
"encode_run(position, term, revision, timestamp_ns, stream_fld, bodies) -> list[bytes]");

static PyObject *
encode_run(PyObject *self, PyObject *args)
{
    unsigned long long position, term, revision, timestamp;
    Py_buffer fld;
    PyObject *bodies;
    if (!PyArg_ParseTuple(args, "O&O&O&O&y*O", as_u64, &position, as_u64, &term, as_u64,
                          &revision, as_u64, &timestamp, &fld, &bodies))
        return NULL;
    PyObject *seq = PySequence_Fast(bodies, "bodies must be a sequence");
    if (seq == NULL) {
        PyBuffer_Release(&fld);
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject *out = NULL;
    if (n > 0 && (position > UINT64_MAX - (uint64_t)(n - 1)
                  || revision > UINT64_MAX - (uint64_t)(n - 1))) {
        PyErr_SetString(PyExc_OverflowError, "position or revision past 2**64 - 1");
        goto done;
    }
    out = PyList_New(n);
    if (out == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *body = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyBytes_Check(body)) {
            PyErr_SetString(PyExc_TypeError, "bodies must be bytes");
            Py_CLEAR(out);
            goto done;
        }
        Py_ssize_t blen = PyBytes_GET_SIZE(body);
        uint64_t length = (uint64_t)(HEADER_SIZE + fld.len + blen);
        unsigned char head[10 + 1];
        unsigned char *h = head;
        *h++ = 0x0a; /* RecordBatch field 1 */
        h = put_varint(h, length);
        Py_ssize_t hlen = h - head;
        PyObject *rec = PyBytes_FromStringAndSize(NULL, hlen + (Py_ssize_t)length);
        if (rec == NULL) {
            Py_CLEAR(out);
            goto done;
        }
        unsigned char *o = (unsigned char *)PyBytes_AS_STRING(rec);
        memcpy(o, head, (size_t)hlen);
        o += hlen;
        o = put_fixed(o, (8 << 3) | 1, position + (uint64_t)i);
        o = put_fixed(o, (9 << 3) | 1, term);
        o = put_fixed(o, (7 << 3) | 1, revision + (uint64_t)i);
        o = put_fixed(o, (10 << 3) | 1, timestamp);
        memcpy(o, fld.buf, (size_t)fld.len);
        o += fld.len;
        memcpy(o, PyBytes_AS_STRING(body), (size_t)blen);
        PyList_SET_ITEM(out, i, rec);
    }
done:
    Py_DECREF(seq);
    PyBuffer_Release(&fld);
    return out;
}

PyDoc_STRVAR(keyed_doc,
"keyed(first, values) -> items\n"
"The (key, value) pairs that put records at first, first + 1, ... in the log (keys:\n"
"8-byte big-endian positions).");

static PyObject *
keyed(PyObject *self, PyObject *args)
{
    unsigned long long first;
    PyObject *values;
    if (!PyArg_ParseTuple(args, "O&O!", as_u64, &first, &PyList_Type, &values))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(values);
    if (n > 0 && first > UINT64_MAX - (uint64_t)(n - 1)) {
        PyErr_SetString(PyExc_OverflowError, "position past 2**64 - 1");
        return NULL;
    }
    PyObject *items = PyList_New(n);
    if (items == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t pos = first + (uint64_t)i;
        PyObject *key = PyBytes_FromStringAndSize(NULL, 8);
        if (key == NULL)
            goto fail;
        unsigned char *k = (unsigned char *)PyBytes_AS_STRING(key);
        for (int b = 7; b >= 0; b--) {
            k[b] = (unsigned char)(pos & 0xff);
            pos >>= 8;
        }
        PyObject *pair = PyTuple_Pack(2, key, PyList_GET_ITEM(values, i));
        Py_DECREF(key);
        if (pair == NULL)
            goto fail;
        PyList_SET_ITEM(items, i, pair);
    }
    return items;
fail:
    Py_DECREF(items);
    return NULL;
}

static PyMethodDef methods[] = {
    {"scan_append_stream", scan_append_stream, METH_VARARGS, scan_append_stream_doc},
    {"encode_run", encode_run, METH_VARARGS, encode_run_doc},
    {"keyed", keyed, METH_VARARGS, keyed_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "store._speedups", NULL, -1, methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModule_Create(&module);
}
