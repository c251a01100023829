/* agent.core._http1fast: the compiled fast path of HTTP/1 request accounting.
 *
 * `Http1Fast` is an Observer (agent/core/accounting.py) for one HTTP/1 connection. While
 * every message head is of the narrow shape h1scan.h accepts, it accounts requests itself:
 * one C call per relayed chunk, message bodies skipped by Content-Length or walked through
 * their chunked framing without the data being looked at, a Record built only when a
 * response ends. At the first byte it does not accept (chunk extensions or trailers, an
 * Upgrade, HEAD, a 1xx, a head split across reads...) it hands
 * the connection, at that message boundary, to the llhttp-based Python observer:
 * `adopt(pending, request_state, response_state, ...)` (Http1Observer.adopt) builds
 * one in exactly the state the Python path would have reached, and every later call is
 * passed to it. So the Python observer remains the reference: the fast path only ever
 * handles messages both parse the same way (tests/unit/test_http1_fast.py checks it).
 * It also answers what the proxy asks of Http1Observer: `authority`, the first request's Host
 * as a label (h1_host_in looks in each chunk until a request head is complete, as
 * accounting.host_in does; both are passed to `adopt`), and `at_rest` (no request awaiting
 * its response: the fast path never holds a half-read head or held bytes).
 *
 * Memory per connection: this object plus 32 bytes per request awaiting its response, at
 * most max_pending of them (one more hands over, and the Python observer gives up there). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include "h1scan.h"

/* ------------------------------------------------------------------------ tally */

/* One HTTP series' counts as the fast path makes them (issue #16: counting without a Record
 * or a Python call per request). HttpCounters (agent/core/counters.py) holds one, made when
 * the first fast-path connection of the series is handed it, and adds it in at scrape time.
 * A response is counted under counters.response_code's int (status 100..599 -> 1..500,
 * another 501, none 0; no gRPC status on HTTP/1), the latency under counters.latency_bucket's
 * bucket (the first bound >= the latency). tests/unit/test_http1_tally.py checks both. */
#define TALLY_BUCKETS 26 /* 25 bounds and +Inf */
#define TALLY_INLINE 3   /* response kinds kept in the object; more go to a grown array */
static const double tally_bounds[TALLY_BUCKETS - 1] = {
    1, 2, 3, 4, 5, 10, 20, 30, 40, 50, 100, 200, 300, 400, 500,
    1000, 2000, 3000, 4000, 5000, 10000, 20000, 30000, 40000, 50000};

typedef struct {
    long long code, count;
} tally_code;

typedef struct {
    PyObject_HEAD
    long long requests, latency_count;
    double latency_sum;
    long long buckets[TALLY_BUCKETS];
    Py_ssize_t codes, capacity; /* response kinds seen, room in `responses` */
    tally_code *responses;      /* `inline_responses` until more kinds come */
    tally_code inline_responses[TALLY_INLINE];
} Tally;

static PyTypeObject TallyType;

static int tally_bucket(double latency_ms) {
    int low = 0, high = TALLY_BUCKETS - 1;
    while (low < high) {
        int middle = (low + high) / 2;
        if (tally_bounds[middle] < latency_ms)
            low = middle + 1;
        else
            high = middle;
    }
    return low;
}

static long long tally_response_code(int status, int failed) {
    long long status_index = status == 0 ? 0 : (status >= 100 && status <= 599) ? status - 99 : 501;
    return status_index * 19 * 2 + (failed ? 1 : 0); /* (status_index * 19 + no gRPC) * 2 + failed */
}

/* One finished request: status 0 = none; latency_ms < 0 = none. 0 ok, -1 error (memory). */
static int tally_count(Tally *tally, int status, int failed, double latency_ms) {
    long long code = tally_response_code(status, failed);
    Py_ssize_t i;
    for (i = 0; i < tally->codes; i++)
        if (tally->responses[i].code == code)
            break;
    if (i == tally->codes) {
        if (tally->codes == tally->capacity) {
            Py_ssize_t capacity = tally->capacity * 2;
            tally_code *grown = PyMem_New(tally_code, capacity);
            if (grown == NULL) {
                PyErr_NoMemory();
                return -1;
            }
            memcpy(grown, tally->responses, sizeof(tally_code) * (size_t)tally->codes);
            if (tally->responses != tally->inline_responses)
                PyMem_Free(tally->responses);
            tally->responses = grown, tally->capacity = capacity;
        }
        tally->responses[i].code = code, tally->responses[i].count = 0;
        tally->codes++;
    }
    tally->responses[i].count++;
    if (latency_ms >= 0) {
        tally->buckets[tally_bucket(latency_ms)]++;
        tally->latency_sum += latency_ms;
        tally->latency_count++;
    }
    return 0;
}

static PyObject *Tally_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    Tally *self;
    if (!_PyArg_NoPositional("Tally", args) || !_PyArg_NoKeywords("Tally", kwargs))
        return NULL;
    self = (Tally *)type->tp_alloc(type, 0);
    if (self != NULL)
        self->responses = self->inline_responses, self->capacity = TALLY_INLINE;
    return (PyObject *)self;
}

static void Tally_dealloc(Tally *self) {
    if (self->responses != self->inline_responses)
        PyMem_Free(self->responses);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* count(status, failed, latency_ms): what the fast path counts per finished request, for
 * the tests (status None = no response, latency None = none). */
static PyObject *Tally_count(Tally *self, PyObject *args) {
    PyObject *status_object, *latency_object;
    int failed, status = 0;
    double latency_ms = -1.0;
    if (!PyArg_ParseTuple(args, "OpO:count", &status_object, &failed, &latency_object))
        return NULL;
    if (status_object != Py_None) {
        long value = PyLong_AsLong(status_object);
        if (value == -1 && PyErr_Occurred())
            return NULL;
        if (value < 1 || value > 999) {
            PyErr_SetString(PyExc_ValueError, "status must be None or 1..999");
            return NULL;
        }
        status = (int)value;
    }
    if (latency_object != Py_None) {
        latency_ms = PyFloat_AsDouble(latency_object);
        if (latency_ms == -1.0 && PyErr_Occurred())
            return NULL;
        if (!(latency_ms >= 0)) {
            PyErr_SetString(PyExc_ValueError, "latency_ms must be None or >= 0");
            return NULL;
        }
    }
    if (tally_count(self, status, failed, latency_ms) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Tally_buckets(Tally *self, PyObject *Py_UNUSED(ignored)) {
    PyObject *out = PyList_New(TALLY_BUCKETS);
    int i;
    for (i = 0; out != NULL && i < TALLY_BUCKETS; i++) {
        PyObject *count = PyLong_FromLongLong(self->buckets[i]);
        if (count == NULL) {
            Py_CLEAR(out);
            break;
        }
        PyList_SET_ITEM(out, i, count);
    }
    return out;
}

static PyObject *Tally_responses(Tally *self, PyObject *Py_UNUSED(ignored)) {
    PyObject *out = PyDict_New();
    Py_ssize_t i;
    for (i = 0; out != NULL && i < self->codes; i++) {
        PyObject *code = PyLong_FromLongLong(self->responses[i].code);
        PyObject *count = PyLong_FromLongLong(self->responses[i].count);
        if (code == NULL || count == NULL || PyDict_SetItem(out, code, count) < 0)
            Py_CLEAR(out);
        Py_XDECREF(code);
        Py_XDECREF(count);
    }
    return out;
}

static PyMemberDef Tally_members[] = {
    {"requests", T_LONGLONG, offsetof(Tally, requests), READONLY, "requests started"},
    {"latency_count", T_LONGLONG, offsetof(Tally, latency_count), READONLY, "latencies counted"},
    {"latency_sum", T_DOUBLE, offsetof(Tally, latency_sum), READONLY, "their sum (ms)"},
    {NULL, 0, 0, 0, NULL},
};

static PyMethodDef Tally_methods[] = {
    {"count", (PyCFunction)Tally_count, METH_VARARGS,
     "count(status, failed, latency_ms): one finished request, as the fast path counts it"},
    {"buckets", (PyCFunction)Tally_buckets, METH_NOARGS,
     "Per-bucket latency counts, one per bound and the last for +Inf (a new list)"},
    {"responses", (PyCFunction)Tally_responses, METH_NOARGS,
     "Responses by counters.response_code (a new dict)"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject TallyType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "agent.core._http1fast.Tally",
    .tp_basicsize = sizeof(Tally),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One HTTP series' counts made by the fast path, added in at scrape time",
    .tp_new = Tally_new,
    .tp_dealloc = (destructor)Tally_dealloc,
    .tp_members = Tally_members,
    .tp_methods = Tally_methods,
};

/* ----------------------------------------------------------------------- observer */

typedef struct {
    double start;      /* request headers complete (the `now` of that chunk) */
    double latency_ms; /* to the response headers; < 0 until then */
    int method;
    int status; /* 0 until the response headers */
} pending_t;

typedef struct {
    PyObject_HEAD
    PyObject *delegate; /* the Python observer after a hand-over, else NULL */
    PyObject *adopt;    /* callable building it */
    PyObject *grpc_failures;
    PyObject *tap;      /* the pod's tap switch (agent.core.tap.TapSwitch) or None */
    pending_t *pending; /* a ring of `capacity` */
    Py_ssize_t head, count, capacity;
    Py_ssize_t max_pending, max_header_bytes;
    Py_ssize_t started;
    Py_ssize_t request_heads; /* request heads accepted; Host is looked for until one is */
    PyObject *authority;      /* the first request's Host label (str), NULL until found */
    int last_method;          /* of the last request head accepted, -1 before the first */
    h1_body request_body, response_body; /* the body being read in each direction */
    /* the last head in that direction ends the connection (HTTP/1.0, "Connection: close"):
     * llhttp takes nothing after its message (CR and LF aside); what comes is handed over */
    int request_closes, response_closes;
    int given_up; /* closed or abandoned before any hand-over: opaque, no more records */
    /* the series' tally once the relay hands it over (count_into): requests that start and
     * end on the fast path are counted there, not returned (no Record, no started count) */
    Tally *tally;
} Http1Fast;

static PyObject *record_type; /* agent.core.accounting.Record */
static PyObject *method_strings[H1_METHODS];
static PyObject *s_success, *s_failure, *s_reset, *s_closed, *s_empty;
static PyObject *n_classification, *n_status_code, *n_grpc_status, *n_latency_ms, *n_method,
    *n_error, *n_client_bytes, *n_server_bytes, *n_closed, *n_abandon, *n_take_started,
    *n_opaque, *n_authority, *n_at_rest, *n_detail, *n_on;

/* ------------------------------------------------------------------------ records */

static PyObject *make_record(const pending_t *pending, PyObject *error) {
    /* Record is a frozen slots dataclass: its generated __init__ goes through
     * object.__setattr__ for each field; setting the slots directly is what that does.
     * All seven: `detail` (a tap's) is None here, the fast path never runs while tapping. */
    PyObject *values[7], *names[7], *record;
    int i, failed = 0;
    PyTypeObject *type = (PyTypeObject *)record_type;
    values[0] = (error != NULL || pending->status >= 500) ? s_failure : s_success;
    Py_INCREF(values[0]);
    values[1] = pending->status ? PyLong_FromLong(pending->status) : Py_NewRef(Py_None);
    values[2] = Py_NewRef(Py_None);
    values[3] = pending->latency_ms >= 0 ? PyFloat_FromDouble(pending->latency_ms) : Py_NewRef(Py_None);
    values[4] = Py_NewRef(method_strings[pending->method]);
    values[5] = Py_NewRef(error != NULL ? error : Py_None);
    values[6] = Py_NewRef(Py_None);
    names[0] = n_classification, names[1] = n_status_code, names[2] = n_grpc_status;
    names[3] = n_latency_ms, names[4] = n_method, names[5] = n_error, names[6] = n_detail;
    record = type->tp_alloc(type, 0);
    for (i = 0; i < 7; i++) {
        if (values[i] == NULL)
            failed = 1;
        else if (record != NULL && !failed && PyObject_GenericSetAttr(record, names[i], values[i]) < 0)
            failed = 1;
        Py_XDECREF(values[i]);
    }
    if (record == NULL || failed) {
        Py_XDECREF(record);
        return NULL;
    }
    return record;
}

/* Append to *out (a list made on first use); 0 ok, -1 error. */
static int emit(PyObject **out, PyObject *record) {
    int rc;
    if (record == NULL)
        return -1;
    if (*out == NULL && (*out = PyList_New(0)) == NULL) {
        Py_DECREF(record);
        return -1;
    }
    rc = PyList_Append(*out, record);
    Py_DECREF(record);
    return rc;
}

static PyObject *finish(PyObject *out) { return out != NULL ? out : PyList_New(0); }

/* A request ended on the fast path: counted in the tally when there is one, else a Record
 * appended to *out. 0 ok, -1 error. */
static int end_request(Http1Fast *self, PyObject **out, const pending_t *pending, PyObject *error) {
    if (self->tally != NULL)
        return tally_count(self->tally, pending->status,
                           error != NULL || pending->status >= 500, pending->latency_ms);
    return emit(out, make_record(pending, error));
}

/* ------------------------------------------------------------------ pending ring */

static pending_t *first(Http1Fast *self) { return &self->pending[self->head]; }

static void pop_first(Http1Fast *self) {
    self->head = (self->head + 1) % self->capacity;
    self->count--;
}

static int push(Http1Fast *self, int method, double now) {
    pending_t *slot;
    if (self->count == self->capacity) {
        Py_ssize_t capacity = self->capacity * 2, i;
        pending_t *grown = PyMem_New(pending_t, capacity);
        if (grown == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        for (i = 0; i < self->count; i++)
            grown[i] = self->pending[(self->head + i) % self->capacity];
        PyMem_Free(self->pending);
        self->pending = grown, self->head = 0, self->capacity = capacity;
    }
    slot = &self->pending[(self->head + self->count) % self->capacity];
    slot->start = now, slot->latency_ms = -1.0, slot->method = method, slot->status = 0;
    self->count++;
    if (self->tally != NULL)
        self->tally->requests++;
    else
        self->started++;
    return 0;
}

/* ------------------------------------------------------------------ bodies */

/* The bytes that bring a fresh llhttp parser to where `body` is: a head of the same
 * framing, then what of the chunked framing was read. A request parser also gets the method
 * of the last request head (`method`, -1: none yet), which llhttp keeps until the next one is
 * parsed: Http1Observer reads it when a response answers a head still arriving. b"" for a
 * response parser between messages. */
static PyObject *synthetic_state(const h1_body *body, int request, int method, int closes) {
    char head[80], suffix[64], state[192];
    const char *close = closes ? "Connection: close\r\n" : "";
    suffix[0] = 0;
    if (request && method >= 0)
        snprintf(head, sizeof head, "%s / HTTP/1.1\r\n%s", h1_method_names[method], close);
    else
        snprintf(head, sizeof head, "%s%s", request ? "POST / HTTP/1.1\r\n" : "HTTP/1.1 200 OK\r\n",
                 close);
    switch (body->state) {
    case H1_BODY_NONE:
        if (request && method >= 0) { /* a whole message: the parser is between messages */
            snprintf(state, sizeof state, "%s\r\n", head);
            return PyBytes_FromString(state);
        }
        if (closes) { /* after a response that ends the connection: the parser takes no more */
            snprintf(state, sizeof state, "%sContent-Length: 0\r\n\r\n", head);
            return PyBytes_FromString(state);
        }
        return PyBytes_FromString("");
    case H1_BODY_LENGTH:
        snprintf(state, sizeof state, "%sContent-Length: %llu\r\n\r\n", head,
                 (unsigned long long)body->left);
        return PyBytes_FromString(state);
    case H1_CHUNK_SIZE:
    case H1_CHUNK_SIZE_LF:
        if (body->digits)
            snprintf(suffix, sizeof suffix, "%0*llx%s", body->digits,
                     (unsigned long long)body->left, body->state == H1_CHUNK_SIZE_LF ? "\r" : "");
        break;
    case H1_CHUNK_DATA:
        snprintf(suffix, sizeof suffix, "%llx\r\n", (unsigned long long)body->left);
        break;
    case H1_CHUNK_DATA_CR:
        snprintf(suffix, sizeof suffix, "1\r\nx");
        break;
    case H1_CHUNK_DATA_LF:
        snprintf(suffix, sizeof suffix, "1\r\nx\r");
        break;
    case H1_CHUNK_LAST_CR:
        snprintf(suffix, sizeof suffix, "0\r\n");
        break;
    case H1_CHUNK_LAST_LF:
        snprintf(suffix, sizeof suffix, "0\r\n\r");
        break;
    }
    snprintf(state, sizeof state, "%sTransfer-Encoding: chunked\r\n\r\n%s", head, suffix);
    return PyBytes_FromString(state);
}

/* ------------------------------------------------------------------- hand-over */

/* Build the Python observer in the state reached so far, then feed it data[pos:]. */
static PyObject *hand_over(Http1Fast *self, PyObject *out, PyObject *feed_name, PyObject *data,
                           const Py_buffer *view, Py_ssize_t pos, PyObject *now) {
    PyObject *pending = PyList_New(self->count), *delegate, *rest, *more;
    Py_ssize_t i;
    if (pending == NULL)
        goto fail;
    for (i = 0; i < self->count; i++) {
        /* (method, start, status | None, latency_ms | None, may_end_at_eof): the response
         * whose head was read (only the first's can be) ends the connection, or not */
        const pending_t *p = &self->pending[(self->head + i) % self->capacity];
        PyObject *status = p->status ? PyLong_FromLong(p->status) : Py_NewRef(Py_None);
        PyObject *latency = p->latency_ms >= 0 ? PyFloat_FromDouble(p->latency_ms) : Py_NewRef(Py_None);
        PyObject *item = (status && latency) ? Py_BuildValue("(OdOOO)", method_strings[p->method],
                                                             p->start, status, latency,
                                                             (p->status && self->response_closes)
                                                                 ? Py_True : Py_False) : NULL;
        Py_XDECREF(status);
        Py_XDECREF(latency);
        if (item == NULL) {
            Py_DECREF(pending);
            goto fail;
        }
        PyList_SET_ITEM(pending, i, item);
    }
    delegate = PyObject_CallFunction(self->adopt, "(NNNnnOOn)", pending,
                                     synthetic_state(&self->request_body, 1, self->last_method,
                                                     self->request_closes),
                                     synthetic_state(&self->response_body, 0, -1,
                                                     self->response_closes),
                                     self->max_header_bytes, self->max_pending, self->grpc_failures,
                                     self->authority != NULL ? self->authority : s_empty,
                                     self->request_heads);
    if (delegate == NULL)
        goto fail;
    self->delegate = delegate;
    self->count = self->head = 0;
    if (pos >= view->len)
        return finish(out);
    rest = pos == 0 ? Py_NewRef(data)
                    : PyBytes_FromStringAndSize((const char *)view->buf + pos, view->len - pos);
    if (rest == NULL)
        goto fail;
    more = PyObject_CallMethodObjArgs(delegate, feed_name, rest, now, NULL);
    Py_DECREF(rest);
    if (more == NULL)
        goto fail;
    if (out == NULL)
        return more;
    if (PyList_SetSlice(out, PyList_GET_SIZE(out), PyList_GET_SIZE(out), more) < 0) {
        Py_DECREF(more);
        goto fail;
    }
    Py_DECREF(more);
    return out;
fail:
    Py_XDECREF(out);
    return NULL;
}

/* -------------------------------------------------------------- the Observer API */

/* A tap of the pod is open (its switch's `on`): requests that start now are handed over to
 * the Python observer, which reports them to the tap. An error reading it counts as on. */
static int tap_on(Http1Fast *self) {
    if (self->tap == NULL || self->tap == Py_None)
        return 0;
    PyObject *on = PyObject_GetAttr(self->tap, n_on);
    if (on == NULL) {
        PyErr_Clear();
        return 1;
    }
    int truth = PyObject_IsTrue(on);
    Py_DECREF(on);
    if (truth < 0) {
        PyErr_Clear();
        return 1;
    }
    return truth;
}

/* A chunk's bytes: a bytes object (what transports deliver) read in place, anything else
 * through the buffer protocol. PyBuffer_Release does nothing for the first (no `obj`). */
static int chunk_view(PyObject *data, Py_buffer *view) {
    if (PyBytes_CheckExact(data)) {
        view->buf = PyBytes_AS_STRING(data);
        view->len = PyBytes_GET_SIZE(data);
        view->obj = NULL;
        return 0;
    }
    return PyObject_GetBuffer(data, view, PyBUF_SIMPLE);
}

/* The feeds. Each returns a new reference: a list of Records, or None when no Record came
 * (the public methods below turn None into what they promise). */
static PyObject *feed_client(Http1Fast *self, PyObject *data, PyObject *now_object, double now) {
    PyObject *out = NULL;
    Py_buffer view;
    Py_ssize_t pos = 0;
    h1_head head;
    if (self->delegate != NULL)
        return PyObject_CallMethodObjArgs(self->delegate, n_client_bytes, data, now_object, NULL);
    if (self->given_up)
        Py_RETURN_NONE;
    if (chunk_view(data, &view) < 0)
        return NULL;
    if (self->request_heads == 0 && self->authority == NULL) {
        /* as Http1Observer.client_bytes: each chunk until the first head is complete */
        char host[H1_MAX_HOST];
        size_t length = h1_host_in(view.buf, (size_t)view.len, host);
        if (length && (self->authority = PyUnicode_FromStringAndSize(host, (Py_ssize_t)length)) == NULL) {
            PyBuffer_Release(&view);
            return NULL;
        }
    }
    while (pos < view.len) {
        const uint8_t *p = (const uint8_t *)view.buf + pos;
        if (self->request_body.state != H1_BODY_NONE) { /* skipped by its framing, never looked at */
            size_t at = (size_t)pos;
            int walked = h1_walk_body(&self->request_body, view.buf, (size_t)view.len, &at);
            pos = (Py_ssize_t)at;
            if (walked < 0)
                break;
            continue;
        }
        if (self->request_closes || self->count >= self->max_pending || tap_on(self) ||
            !h1_scan_request(p, (size_t)(view.len - pos), &head))
            break; /* a tap open: the next request is the Python observer's, which taps it */
        if (push(self, head.method, now) < 0) {
            PyBuffer_Release(&view);
            return NULL;
        }
        pos += (Py_ssize_t)head.head_length;
        self->request_heads++;
        self->last_method = head.method;
        self->request_closes = head.closes;
        h1_start_body(&self->request_body, &head);
    }
    if (pos < view.len)
        out = hand_over(self, out, n_client_bytes, data, &view, pos, now_object);
    else if (out == NULL)
        out = Py_NewRef(Py_None);
    PyBuffer_Release(&view);
    return out;
}

static PyObject *feed_server(Http1Fast *self, PyObject *data, PyObject *now_object, double now) {
    PyObject *out = NULL;
    Py_buffer view;
    Py_ssize_t pos = 0;
    h1_head head;
    if (self->delegate != NULL)
        return PyObject_CallMethodObjArgs(self->delegate, n_server_bytes, data, now_object, NULL);
    if (self->given_up)
        Py_RETURN_NONE;
    if (chunk_view(data, &view) < 0)
        return NULL;
    while (pos < view.len) {
        const uint8_t *p = (const uint8_t *)view.buf + pos;
        int ended;
        if (self->response_body.state != H1_BODY_NONE) {
            size_t at = (size_t)pos;
            ended = h1_walk_body(&self->response_body, view.buf, (size_t)view.len, &at);
            pos = (Py_ssize_t)at;
            if (ended < 0)
                break;
            if (ended) {
                if (end_request(self, &out, first(self), NULL) < 0)
                    goto fail;
                pop_first(self);
            }
            continue;
        }
        if (self->response_closes || self->count == 0 ||
            !h1_scan_response(p, (size_t)(view.len - pos), &head))
            break;
        first(self)->status = head.status;
        first(self)->latency_ms = (now - first(self)->start) * 1000.0;
        pos += (Py_ssize_t)head.head_length;
        self->response_closes = head.closes;
        h1_start_body(&self->response_body, &head);
        if (self->response_body.state == H1_BODY_NONE) {
            if (end_request(self, &out, first(self), NULL) < 0)
                goto fail;
            pop_first(self);
        }
    }
    if (pos < view.len)
        out = hand_over(self, out, n_server_bytes, data, &view, pos, now_object);
    else if (out == NULL)
        out = Py_NewRef(Py_None);
    PyBuffer_Release(&view);
    return out;
fail:
    Py_XDECREF(out);
    PyBuffer_Release(&view);
    return NULL;
}

/* Nothing for the relay to take: no Record, no request started outside a tally, no
 * hand-over, not given up. */
static int quiet(Http1Fast *self) {
    return self->started == 0 && self->delegate == NULL && !self->given_up;
}

static PyObject *as_list(PyObject *fed) {
    if (fed != Py_None)
        return fed;
    Py_DECREF(fed);
    return PyList_New(0);
}

static int feed_arguments(PyObject *const *args, Py_ssize_t nargs, double *now) {
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "expected (data, now), got %zd arguments", nargs);
        return -1;
    }
    *now = PyFloat_CheckExact(args[1]) ? PyFloat_AS_DOUBLE(args[1]) : PyFloat_AsDouble(args[1]);
    return (*now == -1.0 && PyErr_Occurred()) ? -1 : 0;
}

static PyObject *Http1Fast_client_bytes(Http1Fast *self, PyObject *const *args, Py_ssize_t nargs) {
    double now;
    PyObject *fed;
    if (feed_arguments(args, nargs, &now) < 0 || (fed = feed_client(self, args[0], args[1], now)) == NULL)
        return NULL;
    return as_list(fed);
}

static PyObject *Http1Fast_server_bytes(Http1Fast *self, PyObject *const *args, Py_ssize_t nargs) {
    double now;
    PyObject *fed;
    if (feed_arguments(args, nargs, &now) < 0 || (fed = feed_server(self, args[0], args[1], now)) == NULL)
        return NULL;
    return as_list(fed);
}

/* The relay's one call per chunk (issue #16): as client_bytes / server_bytes, but None when
 * there is nothing for the relay to do, which is every chunk of a connection counting into
 * a tally on the fast path; else the Records (maybe none: take_started, opaque, delegated). */
static PyObject *Http1Fast_feed_client(Http1Fast *self, PyObject *const *args, Py_ssize_t nargs) {
    double now;
    PyObject *fed;
    if (feed_arguments(args, nargs, &now) < 0 || (fed = feed_client(self, args[0], args[1], now)) == NULL)
        return NULL;
    return fed == Py_None && !quiet(self) ? as_list(fed) : fed;
}

static PyObject *Http1Fast_feed_server(Http1Fast *self, PyObject *const *args, Py_ssize_t nargs) {
    double now;
    PyObject *fed;
    if (feed_arguments(args, nargs, &now) < 0 || (fed = feed_server(self, args[0], args[1], now)) == NULL)
        return NULL;
    return fed == Py_None && !quiet(self) ? as_list(fed) : fed;
}

/* Every request in flight ends as a failure with `error`; then the observer is opaque. */
static int give_up_into(Http1Fast *self, PyObject **out, PyObject *error) {
    self->given_up = 1;
    while (self->count) {
        if (end_request(self, out, first(self), error) < 0)
            return -1;
        pop_first(self);
    }
    return 0;
}

static PyObject *give_up(Http1Fast *self, PyObject *error) {
    PyObject *out = NULL;
    if (give_up_into(self, &out, error) < 0) {
        Py_XDECREF(out);
        return NULL;
    }
    return finish(out);
}

static PyObject *Http1Fast_closed(Http1Fast *self, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"now", "reset", NULL};
    PyObject *now_object, *out = NULL;
    int reset;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "Op:closed", keywords, &now_object, &reset))
        return NULL;
    if (self->delegate != NULL)
        return PyObject_CallMethodObjArgs(self->delegate, n_closed, now_object,
                                          reset ? Py_True : Py_False, NULL);
    if (self->given_up)
        return PyList_New(0);
    /* a response that ends the connection, cut short by a close (not a reset), counts as
     * ended (as Http1Observer's may_end_at_eof); the rest fail */
    if (!reset && self->count && first(self)->status && self->response_closes) {
        if (end_request(self, &out, first(self), NULL) < 0)
            return NULL;
        pop_first(self);
    }
    if (give_up_into(self, &out, reset ? s_reset : s_closed) < 0) {
        Py_XDECREF(out);
        return NULL;
    }
    return finish(out);
}

static PyObject *Http1Fast_abandon(Http1Fast *self, PyObject *error) {
    if (self->delegate != NULL)
        return PyObject_CallMethodObjArgs(self->delegate, n_abandon, error, NULL);
    if (self->given_up)
        return PyList_New(0);
    return give_up(self, error);
}

static PyObject *Http1Fast_take_started(Http1Fast *self, PyObject *Py_UNUSED(ignored)) {
    Py_ssize_t started = self->started;
    self->started = 0;
    if (self->delegate != NULL) {
        PyObject *more = PyObject_CallMethodNoArgs(self->delegate, n_take_started);
        Py_ssize_t value;
        if (more == NULL)
            return NULL;
        value = PyLong_AsSsize_t(more);
        Py_DECREF(more);
        if (value == -1 && PyErr_Occurred())
            return NULL;
        started += value;
    }
    return PyLong_FromSsize_t(started);
}

static PyObject *Http1Fast_count_into(Http1Fast *self, PyObject *tally) {
    if (!PyObject_TypeCheck(tally, &TallyType)) {
        PyErr_Format(PyExc_TypeError, "count_into takes a Tally, not %.100s", Py_TYPE(tally)->tp_name);
        return NULL;
    }
    Py_XSETREF(self->tally, (Tally *)Py_NewRef(tally));
    Py_RETURN_NONE;
}

static PyObject *Http1Fast_get_opaque(Http1Fast *self, void *Py_UNUSED(closure)) {
    if (self->delegate != NULL)
        return PyObject_GetAttr(self->delegate, n_opaque);
    return PyBool_FromLong(self->given_up);
}

static PyObject *Http1Fast_get_authority(Http1Fast *self, void *Py_UNUSED(closure)) {
    if (self->delegate != NULL)
        return PyObject_GetAttr(self->delegate, n_authority);
    return Py_NewRef(self->authority != NULL ? self->authority : s_empty);
}

/* As Http1Observer.at_rest: every request answered in full, no next one begun, not opaque,
 * nothing held. On the fast path a head is never held half-read (that hands over) and no
 * bytes are held, so it is: not given up and no request awaiting (the end of) its response. */
static PyObject *Http1Fast_get_at_rest(Http1Fast *self, void *Py_UNUSED(closure)) {
    if (self->delegate != NULL)
        return PyObject_GetAttr(self->delegate, n_at_rest);
    return PyBool_FromLong(!self->given_up && self->count == 0);
}

static PyObject *Http1Fast_get_delegated(Http1Fast *self, void *Py_UNUSED(closure)) {
    return PyBool_FromLong(self->delegate != NULL);
}

static PyObject *Http1Fast_get_delegate(Http1Fast *self, void *Py_UNUSED(closure)) {
    return Py_NewRef(self->delegate != NULL ? self->delegate : Py_None);
}

/* ---------------------------------------------------------------------- the type */

static int Http1Fast_init(Http1Fast *self, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"adopt", "max_header_bytes", "max_pending", "grpc_failures", "tap",
                               NULL};
    PyObject *adopt, *grpc_failures = Py_None, *tap = Py_None;
    Py_ssize_t max_header_bytes, max_pending;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "Onn|OO:Http1Fast", keywords, &adopt,
                                     &max_header_bytes, &max_pending, &grpc_failures, &tap))
        return -1;
    if (!PyCallable_Check(adopt)) {
        PyErr_SetString(PyExc_TypeError, "adopt must be callable");
        return -1;
    }
    if (max_pending < 1 || max_header_bytes < 1) {
        PyErr_SetString(PyExc_ValueError, "max_pending and max_header_bytes must be positive");
        return -1;
    }
    if (self->pending == NULL) {
        self->capacity = 4;
        if ((self->pending = PyMem_New(pending_t, self->capacity)) == NULL) {
            PyErr_NoMemory();
            return -1;
        }
    }
    Py_XSETREF(self->adopt, Py_NewRef(adopt));
    Py_XSETREF(self->grpc_failures, Py_NewRef(grpc_failures));
    Py_XSETREF(self->tap, Py_NewRef(tap));
    self->max_header_bytes = max_header_bytes;
    self->max_pending = max_pending;
    self->last_method = -1;
    return 0;
}

static int Http1Fast_traverse(Http1Fast *self, visitproc visit, void *arg) {
    Py_VISIT(self->delegate);
    Py_VISIT(self->adopt);
    Py_VISIT(self->grpc_failures);
    Py_VISIT(self->tap);
    Py_VISIT(self->authority);
    Py_VISIT(self->tally);
    return 0;
}

static int Http1Fast_clear(Http1Fast *self) {
    Py_CLEAR(self->delegate);
    Py_CLEAR(self->adopt);
    Py_CLEAR(self->grpc_failures);
    Py_CLEAR(self->tap);
    Py_CLEAR(self->authority);
    Py_CLEAR(self->tally);
    return 0;
}

static void Http1Fast_dealloc(Http1Fast *self) {
    PyObject_GC_UnTrack(self);
    Http1Fast_clear(self);
    PyMem_Free(self->pending);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Http1Fast_methods[] = {
    {"client_bytes", (PyCFunction)(void (*)(void))Http1Fast_client_bytes, METH_FASTCALL,
     "client_bytes(data, now) -> list[Record]"},
    {"server_bytes", (PyCFunction)(void (*)(void))Http1Fast_server_bytes, METH_FASTCALL,
     "server_bytes(data, now) -> list[Record]"},
    {"feed_client", (PyCFunction)(void (*)(void))Http1Fast_feed_client, METH_FASTCALL,
     "feed_client(data, now) -> list[Record] | None: None when the relay has nothing to do"},
    {"feed_server", (PyCFunction)(void (*)(void))Http1Fast_feed_server, METH_FASTCALL,
     "feed_server(data, now) -> list[Record] | None: None when the relay has nothing to do"},
    {"count_into", (PyCFunction)Http1Fast_count_into, METH_O,
     "count_into(tally): count the requests that start and end on the fast path there"},
    {"closed", (PyCFunction)(void (*)(void))Http1Fast_closed, METH_VARARGS | METH_KEYWORDS, "closed(now, reset) -> list[Record]"},
    {"abandon", (PyCFunction)Http1Fast_abandon, METH_O, "abandon(error) -> list[Record]"},
    {"take_started", (PyCFunction)Http1Fast_take_started, METH_NOARGS, "take_started() -> int"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Http1Fast_getset[] = {
    {"opaque", (getter)Http1Fast_get_opaque, NULL, "True once the observer stopped looking", NULL},
    {"authority", (getter)Http1Fast_get_authority, NULL,
     "The first request's Host as a label value (\"\" if none yet)", NULL},
    {"at_rest", (getter)Http1Fast_get_at_rest, NULL,
     "Between messages: every request answered in full, no next one begun", NULL},
    {"delegated", (getter)Http1Fast_get_delegated, NULL,
     "True once the connection was handed to the Python observer", NULL},
    {"delegate", (getter)Http1Fast_get_delegate, NULL,
     "The Python observer it handed the connection to (None before)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject Http1FastType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "agent.core._http1fast.Http1Fast",
    .tp_basicsize = sizeof(Http1Fast),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "HTTP/1 request accounting, compiled fast path (see the module docstring)",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Http1Fast_init,
    .tp_dealloc = (destructor)Http1Fast_dealloc,
    .tp_traverse = (traverseproc)Http1Fast_traverse,
    .tp_clear = (inquiry)Http1Fast_clear,
    .tp_methods = Http1Fast_methods,
    .tp_getset = Http1Fast_getset,
};

/* scan_request(data) / scan_response(data): the scanner alone, for tests and the fuzzer's
 * corpus: (head_length, content_length, method or status), or None when declined. */
static PyObject *scan(PyObject *data, int request) {
    Py_buffer view;
    h1_head head;
    int ok;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    ok = request ? h1_scan_request(view.buf, (size_t)view.len, &head)
                 : h1_scan_response(view.buf, (size_t)view.len, &head);
    PyBuffer_Release(&view);
    if (!ok)
        Py_RETURN_NONE;
    if (request)
        return Py_BuildValue("(nKO)", (Py_ssize_t)head.head_length,
                             (unsigned long long)head.content_length, method_strings[head.method]);
    return Py_BuildValue("(nKi)", (Py_ssize_t)head.head_length,
                         (unsigned long long)head.content_length, head.status);
}

/* host_in(data): h1_host_in alone, for the test that it finds what accounting.host_in finds. */
static PyObject *host_in(PyObject *m, PyObject *data) {
    Py_buffer view;
    char host[H1_MAX_HOST];
    size_t length;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    length = h1_host_in(view.buf, (size_t)view.len, host);
    PyBuffer_Release(&view);
    return PyUnicode_FromStringAndSize(host, (Py_ssize_t)length);
}

static PyObject *scan_request(PyObject *m, PyObject *data) { return scan(data, 1); }
static PyObject *scan_response(PyObject *m, PyObject *data) { return scan(data, 0); }

static PyMethodDef module_methods[] = {
    {"scan_request", scan_request, METH_O, "A request head's (length, content_length, method) or None"},
    {"host_in", host_in, METH_O, "The Host label h1_host_in finds in one chunk (\"\" if none)"},
    {"scan_response", scan_response, METH_O, "A response head's (length, content_length, status) or None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "agent.core._http1fast",
    "Compiled fast path of HTTP/1 request accounting (csrc/http1fast.c).", -1, module_methods,
};

#define INTERN(var, text)                                                                      \
    if ((var = PyUnicode_InternFromString(text)) == NULL)                                      \
        return NULL;

PyMODINIT_FUNC PyInit__http1fast(void) {
    PyObject *m, *accounting;
    int i;
    for (i = 0; i < H1_METHODS; i++)
        INTERN(method_strings[i], h1_method_names[i]);
    INTERN(s_success, "success");
    INTERN(s_failure, "failure");
    INTERN(s_reset, "reset");   /* agent.core.accounting.RESET */
    INTERN(s_closed, "closed"); /* agent.core.accounting.CLOSED */
    INTERN(s_empty, "");
    INTERN(n_classification, "classification");
    INTERN(n_status_code, "status_code");
    INTERN(n_grpc_status, "grpc_status");
    INTERN(n_latency_ms, "latency_ms");
    INTERN(n_method, "method");
    INTERN(n_error, "error");
    INTERN(n_client_bytes, "client_bytes");
    INTERN(n_server_bytes, "server_bytes");
    INTERN(n_closed, "closed");
    INTERN(n_abandon, "abandon");
    INTERN(n_take_started, "take_started");
    INTERN(n_opaque, "opaque");
    INTERN(n_authority, "authority");
    INTERN(n_at_rest, "at_rest");
    INTERN(n_detail, "detail");
    INTERN(n_on, "on");
    if ((accounting = PyImport_ImportModule("agent.core.accounting")) == NULL)
        return NULL;
    record_type = PyObject_GetAttrString(accounting, "Record");
    Py_DECREF(accounting);
    if (record_type == NULL)
        return NULL;
    if (!PyType_Check(record_type)) {
        PyErr_SetString(PyExc_TypeError, "agent.core.accounting.Record is not a class");
        return NULL;
    }
    if (PyType_Ready(&Http1FastType) < 0 || PyType_Ready(&TallyType) < 0)
        return NULL;
    if ((m = PyModule_Create(&module)) == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Http1Fast", (PyObject *)&Http1FastType) < 0 ||
        PyModule_AddObjectRef(m, "Tally", (PyObject *)&TallyType) < 0 ||
        PyModule_AddIntConstant(m, "MAX_HEAD", H1_MAX_HEAD) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
