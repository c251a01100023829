/* agent.dataplane._tlsio: the mesh tunnel's TLS connection as one C transport (issue #16).
 *
 * `TlsTransport` is an asyncio transport for one tunnel connection whose TLS handshake is done
 * (agent/dataplane/tls.py `handshake`: an `ssl.SSLObject` on memory BIOs). It takes the socket
 * and the SSL* and does, in C, what a plain uvloop TCP transport plus the session's own record
 * calls did in several layers: on readiness (loop.add_reader calls `_read_ready`, a C method:
 * no Python frame) one recv, the records opened into one plaintext chunk for the protocol's
 * data_received; `write` seals the plaintext and sends it at once, keeping what the socket did
 * not take until `_write_ready`. The OpenSSL calls are made with the GIL held: memory BIOs
 * never block, and dropping and taking the GIL around each (as `_ssl` does) costs more than the
 * record. The protocol sees an asyncio transport (the parts TunnelSession uses, asyncio's
 * semantics): pause_writing above the high-water mark, resume_writing at the low one; close
 * sends what is buffered, then our close_notify, then closes; abort drops it; the peer's
 * close_notify or EOF is eof_received; a record that does not open, or a socket error, ends
 * the connection with connection_lost(exc). connection_lost is called once, from the loop.
 *
 * The SSL* comes out of `_ssl`'s object by its layout (CPython 3.7+ Modules/_ssl.c
 * PySSLSocket: PyObject_HEAD, PyObject *Socket, SSL *ssl, ...), checked by the type's name and
 * by the app data CPython sets on every SSL it makes (SSL_set_app_data(ssl, self) in
 * newPySSLSocket): any other layout raises TypeError and the Python path is taken.
 *
 * Lanes (the engine's first step on the receive side): a stream in steady state — accepted,
 * reading, its relay counting in C or not observing at all — is registered by the session as a
 * `Lane` in `lanes` (stream id -> Lane). From then on this transport cuts the plaintext into
 * tunnel frames itself (agent/core/tunnel_frames.py; a frame cut by a record or a read waits
 * here, whole frames only go on) and a DATA frame without flags for an active lane does not
 * reach Python: its payload goes to the lane's feed (the relay's compiled observer) and is
 * written to the pod's transport from here, and the lane counts it. Every other frame goes to
 * the session in order, in runs. Before each run every lane with bytes not yet reported reports
 * them (`synced(received, chunks, last)`: the session's windows, credit, the relay's byte
 * counts), so the session never sees a frame before the bytes that came ahead of it are
 * counted; after a read, a lane reports once `report_at` bytes are pending, or when it is off,
 * and every lane reports once `lane_cap` may be pending on the connection: a paced request's
 * read calls no Python at all, and the peer's windows never wait for credit held here (the
 * session pulls the rest with `take` when it reads the counts: a scrape, a sweep, a lane taken
 * off). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <openssl/ssl.h>
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/crypto.h>
#include <errno.h>
#include <stdint.h>
#include <time.h>
#include <string.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <netinet/tcp.h>

#define READ_SIZE 65536        /* bytes read from the socket per readiness callback */
#define PLAIN_CHUNK 65536      /* plaintext delivered to the protocol at a time, at most */
#define SEND_STAGE 32768       /* sealed bytes staged on the stack on their way to send() */
#define KEEP_CAPACITY 65536    /* an emptied output buffer larger than this is freed */

/* The tunnel's frames (agent/core/tunnel_frames.py): a 12-byte header >BBHII (version, type,
 * flags, stream id, length); DATA carries `length` bytes, other types none. */
#define FRAME_HEADER 12
#define FRAME_VERSION 2
#define FRAME_DATA 0
#define FRAME_SYN 0x1
#define MAX_FRAME_PAYLOAD 65536
#define MAX_OPEN_HEADER 4096
#define TOUCHED_MAX 8          /* lanes that moved bytes in one read, before they report */
#define PLAIN_FLUSH 65536      /* senders' plaintext sealed at once when this much waits */
#define BURST_GAP 50e-6        /* a sender's write this soon after the last one is batched */
#define ALONE_STAGE 16384      /* a write alone up to this size is framed on the stack */

typedef struct { PyObject_HEAD PyObject *socket; SSL *ssl; } ssl_socket_head;

typedef struct {
    PyObject_HEAD
    PyObject *feed;            /* callable(bytes, now) -> None or news; or None: nothing observes */
    PyObject *write, *is_closing;  /* the pod transport's */
    PyObject *news;            /* callable(records or None (the feed raised)) */
    PyObject *synced;          /* callable(received, chunks, last) */
    unsigned long long received, chunks, last;  /* since the last report */
    unsigned long long delivered;  /* frames delivered, in all */
    unsigned long long report_at;  /* report after a read once this much is pending */
    unsigned long stream_id;
    char active, touched;
} Lane;

typedef struct {
    PyObject_HEAD
    PyObject *loop, *sock, *ssl_object, *protocol, *peername;
    PyObject *data_received;   /* protocol.data_received, bound once */
    PyObject *read_cb, *write_cb, *lost_cb;  /* our own bound methods, made once */
    PyObject *owner;           /* the _ssl object: keeps the SSL* and its BIOs alive */
    SSL *ssl;
    BIO *rbio, *wbio;
    int fd;
    char *out;
    size_t out_start, out_end, out_cap;
    size_t high, low;
    char reading, writing, closing, lost_scheduled, lost, protocol_paused, started;
    PyObject *lanes;           /* stream id -> Lane (a dict the session fills) */
    Lane *last_lane;           /* the lane found last (a reference) */
    char *tail;                /* the start of a frame, waiting for the rest (cutting only) */
    size_t tail_len, tail_cap;
    char cutting;              /* frames are cut here: once a lane was registered */
    Py_ssize_t lane_cap;       /* all lanes report once this much may be pending, together */
    Py_ssize_t pending_total;  /* delivered since the last walk (an upper bound) */
    /* The send side: senders' DATA frames, not sealed yet (sealed together at `_flush`, from
     * the loop once per iteration, or at once when PLAIN_FLUSH is queued, or ahead of the
     * session's next write) */
    char *plain;
    size_t plain_len, plain_cap;
    char flush_scheduled;
    double last_send;          /* when a sender last wrote (time.monotonic()'s clock) */
    double burst_gap;          /* a write sooner than this after the last one is batched */
    char session_queued;       /* the session has frames queued, to be written soon: a sender
                                * hands its bytes to the session (after them) meanwhile */
    PyObject *call_soon, *flush_cb;  /* loop.call_soon and our `_flush`, bound once */
} TlsTransport;

static PyObject *SSLError; /* ssl.SSLError */
static PyTypeObject LaneType;

static size_t out_len(TlsTransport *self) { return self->out_end - self->out_start; }

/* ------------------------------------------------------------------ loop calls */

static int loop_call(TlsTransport *self, const char *method, PyObject *cb) {
    PyObject *r = cb == NULL
        ? PyObject_CallMethod(self->loop, method, "i", self->fd)
        : PyObject_CallMethod(self->loop, method, "iO", self->fd, cb);
    if (r == NULL) return -1;
    Py_DECREF(r);
    return 0;
}

static int start_reading(TlsTransport *self) {
    if (self->reading || self->closing) return 0;
    if (loop_call(self, "add_reader", self->read_cb) < 0) return -1;
    self->reading = 1;
    return 0;
}

static int stop_reading(TlsTransport *self) {
    if (!self->reading) return 0;
    self->reading = 0;
    return loop_call(self, "remove_reader", NULL);
}

static int stop_writing(TlsTransport *self) {
    if (!self->writing) return 0;
    self->writing = 0;
    return loop_call(self, "remove_writer", NULL);
}

/* A protocol callback (or our own Python call) raised: asyncio's "Fatal error" report. */
static void report(TlsTransport *self, const char *message) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (value == NULL) { Py_XDECREF(type); Py_XDECREF(tb); return; }
    PyObject *context = Py_BuildValue("{s:s,s:O,s:O,s:O}", "message", message, "exception", value,
                                      "transport", (PyObject *)self,
                                      "protocol", self->protocol ? self->protocol : Py_None);
    if (context != NULL) {
        PyObject *r = PyObject_CallMethod(self->loop, "call_exception_handler", "O", context);
        Py_XDECREF(r);
        Py_DECREF(context);
    }
    PyErr_Clear();
    Py_XDECREF(type); Py_XDECREF(value); Py_XDECREF(tb);
}

/* Stop everything now; connection_lost(exc) from the loop, soon (exc may be NULL). */
static void force_close(TlsTransport *self, PyObject *exc) {
    self->closing = 1;
    if (stop_reading(self) < 0) PyErr_Clear();
    if (stop_writing(self) < 0) PyErr_Clear();
    self->out_start = self->out_end = 0;
    self->plain_len = 0;
    if (self->lost_scheduled || self->lost_cb == NULL) return;
    self->lost_scheduled = 1;
    PyObject *r = PyObject_CallMethod(self->loop, "call_soon", "OO", self->lost_cb, exc ? exc : Py_None);
    if (r == NULL) PyErr_Clear();
    Py_XDECREF(r);
}

/* The pending Python error (a socket error) ends the connection with it. */
static void fail_with_error(TlsTransport *self) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    force_close(self, value);
    Py_XDECREF(type); Py_XDECREF(value); Py_XDECREF(tb);
}

/* An ssl.SSLError for OpenSSL's first queued error (or `why`), with library and reason. */
static PyObject *ssl_error(int why) {
    unsigned long code = ERR_peek_last_error();
    const char *reason = code ? ERR_reason_error_string(code) : NULL;
    const char *library = code ? ERR_lib_error_string(code) : NULL;
    char message[256];
    snprintf(message, sizeof message, "[%s] %s (SSL_get_error %d)", library ? library : "SSL",
             reason ? reason : "TLS record failed", why);
    ERR_clear_error();
    PyObject *exc = PyObject_CallFunction(SSLError, "is", why, message);
    if (exc == NULL) return NULL;
    PyObject *r = PyUnicode_FromString(reason ? reason : "TLS_RECORD_FAILED");
    PyObject *l = PyUnicode_FromString(library ? library : "SSL");
    if (r == NULL || l == NULL || PyObject_SetAttrString(exc, "reason", r) < 0
            || PyObject_SetAttrString(exc, "library", l) < 0) {
        Py_XDECREF(r); Py_XDECREF(l); Py_DECREF(exc);
        return NULL;
    }
    Py_DECREF(r); Py_DECREF(l);
    return exc;
}

/* ------------------------------------------------------------------ output */

static int reserve(TlsTransport *self, size_t more) {
    size_t used = out_len(self);
    if (self->out_start > 0 && used > 0 && self->out_end + more > self->out_cap) {
        memmove(self->out, self->out + self->out_start, used);
        self->out_start = 0; self->out_end = used;
    } else if (used == 0) {
        self->out_start = self->out_end = 0;
    }
    if (self->out_end + more <= self->out_cap) return 0;
    size_t cap = self->out_cap ? self->out_cap : 16384;
    while (cap < self->out_end + more) cap *= 2;
    char *grown = PyMem_Realloc(self->out, cap);
    if (grown == NULL) { PyErr_NoMemory(); return -1; }
    self->out = grown;
    self->out_cap = cap;
    return 0;
}

static void maybe_pause_protocol(TlsTransport *self) {
    if (self->protocol_paused || out_len(self) <= self->high || self->protocol == NULL) return;
    self->protocol_paused = 1;
    PyObject *r = PyObject_CallMethod(self->protocol, "pause_writing", NULL);
    if (r == NULL) report(self, "protocol.pause_writing() failed");
    Py_XDECREF(r);
}

/* Move what OpenSSL sealed to the socket; keep what it does not take. 0, or -1 with the
 * connection force-closed (a socket error) or a Python error set (out of memory). */
static int flush_sealed(TlsTransport *self) {
    char stage[SEND_STAGE];
    size_t pending;
    while ((pending = BIO_ctrl_pending(self->wbio)) > 0) {
        if (out_len(self) == 0 && !self->writing) {
            int n = BIO_read(self->wbio, stage, pending > sizeof stage ? (int)sizeof stage : (int)pending);
            if (n <= 0) break;
            ssize_t sent = send(self->fd, stage, (size_t)n, MSG_NOSIGNAL | MSG_DONTWAIT);
            if (sent < 0) {
                if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) sent = 0;
                else { PyErr_SetFromErrno(PyExc_OSError); fail_with_error(self); return -1; }
            }
            if ((size_t)sent < (size_t)n) {
                if (reserve(self, (size_t)n - (size_t)sent) < 0) return -1;
                memcpy(self->out + self->out_end, stage + sent, (size_t)n - (size_t)sent);
                self->out_end += (size_t)n - (size_t)sent;
            }
        } else {
            if (reserve(self, pending) < 0) return -1;
            int n = BIO_read(self->wbio, self->out + self->out_end, (int)pending);
            if (n <= 0) break;
            self->out_end += (size_t)n;
        }
    }
    if (out_len(self) > 0 && !self->writing) {
        if (loop_call(self, "add_writer", self->write_cb) < 0) return -1;
        self->writing = 1;
    }
    maybe_pause_protocol(self);
    return 0;
}

/* Seal `n` plaintext bytes and send what the socket takes. 0, or -1 with a Python error set
 * (out of memory); a TLS failure ends the connection (force_close with the SSLError), 0. */
static int seal(TlsTransport *self, const char *data, size_t n) {
    size_t written = 0;
    if (!SSL_write_ex(self->ssl, data, n, &written)) {
        int why = SSL_get_error(self->ssl, 0);
        PyObject *exc = ssl_error(why);
        if (exc == NULL) return -1;
        force_close(self, exc);
        Py_DECREF(exc);
        return 0;
    }
    if (flush_sealed(self) < 0 && PyErr_Occurred()) return -1;
    return 0;
}

/* Emptied: freed (a burst is over when its frames are sealed; a quiet connection keeps no
 * plaintext buffer, ~16 KiB each otherwise). */
static void drop_plain(TlsTransport *self) {
    self->plain_len = 0;
    if (self->plain != NULL) {
        PyMem_Free(self->plain);
        self->plain = NULL;
        self->plain_cap = 0;
    }
}

/* Room for `more` bytes of frames in the senders' plaintext. 0, or -1 (out of memory). */
static int plain_room(TlsTransport *t, size_t more) {
    if (t->plain_len + more <= t->plain_cap) return 0;
    size_t cap = t->plain_cap ? t->plain_cap : 16384;
    while (cap < t->plain_len + more) cap *= 2;
    char *grown = PyMem_Realloc(t->plain, cap);
    if (grown == NULL) { PyErr_NoMemory(); return -1; }
    t->plain = grown;
    t->plain_cap = cap;
    return 0;
}

/* The senders' frames, sealed and sent (with `more` after them, in the same records). */
static int seal_plain(TlsTransport *self, const char *more, size_t n) {
    if (self->plain_len == 0) return n ? seal(self, more, n) : 0;
    if (n) {
        if (plain_room(self, n) < 0) return -1;
        memcpy(self->plain + self->plain_len, more, n);
        self->plain_len += n;
    }
    int r = seal(self, self->plain, self->plain_len);
    drop_plain(self);
    return r;
}

static void finish_close_if_drained(TlsTransport *self) {
    if (self->closing && out_len(self) == 0 && !self->lost_scheduled) force_close(self, NULL);
}

/* ------------------------------------------------------------------ input */

/* Deliver `n` plaintext bytes; 0, or -1 when the protocol raised (reported, closed). */
/* A Python call made on received data raised: asyncio's report, and the connection ends with
 * the exception. Always -1. */
static int callback_failed(TlsTransport *self, const char *message) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    Py_XINCREF(value);
    PyErr_Restore(type, value, tb);
    report(self, message);
    force_close(self, value);
    Py_XDECREF(value);
    return -1;
}

static int deliver(TlsTransport *self, const char *data, size_t n) {
    PyObject *chunk = PyBytes_FromStringAndSize(data, (Py_ssize_t)n);
    if (chunk == NULL) { report(self, "out of memory for received data"); force_close(self, NULL); return -1; }
    PyObject *r = PyObject_CallOneArg(self->data_received, chunk);
    Py_DECREF(chunk);
    if (r == NULL) return callback_failed(self, "Fatal error: protocol.data_received() call failed.");
    Py_DECREF(r);
    return 0;
}

/* The rest of the engine's receive side: lanes. */

static double monotonic_now(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);  /* time.monotonic()'s clock */
    return (double)now.tv_sec + (double)now.tv_nsec * 1e-9;
}

static uint32_t be32(const unsigned char *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | (uint32_t)p[3];
}

/* The lane registered for `stream_id` and active, or NULL (a borrowed reference). */
static Lane *find_lane(TlsTransport *self, unsigned long stream_id) {
    Lane *lane = self->last_lane;
    if (lane != NULL && lane->stream_id == stream_id && lane->active) return lane;
    PyObject *key = PyLong_FromUnsignedLong(stream_id);
    if (key == NULL) { PyErr_Clear(); return NULL; }
    PyObject *found = PyDict_GetItemWithError(self->lanes, key);
    Py_DECREF(key);
    if (found == NULL) { PyErr_Clear(); return NULL; }
    if (!Py_IS_TYPE(found, &LaneType) || !((Lane *)found)->active) return NULL;
    Py_INCREF(found);
    Py_XSETREF(self->last_lane, (Lane *)found);
    return (Lane *)found;
}

/* Report what `lane` moved since it last did: `synced(received, chunks, last)`. */
static int report_lane(TlsTransport *self, Lane *lane) {
    if (!lane->received) return 0;
    unsigned long long received = lane->received, chunks = lane->chunks, last = lane->last;
    lane->received = lane->chunks = lane->last = 0;
    self->pending_total = received < (unsigned long long)self->pending_total
        ? self->pending_total - (Py_ssize_t)received : 0;
    PyObject *args[3] = {PyLong_FromUnsignedLongLong(received), PyLong_FromUnsignedLongLong(chunks),
                         PyLong_FromUnsignedLongLong(last)};
    PyObject *r = args[0] && args[1] && args[2] ? PyObject_Vectorcall(lane->synced, args, 3, NULL) : NULL;
    Py_XDECREF(args[0]); Py_XDECREF(args[1]); Py_XDECREF(args[2]);
    if (r == NULL) return callback_failed(self, "Fatal error: a lane's report failed.");
    Py_DECREF(r);
    return 0;
}

/* The lanes that moved bytes in this read, in the order they first moved: each reports once
 * `report_at` is pending (`everything`: whatever is), or when it is off (its last chunk may be
 * owed). What stays pending is reported by a later read, or pulled by the session (`take`). */
static int report_lanes(TlsTransport *self, Lane **touched, int *count, int everything) {
    int n = *count, failed = 0;
    *count = 0;
    for (int i = 0; i < n; i++) {
        Lane *lane = touched[i];
        lane->touched = 0;
        if (!failed && (everything || !lane->active || lane->received >= lane->report_at))
            failed = report_lane(self, lane);
        Py_DECREF(lane);
    }
    return failed;
}

/* Every lane of the connection reports what is pending (their sum may have reached the cap:
 * the peer's connection window must never wait for credit held here). */
static int report_every_lane(TlsTransport *self) {
    self->pending_total = 0;  /* an upper bound: what `take` pulled is in it too */
    PyObject *lanes = PyDict_Values(self->lanes);  /* a copy: a report may change the dict */
    if (lanes == NULL) return callback_failed(self, "out of memory");
    int failed = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(lanes) && !failed; i++) {
        PyObject *lane = PyList_GET_ITEM(lanes, i);
        if (Py_IS_TYPE(lane, &LaneType)) failed = report_lane(self, (Lane *)lane);
    }
    Py_DECREF(lanes);
    return failed;
}

/* The session is about to run: every lane reports what it delivered — those of this read, in
 * the order they moved, then any holding bytes from earlier reads — so the session never sees
 * a frame before every byte delivered ahead of it is counted. */
static int report_before_session(TlsTransport *self, Lane **touched, int *count) {
    if (report_lanes(self, touched, count, 1) < 0) return -1;
    return self->pending_total > 0 ? report_every_lane(self) : 0;
}

/* One DATA frame's payload on its lane: the relay's observer, then the pod's transport, as
 * Relay.from_upstream / from_client do. 0, or -1 (reported, closing). */
static int lane_deliver(TlsTransport *self, Lane *lane, const char *data, size_t n,
                        Lane **touched, int *count) {
    if (!lane->touched) {
        if (*count == TOUCHED_MAX && report_lanes(self, touched, count, 1) < 0) return -1;
        Py_INCREF(lane);
        lane->touched = 1;
        touched[(*count)++] = lane;
    }
    PyObject *chunk = PyBytes_FromStringAndSize(data, (Py_ssize_t)n);
    if (chunk == NULL) return callback_failed(self, "out of memory for received data");
    if (lane->feed != Py_None) {
        PyObject *now = PyFloat_FromDouble(monotonic_now());
        if (now == NULL) { Py_DECREF(chunk); return callback_failed(self, "out of memory"); }
        PyObject *args[2] = {chunk, now};
        PyObject *answer = PyObject_Vectorcall(lane->feed, args, 2, NULL);
        Py_DECREF(now);
        if (answer == NULL && !PyErr_ExceptionMatches(PyExc_Exception)) {
            Py_DECREF(chunk);
            return callback_failed(self, "Fatal error: a lane's feed failed.");
        }
        if (answer == NULL) PyErr_Clear();  /* a bug in the observer: the relay settles it */
        if (answer != Py_None) {  /* news (or the feed raised): the relay settles, in Python */
            lane->active = 0;  /* the session registers it again if it still may */
            PyObject *r = PyObject_CallOneArg(lane->news, answer ? answer : Py_None);
            Py_XDECREF(answer);
            if (r == NULL) { Py_DECREF(chunk); return callback_failed(self, "Fatal error: a lane's news failed."); }
            Py_DECREF(r);
        } else {
            Py_DECREF(answer);
        }
    }
    PyObject *closing = PyObject_CallNoArgs(lane->is_closing);
    int truth = closing == NULL ? -1 : PyObject_IsTrue(closing);
    Py_XDECREF(closing);
    if (truth < 0) { Py_DECREF(chunk); return callback_failed(self, "Fatal error: a lane's transport failed."); }
    if (!truth) {
        PyObject *r = PyObject_CallOneArg(lane->write, chunk);
        if (r == NULL) { Py_DECREF(chunk); return callback_failed(self, "Fatal error: a lane's write failed."); }
        Py_DECREF(r);
    }
    Py_DECREF(chunk);
    lane->received += n;
    lane->chunks += 1;
    lane->last = n;
    lane->delivered += 1;
    self->pending_total += (Py_ssize_t)n;
    return 0;
}

/* Room for `size` bytes in the tail buffer (a frame is at most 12 + 64 KiB; with the read
 * appended to it, at most one read more). 0, or -1 (reported, closing). */
static int tail_room(TlsTransport *self, size_t size) {
    if (size <= self->tail_cap) return 0;
    char *grown = PyMem_Realloc(self->tail, size);
    if (grown == NULL) { PyErr_NoMemory(); return callback_failed(self, "out of memory for a frame"); }
    self->tail = grown;
    self->tail_cap = size;
    return 0;
}

/* Keep data[from:n] (the start of a frame) for the next read. */
static int keep_tail(TlsTransport *self, const char *data, size_t from, size_t n) {
    size_t left = n - from;
    if (tail_room(self, left) < 0) return -1;  /* (never grows when data is the tail itself) */
    memmove(self->tail, data + from, left);
    self->tail_len = left;
    return 0;
}

/* Plaintext in cutting mode: lane frames delivered here, every other frame to the session in
 * runs, in order; a frame not whole yet is kept. 0, or -1 (reported, closing). */
static int dispatch(TlsTransport *self, const char *data, size_t n) {
    if (self->tail_len) {  /* the frame begun in an earlier read comes first */
        if (tail_room(self, self->tail_len + n) < 0) return -1;
        memcpy(self->tail + self->tail_len, data, n);
        n += self->tail_len;
        self->tail_len = 0;
        data = self->tail;
    }
    Lane *touched[TOUCHED_MAX];
    int count = 0;
    size_t pos = 0, run = 0;  /* data[run:pos]: frames for the session, not yet handed over */
    while (n - pos >= FRAME_HEADER && !self->closing) {
        const unsigned char *h = (const unsigned char *)data + pos;
        uint32_t length = be32(h + 8);
        size_t size = FRAME_HEADER;
        if (h[0] != FRAME_VERSION) { pos = n; break; }  /* the session says what is wrong */
        if (h[1] == FRAME_DATA) {
            if (length > (h[3] & FRAME_SYN ? MAX_OPEN_HEADER : MAX_FRAME_PAYLOAD)) { pos = n; break; }
            size += length;
        }
        if (size > n - pos) break;  /* not whole yet */
        Lane *lane = NULL;
        if (h[1] == FRAME_DATA && h[2] == 0 && h[3] == 0 && length > 0)
            lane = find_lane(self, be32(h + 4));
        if (lane == NULL) { pos += size; continue; }
        if (pos > run) {  /* what came before goes first, with the lanes' counts reported */
            if (report_before_session(self, touched, &count) < 0) return -1;
            if (deliver(self, data + run, pos - run) < 0) return -1;
            run = pos;
            if (self->closing) break;
            lane = find_lane(self, be32(h + 4));  /* the session may have changed it */
            if (lane == NULL) { pos += size; continue; }
        }
        if (lane_deliver(self, lane, (const char *)h + FRAME_HEADER, length, touched, &count) < 0)
            return -1;
        pos += size;
        run = pos;
    }
    if ((pos > run ? report_before_session(self, touched, &count)
                   : report_lanes(self, touched, &count, 0)) < 0)
        return -1;
    if (!self->closing && self->pending_total >= self->lane_cap && report_every_lane(self) < 0)
        return -1;
    if (self->closing) return 0;
    if (pos > run && deliver(self, data + run, pos - run) < 0) return -1;
    if (self->closing || pos == n) return 0;
    return keep_tail(self, data, pos, n);
}

/* The plaintext of a read: to the session whole, or cut into frames once lanes were used. */
static int received(TlsTransport *self, const char *data, size_t n) {
    if (!self->cutting && self->lanes != NULL && PyDict_GET_SIZE(self->lanes) > 0) self->cutting = 1;
    return self->cutting ? dispatch(self, data, n) : deliver(self, data, n);
}

static void peer_finished(TlsTransport *self) {
    /* the peer's close_notify, or its EOF: asyncio's eof_received, then close unless kept */
    if (stop_reading(self) < 0) PyErr_Clear();
    PyObject *keep = PyObject_CallMethod(self->protocol, "eof_received", NULL);
    if (keep == NULL) {
        report(self, "Fatal error: protocol.eof_received() call failed.");
        force_close(self, NULL);
        return;
    }
    int truth = PyObject_IsTrue(keep);
    Py_DECREF(keep);
    if (truth <= 0 && !self->closing) {
        PyErr_Clear();
        PyObject *r = PyObject_CallMethod((PyObject *)self, "close", NULL);
        if (r == NULL) PyErr_Clear();
        Py_XDECREF(r);
    }
}

/* Open every whole record waiting in the incoming BIO and hand the plaintext over. */
static void open_records(TlsTransport *self) {
    char plain[PLAIN_CHUNK];
    size_t used = 0;
    int peer_closed = 0;
    while (!self->closing) {
        size_t got = 0;
        if (used == sizeof plain) {
            if (received(self, plain, used) < 0) return;
            used = 0;
            continue;
        }
        /* Ask only while something waits (as uvloop and TunnelTls do): a read that finds a
         * partial record fails, and a failure queues an OpenSSL error, ~1 k instructions. */
        if (BIO_ctrl_pending(self->rbio) == 0 && SSL_pending(self->ssl) == 0) break;
        if (SSL_read_ex(self->ssl, plain + used, sizeof plain - used, &got)) {
            used += got;
            continue;
        }
        int why = SSL_get_error(self->ssl, 0);
        if (why == SSL_ERROR_WANT_READ) { ERR_clear_error(); break; }
        if (why == SSL_ERROR_ZERO_RETURN) { ERR_clear_error(); peer_closed = 1; break; }
        if (used && received(self, plain, used) < 0) { ERR_clear_error(); return; }
        PyObject *exc = ssl_error(why);
        if (exc == NULL) { report(self, "TLS record failed"); force_close(self, NULL); return; }
        force_close(self, exc);  /* a record that does not open: nothing more either way */
        Py_DECREF(exc);
        return;
    }
    if (used && !self->closing && received(self, plain, used) < 0) return;
    if (self->closing) return;
    if (BIO_ctrl_pending(self->wbio) > 0 && flush_sealed(self) < 0) {  /* a key update's answer */
        if (PyErr_Occurred()) { report(self, "TLS output failed"); force_close(self, NULL); }
        return;
    }
    if (peer_closed) peer_finished(self);
}

static PyObject *read_ready(TlsTransport *self, PyObject *unused) {
    char buf[READ_SIZE];
    if (self->closing || self->lost) Py_RETURN_NONE;
    ssize_t n = recv(self->fd, buf, sizeof buf, MSG_DONTWAIT);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) n = -2;
        else { PyErr_SetFromErrno(PyExc_OSError); fail_with_error(self); Py_RETURN_NONE; }
    }
    if (n == 0) {
        open_records(self);  /* whatever came before the EOF */
        if (!self->closing) peer_finished(self);
        Py_RETURN_NONE;
    }
    if (n > 0 && BIO_write(self->rbio, buf, (int)n) != (int)n) {
        PyErr_NoMemory();
        report(self, "TLS input failed");
        force_close(self, NULL);
        Py_RETURN_NONE;
    }
    open_records(self);
    Py_RETURN_NONE;
}

static PyObject *write_ready(TlsTransport *self, PyObject *unused) {
    if (self->lost) Py_RETURN_NONE;
    size_t n = out_len(self);
    if (n > 0) {
        ssize_t sent = send(self->fd, self->out + self->out_start, n, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (sent < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) Py_RETURN_NONE;
            PyErr_SetFromErrno(PyExc_OSError);
            fail_with_error(self);
            Py_RETURN_NONE;
        }
        self->out_start += (size_t)sent;
    }
    if (out_len(self) == 0) {
        self->out_start = self->out_end = 0;
        if (self->out_cap > KEEP_CAPACITY) {
            PyMem_Free(self->out);
            self->out = NULL;
            self->out_cap = 0;
        }
        if (stop_writing(self) < 0) { report(self, "remove_writer failed"); force_close(self, NULL); Py_RETURN_NONE; }
    }
    if (self->protocol_paused && out_len(self) <= self->low && !self->closing) {
        self->protocol_paused = 0;
        PyObject *r = PyObject_CallMethod(self->protocol, "resume_writing", NULL);
        if (r == NULL) report(self, "protocol.resume_writing() failed");
        Py_XDECREF(r);
    }
    finish_close_if_drained(self);
    Py_RETURN_NONE;
}

static PyObject *call_connection_lost(TlsTransport *self, PyObject *exc) {
    if (self->lost) Py_RETURN_NONE;
    self->lost = 1;
    self->closing = 1;
    if (stop_reading(self) < 0) PyErr_Clear();
    if (stop_writing(self) < 0) PyErr_Clear();
    PyObject *protocol = self->protocol;
    self->protocol = NULL;
    Py_CLEAR(self->data_received);
    if (protocol != NULL) {
        PyObject *r = PyObject_CallMethod(protocol, "connection_lost", "O", exc);
        if (r == NULL) {
            self->protocol = protocol;  /* for the report */
            report(self, "protocol.connection_lost() failed");
            self->protocol = NULL;
        }
        Py_XDECREF(r);
        Py_DECREF(protocol);
    }
    PyObject *r = PyObject_CallMethod(self->sock, "close", NULL);
    if (r == NULL) PyErr_Clear();
    Py_XDECREF(r);
    PyMem_Free(self->out);
    self->out = NULL;
    self->out_start = self->out_end = self->out_cap = 0;
    Py_CLEAR(self->read_cb);
    Py_CLEAR(self->write_cb);
    Py_CLEAR(self->lost_cb);  /* (the loop's handle holds the one running) no cycle is left */
    Py_CLEAR(self->flush_cb);
    drop_plain(self);
    if (self->lanes != NULL) PyDict_Clear(self->lanes);  /* they hold the session's methods */
    Py_CLEAR(self->last_lane);
    PyMem_Free(self->tail);
    self->tail = NULL;
    self->tail_len = self->tail_cap = 0;
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------ transport API */

static PyObject *tt_start(TlsTransport *self, PyObject *unused) {
    if (self->started) { PyErr_SetString(PyExc_RuntimeError, "already started"); return NULL; }
    self->started = 1;
    PyObject *r = PyObject_CallMethod(self->protocol, "connection_made", "O", (PyObject *)self);
    if (r == NULL) return NULL;
    Py_DECREF(r);
    if (self->closing) Py_RETURN_NONE;
    if (self->protocol == NULL) Py_RETURN_NONE;
    self->data_received = PyObject_GetAttrString(self->protocol, "data_received");
    if (self->data_received == NULL) return NULL;
    if (BIO_ctrl_pending(self->rbio) > 0 || SSL_pending(self->ssl) > 0)
        open_records(self);  /* bytes that came with the handshake's last flight */
    if (!self->closing && start_reading(self) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *tt_write(TlsTransport *self, PyObject *data) {
    if (self->closing) Py_RETURN_NONE;
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0) return NULL;
    /* the senders' frames waiting for `_flush` came first: they go first, in the same records */
    int r = seal_plain(self, view.buf, (size_t)view.len);
    PyBuffer_Release(&view);
    if (r < 0) return NULL;
    Py_RETURN_NONE;
}

/* The loop's call, once per iteration in which a sender queued frames. */
static PyObject *tt_flush(TlsTransport *self, PyObject *unused) {
    self->flush_scheduled = 0;
    if (self->closing || self->plain_len == 0) Py_RETURN_NONE;
    if (seal_plain(self, NULL, 0) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *tt_writelines(TlsTransport *self, PyObject *chunks) {
    PyObject *it = PyObject_GetIter(chunks);
    if (it == NULL) return NULL;
    PyObject *chunk;
    while ((chunk = PyIter_Next(it)) != NULL) {
        PyObject *r = tt_write(self, chunk);
        Py_DECREF(chunk);
        if (r == NULL) { Py_DECREF(it); return NULL; }
        Py_DECREF(r);
    }
    Py_DECREF(it);
    if (PyErr_Occurred()) return NULL;
    Py_RETURN_NONE;
}

static PyObject *tt_close(TlsTransport *self, PyObject *unused) {
    if (self->closing) Py_RETURN_NONE;
    if (self->plain_len > 0 && seal_plain(self, NULL, 0) < 0) PyErr_Clear();  /* senders' frames */
    if (self->closing) Py_RETURN_NONE;  /* (sealing them failed) */
    self->closing = 1;
    if (stop_reading(self) < 0) PyErr_Clear();
    (void)SSL_shutdown(self->ssl);  /* our close_notify, after what is buffered */
    ERR_clear_error();
    if (flush_sealed(self) < 0) {
        PyErr_Clear();
        force_close(self, NULL);
        Py_RETURN_NONE;
    }
    finish_close_if_drained(self);
    Py_RETURN_NONE;
}

static PyObject *tt_abort(TlsTransport *self, PyObject *unused) {
    force_close(self, NULL);
    Py_RETURN_NONE;
}

static PyObject *tt_is_closing(TlsTransport *self, PyObject *unused) {
    return PyBool_FromLong(self->closing);
}

static PyObject *tt_get_extra_info(TlsTransport *self, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"name", "default", NULL};
    PyObject *name, *dflt = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "U|O", names, &name, &dflt)) return NULL;
    PyObject *value = dflt;
    if (PyUnicode_CompareWithASCIIString(name, "peername") == 0) value = self->peername;
    else if (PyUnicode_CompareWithASCIIString(name, "sockname") == 0) {
        /* asked of no tunnel connection on its way: not a system call at every connect */
        PyObject *sockname = self->lost ? NULL : PyObject_CallMethod(self->sock, "getsockname", NULL);
        if (sockname != NULL) return sockname;
        PyErr_Clear();
    } else if (PyUnicode_CompareWithASCIIString(name, "socket") == 0) value = self->sock;
    else if (PyUnicode_CompareWithASCIIString(name, "ssl_object") == 0) value = self->ssl_object;
    if (value == NULL) value = dflt;
    Py_INCREF(value);
    return value;
}

static PyObject *tt_set_write_buffer_limits(TlsTransport *self, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"high", "low", NULL};
    PyObject *high = Py_None, *low = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|OO", names, &high, &low)) return NULL;
    Py_ssize_t h = 65536, l;
    if (high != Py_None) { h = PyNumber_AsSsize_t(high, PyExc_OverflowError); if (h == -1 && PyErr_Occurred()) return NULL; }
    else if (low != Py_None) { l = PyNumber_AsSsize_t(low, PyExc_OverflowError); if (l == -1 && PyErr_Occurred()) return NULL; h = 4 * l; }
    if (low != Py_None) { l = PyNumber_AsSsize_t(low, PyExc_OverflowError); if (l == -1 && PyErr_Occurred()) return NULL; }
    else l = h / 4;
    if (h < l || l < 0) { PyErr_Format(PyExc_ValueError, "high (%zd) must be >= low (%zd) must be >= 0", h, l); return NULL; }
    self->high = (size_t)h;
    self->low = (size_t)l;
    maybe_pause_protocol(self);
    Py_RETURN_NONE;
}

static PyObject *tt_get_write_buffer_size(TlsTransport *self, PyObject *unused) {
    return PyLong_FromSize_t(out_len(self) + self->plain_len);
}

static PyObject *tt_pause_reading(TlsTransport *self, PyObject *unused) {
    if (stop_reading(self) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *tt_resume_reading(TlsTransport *self, PyObject *unused) {
    if (self->closing || self->reading || !self->started) Py_RETURN_NONE;
    if (start_reading(self) < 0) return NULL;
    if (BIO_ctrl_pending(self->rbio) > 0 || SSL_pending(self->ssl) > 0) {
        PyObject *r = PyObject_CallMethod(self->loop, "call_soon", "O", self->read_cb);
        if (r == NULL) return NULL;
        Py_DECREF(r);
    }
    Py_RETURN_NONE;
}

static PyObject *tt_is_reading(TlsTransport *self, PyObject *unused) {
    return PyBool_FromLong(self->reading);
}

static PyObject *tt_can_write_eof(TlsTransport *self, PyObject *unused) { Py_RETURN_FALSE; }

static PyObject *tt_write_eof(TlsTransport *self, PyObject *unused) {
    PyErr_SetString(PyExc_NotImplementedError, "TLS does not half-close: close() sends close_notify");
    return NULL;
}

/* ------------------------------------------------------------------ the type */

static int tt_init(TlsTransport *self, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"loop", "sock", "ssl_object", "protocol", NULL};
    PyObject *loop, *sock, *ssl_object, *protocol;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOO", names, &loop, &sock, &ssl_object, &protocol))
        return -1;
    if (self->loop != NULL) { PyErr_SetString(PyExc_RuntimeError, "already initialised"); return -1; }
    PyObject *inner = PyObject_GetAttrString(ssl_object, "_sslobj");
    if (inner == NULL) return -1;
    if (strcmp(Py_TYPE(inner)->tp_name, "_ssl._SSLSocket") != 0) {
        PyErr_Format(PyExc_TypeError, "not an _ssl._SSLSocket: %s", Py_TYPE(inner)->tp_name);
        Py_DECREF(inner);
        return -1;
    }
    SSL *ssl = ((ssl_socket_head *)inner)->ssl;
    if (ssl == NULL || SSL_get_app_data(ssl) != (void *)inner) {
        PyErr_SetString(PyExc_TypeError, "_ssl._SSLSocket's layout is not the one known");
        Py_DECREF(inner);
        return -1;
    }
    BIO *rbio = SSL_get_rbio(ssl), *wbio = SSL_get_wbio(ssl);
    if (rbio == NULL || wbio == NULL || BIO_method_type(rbio) != BIO_TYPE_MEM
            || BIO_method_type(wbio) != BIO_TYPE_MEM) {
        PyErr_SetString(PyExc_TypeError, "the SSL object is not on memory BIOs");
        Py_DECREF(inner);
        return -1;
    }
    int fd = PyObject_AsFileDescriptor(sock);
    if (fd < 0) { Py_DECREF(inner); return -1; }
    /* As uvloop does for every TCP transport: frames are small and must not wait for the
     * peer's delayed ACK (Nagle). Not TCP (a test's socketpair): nothing to set. */
    int one = 1;
    (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    self->owner = inner;
    self->ssl = ssl;
    self->rbio = rbio;
    self->wbio = wbio;
    self->fd = fd;
    Py_INCREF(loop); self->loop = loop;
    Py_INCREF(sock); self->sock = sock;
    Py_INCREF(ssl_object); self->ssl_object = ssl_object;
    Py_INCREF(protocol); self->protocol = protocol;
    self->high = 65536;
    self->low = 16384;
    self->lanes = PyDict_New();
    if (self->lanes == NULL) return -1;
    self->lane_cap = 128 * 1024;
    self->burst_gap = BURST_GAP;
    self->peername = PyObject_CallMethod(sock, "getpeername", NULL);
    if (self->peername == NULL) PyErr_Clear();
    self->read_cb = PyObject_GetAttrString((PyObject *)self, "_read_ready");
    self->write_cb = PyObject_GetAttrString((PyObject *)self, "_write_ready");
    self->lost_cb = PyObject_GetAttrString((PyObject *)self, "_connection_lost");
    self->flush_cb = PyObject_GetAttrString((PyObject *)self, "_flush");
    self->call_soon = PyObject_GetAttrString(loop, "call_soon");
    if (self->read_cb == NULL || self->write_cb == NULL || self->lost_cb == NULL
            || self->flush_cb == NULL || self->call_soon == NULL)
        return -1;
    return 0;
}

static int tt_traverse(TlsTransport *self, visitproc visit, void *arg) {
    Py_VISIT(self->loop); Py_VISIT(self->sock); Py_VISIT(self->ssl_object); Py_VISIT(self->protocol);
    Py_VISIT(self->peername); Py_VISIT(self->data_received);
    Py_VISIT(self->read_cb); Py_VISIT(self->write_cb); Py_VISIT(self->lost_cb); Py_VISIT(self->owner);
    Py_VISIT(self->lanes); Py_VISIT(self->last_lane);
    Py_VISIT(self->call_soon); Py_VISIT(self->flush_cb);
    return 0;
}

static int tt_clear(TlsTransport *self) {
    Py_CLEAR(self->protocol); Py_CLEAR(self->data_received);
    Py_CLEAR(self->read_cb); Py_CLEAR(self->write_cb); Py_CLEAR(self->lost_cb);
    Py_CLEAR(self->peername);
    Py_CLEAR(self->lanes); Py_CLEAR(self->last_lane);
    Py_CLEAR(self->call_soon); Py_CLEAR(self->flush_cb);
    return 0;
}

static void tt_dealloc(TlsTransport *self) {
    PyObject_GC_UnTrack(self);
    tt_clear(self);
    Py_CLEAR(self->loop); Py_CLEAR(self->sock); Py_CLEAR(self->ssl_object); Py_CLEAR(self->owner);
    PyMem_Free(self->out);
    PyMem_Free(self->tail);
    PyMem_Free(self->plain);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef tt_methods[] = {
    {"start", (PyCFunction)tt_start, METH_NOARGS,
     "Call the protocol's connection_made, open what came with the handshake, start reading."},
    {"write", (PyCFunction)tt_write, METH_O, "Seal `data` as TLS records and send them."},
    {"writelines", (PyCFunction)tt_writelines, METH_O, "write() each chunk."},
    {"close", (PyCFunction)tt_close, METH_NOARGS,
     "Send what is buffered, then close_notify, then close; connection_lost(None) from the loop."},
    {"abort", (PyCFunction)tt_abort, METH_NOARGS, "Close now, dropping what is buffered."},
    {"is_closing", (PyCFunction)tt_is_closing, METH_NOARGS, NULL},
    {"get_extra_info", (PyCFunction)(void (*)(void))tt_get_extra_info, METH_VARARGS | METH_KEYWORDS,
     "peername, sockname, socket, ssl_object."},
    {"set_write_buffer_limits", (PyCFunction)(void (*)(void))tt_set_write_buffer_limits,
     METH_VARARGS | METH_KEYWORDS, NULL},
    {"get_write_buffer_size", (PyCFunction)tt_get_write_buffer_size, METH_NOARGS, NULL},
    {"pause_reading", (PyCFunction)tt_pause_reading, METH_NOARGS, NULL},
    {"resume_reading", (PyCFunction)tt_resume_reading, METH_NOARGS, NULL},
    {"is_reading", (PyCFunction)tt_is_reading, METH_NOARGS, NULL},
    {"can_write_eof", (PyCFunction)tt_can_write_eof, METH_NOARGS, NULL},
    {"write_eof", (PyCFunction)tt_write_eof, METH_NOARGS, NULL},
    {"_read_ready", (PyCFunction)read_ready, METH_NOARGS, NULL},
    {"_write_ready", (PyCFunction)write_ready, METH_NOARGS, NULL},
    {"_connection_lost", (PyCFunction)call_connection_lost, METH_O, NULL},
    {"_flush", (PyCFunction)tt_flush, METH_NOARGS, "Seal and send the senders' frames."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef tt_members[] = {
    {"lanes", T_OBJECT, offsetof(TlsTransport, lanes), READONLY,
     "stream id -> Lane: the streams whose DATA this transport delivers itself"},
    {"lane_cap", T_PYSSIZET, offsetof(TlsTransport, lane_cap), 0,
     "bytes all lanes may hold unreported together before every lane reports"},
    {"burst_gap", T_DOUBLE, offsetof(TlsTransport, burst_gap), 0,
     "seconds: a sender's write this soon after the last one waits for the iteration's end"},
    {"session_queued", T_BOOL, offsetof(TlsTransport, session_queued), 0,
     "the session has frames queued for its next write: senders hand their bytes to it"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject TlsTransportType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "agent.dataplane._tlsio.TlsTransport",
    .tp_basicsize = sizeof(TlsTransport),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "TlsTransport(loop, sock, ssl_object, protocol): a tunnel connection's TLS "
              "records and socket in C, as an asyncio transport; start() begins.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)tt_init,
    .tp_dealloc = (destructor)tt_dealloc,
    .tp_traverse = (traverseproc)tt_traverse,
    .tp_clear = (inquiry)tt_clear,
    .tp_methods = tt_methods,
    .tp_members = tt_members,
};

/* ------------------------------------------------------------------ Lane */

static int lane_init(Lane *self, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"stream_id", "feed", "write", "is_closing", "news", "synced",
                            "report_at", NULL};
    unsigned long stream_id;
    unsigned long long report_at = 0;
    PyObject *feed, *write, *is_closing, *news, *synced;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "kOOOOO|K", names, &stream_id, &feed, &write,
                                     &is_closing, &news, &synced, &report_at))
        return -1;
    if ((feed != Py_None && !PyCallable_Check(feed)) || !PyCallable_Check(write)
            || !PyCallable_Check(is_closing) || !PyCallable_Check(news) || !PyCallable_Check(synced)) {
        PyErr_SetString(PyExc_TypeError, "a Lane's feed (or None), write, is_closing, news and synced are callables");
        return -1;
    }
    self->stream_id = stream_id;
    self->report_at = report_at;
    Py_INCREF(feed); Py_XSETREF(self->feed, feed);
    Py_INCREF(write); Py_XSETREF(self->write, write);
    Py_INCREF(is_closing); Py_XSETREF(self->is_closing, is_closing);
    Py_INCREF(news); Py_XSETREF(self->news, news);
    Py_INCREF(synced); Py_XSETREF(self->synced, synced);
    self->active = 1;
    return 0;
}

static int lane_traverse(Lane *self, visitproc visit, void *arg) {
    Py_VISIT(self->feed); Py_VISIT(self->write); Py_VISIT(self->is_closing);
    Py_VISIT(self->news); Py_VISIT(self->synced);
    return 0;
}

static int lane_clear(Lane *self) {
    Py_CLEAR(self->feed); Py_CLEAR(self->write); Py_CLEAR(self->is_closing);
    Py_CLEAR(self->news); Py_CLEAR(self->synced);
    return 0;
}

static void lane_dealloc(Lane *self) {
    PyObject_GC_UnTrack(self);
    lane_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *lane_off(Lane *self, PyObject *unused) {
    self->active = 0;
    Py_RETURN_NONE;
}

static PyObject *lane_take(Lane *self, PyObject *unused) {
    PyObject *counts = Py_BuildValue("(KK)", self->received, self->chunks);
    if (counts != NULL) self->received = self->chunks = self->last = 0;
    return counts;
}

static PyObject *lane_get_active(Lane *self, void *unused) { return PyBool_FromLong(self->active); }

static PyObject *lane_get_pending(Lane *self, void *unused) {
    return PyLong_FromUnsignedLongLong(self->received);
}

static PyObject *lane_get_delivered(Lane *self, void *unused) {
    return PyLong_FromUnsignedLongLong(self->delivered);
}

static PyMethodDef lane_methods[] = {
    {"off", (PyCFunction)lane_off, METH_NOARGS,
     "Deliver no more: the stream's next frames go to the session (counts not yet reported are)."},
    {"take", (PyCFunction)lane_take, METH_NOARGS,
     "(bytes, frames) delivered and not reported yet, now reported to the caller."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef lane_getset[] = {
    {"active", (getter)lane_get_active, NULL, "frames are delivered here", NULL},
    {"pending", (getter)lane_get_pending, NULL, "bytes delivered, not yet reported", NULL},
    {"delivered", (getter)lane_get_delivered, NULL, "DATA frames delivered, in all", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject LaneType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "agent.dataplane._tlsio.Lane",
    .tp_basicsize = sizeof(Lane),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Lane(stream_id, feed, write, is_closing, news, synced, report_at=0): a stream "
              "whose DATA frames the transport delivers itself (registered in TlsTransport.lanes).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)lane_init,
    .tp_dealloc = (destructor)lane_dealloc,
    .tp_traverse = (traverseproc)lane_traverse,
    .tp_clear = (inquiry)lane_clear,
    .tp_methods = lane_methods,
    .tp_getset = lane_getset,
};

/* ------------------------------------------------------------------ Sender */

/* The engine's send side: one tunnel stream's writes framed here. The session hands a sender
 * credit out of the stream's and the connection's send windows (counted as sent there: the
 * peer's windows are never exceeded); while it lasts, a write becomes DATA frames in the
 * transport's plaintext, sealed with every other sender's at the end of the loop iteration.
 * Anything else — no credit left, the session holding frames of its own, the transport paused
 * or closing, the sender taken off — goes to the stream's own write (Python), which takes the
 * sender's credit back first. */
typedef struct {
    PyObject_HEAD
    TlsTransport *transport;
    PyObject *fallback, *fallback_closing;  /* the stream's write and is_closing */
    unsigned long long credit;   /* bytes it may still send */
    unsigned long long frames;   /* DATA frames it sent, in all */
    unsigned long long sent;     /* bytes it sent since it was last taken off */
    unsigned long stream_id;
    char active;
} Sender;

static PyTypeObject SenderType;

static void put_be32(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)(v >> 24); p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8); p[3] = (unsigned char)v;
}

/* `n` bytes as DATA frames of the sender's stream at `to` (room for them and their headers). */
static size_t put_frames(Sender *self, char *to, const char *from, size_t n) {
    size_t at = 0;
    for (size_t left = n; left > 0; ) {
        size_t length = left > MAX_FRAME_PAYLOAD ? MAX_FRAME_PAYLOAD : left;
        unsigned char *h = (unsigned char *)to + at;
        h[0] = FRAME_VERSION; h[1] = FRAME_DATA; h[2] = 0; h[3] = 0;
        put_be32(h + 4, (uint32_t)self->stream_id);
        put_be32(h + 8, (uint32_t)length);
        memcpy(h + FRAME_HEADER, from, length);
        at += FRAME_HEADER + length;
        from += length;
        left -= length;
        self->frames += 1;
    }
    self->credit -= (unsigned long long)n;
    self->sent += (unsigned long long)n;
    return at;
}

static PyObject *sender_write(Sender *self, PyObject *data) {
    TlsTransport *t = self->transport;
    Py_ssize_t n = PyBytes_CheckExact(data) ? PyBytes_GET_SIZE(data) : 0;
    if (!self->active || n == 0 || (unsigned long long)n > self->credit || t->closing
            || t->protocol_paused || t->session_queued || t->flush_cb == NULL)
        return PyObject_CallOneArg(self->fallback, data);
    /* Alone (no other sender wrote in the last `burst_gap`: a paced request) it leaves now,
     * staged on the stack when small (a quiet connection keeps no buffer); in a burst, with
     * the others at the end of the loop iteration, in the same records. */
    double now = monotonic_now(), last = t->last_send;
    t->last_send = now;
    int alone = !t->flush_scheduled && now - last >= t->burst_gap;
    if (alone && n <= ALONE_STAGE) {
        char stage[FRAME_HEADER + ALONE_STAGE];
        size_t size = put_frames(self, stage, PyBytes_AS_STRING(data), (size_t)n);
        if (seal(t, stage, size) < 0) return NULL;
        Py_RETURN_NONE;
    }
    size_t frames = ((size_t)n + MAX_FRAME_PAYLOAD - 1) / MAX_FRAME_PAYLOAD;
    if (plain_room(t, (size_t)n + frames * FRAME_HEADER) < 0) return NULL;
    t->plain_len += put_frames(self, t->plain + t->plain_len, PyBytes_AS_STRING(data), (size_t)n);
    if (alone || t->plain_len >= PLAIN_FLUSH) {
        if (seal_plain(t, NULL, 0) < 0) return NULL;
        Py_RETURN_NONE;
    }
    if (t->flush_scheduled) Py_RETURN_NONE;
    PyObject *handle = PyObject_CallOneArg(t->call_soon, t->flush_cb);
    if (handle == NULL) return NULL;
    Py_DECREF(handle);
    t->flush_scheduled = 1;
    Py_RETURN_NONE;
}

static PyObject *sender_is_closing(Sender *self, PyObject *unused) {
    if (self->active && !self->transport->closing) Py_RETURN_FALSE;  /* closing takes it off */
    return PyObject_CallNoArgs(self->fallback_closing);
}

static PyObject *sender_grant(Sender *self, PyObject *credit) {
    unsigned long long n = PyLong_AsUnsignedLongLong(credit);
    if (n == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    self->credit += n;
    self->active = 1;
    Py_RETURN_NONE;
}

static PyObject *sender_take(Sender *self, PyObject *unused) {
    PyObject *taken = Py_BuildValue("(KK)", self->credit, self->sent);
    if (taken == NULL) return NULL;
    self->credit = self->sent = 0;
    self->active = 0;
    return taken;
}

static int sender_init(Sender *self, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"transport", "stream_id", "write", "is_closing", NULL};
    PyObject *transport, *write, *is_closing;
    unsigned long stream_id;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!kOO", names, &TlsTransportType, &transport,
                                     &stream_id, &write, &is_closing))
        return -1;
    if (!PyCallable_Check(write) || !PyCallable_Check(is_closing)) {
        PyErr_SetString(PyExc_TypeError, "a Sender's write and is_closing are callables");
        return -1;
    }
    if (stream_id > 0xffffffffUL) { PyErr_SetString(PyExc_ValueError, "stream id over 32 bits"); return -1; }
    Py_INCREF(transport); Py_XSETREF(self->transport, (TlsTransport *)transport);
    Py_INCREF(write); Py_XSETREF(self->fallback, write);
    Py_INCREF(is_closing); Py_XSETREF(self->fallback_closing, is_closing);
    self->stream_id = stream_id;
    self->credit = 0;
    self->active = 0;
    return 0;
}

static int sender_traverse(Sender *self, visitproc visit, void *arg) {
    Py_VISIT(self->transport); Py_VISIT(self->fallback); Py_VISIT(self->fallback_closing);
    return 0;
}

static int sender_clear(Sender *self) {
    Py_CLEAR(self->transport); Py_CLEAR(self->fallback); Py_CLEAR(self->fallback_closing);
    self->active = 0;
    return 0;
}

static void sender_dealloc(Sender *self) {
    PyObject_GC_UnTrack(self);
    sender_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *sender_get_active(Sender *self, void *unused) { return PyBool_FromLong(self->active); }
static PyObject *sender_get_credit(Sender *self, void *unused) { return PyLong_FromUnsignedLongLong(self->credit); }
static PyObject *sender_get_frames(Sender *self, void *unused) { return PyLong_FromUnsignedLongLong(self->frames); }
static PyObject *sender_get_sent(Sender *self, void *unused) { return PyLong_FromUnsignedLongLong(self->sent); }

static PyMethodDef sender_methods[] = {
    {"write", (PyCFunction)sender_write, METH_O,
     "DATA frames within the credit: sealed at once if alone, at the iteration's end in a burst; "
     "else the stream's write."},
    {"is_closing", (PyCFunction)sender_is_closing, METH_NOARGS, NULL},
    {"grant", (PyCFunction)sender_grant, METH_O, "More credit (taken from the windows): active."},
    {"take", (PyCFunction)sender_take, METH_NOARGS,
     "Off: (the credit not used, the bytes sent) since it was last taken off."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef sender_getset[] = {
    {"active", (getter)sender_get_active, NULL, "writes are framed here", NULL},
    {"credit", (getter)sender_get_credit, NULL, "bytes it may still send", NULL},
    {"frames", (getter)sender_get_frames, NULL, "DATA frames it sent, in all", NULL},
    {"sent", (getter)sender_get_sent, NULL, "bytes it sent since it was last taken off", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject SenderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "agent.dataplane._tlsio.Sender",
    .tp_basicsize = sizeof(Sender),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Sender(transport, stream_id, write, is_closing): a stream's writes framed and "
              "sealed by its TlsTransport while it has credit (grant); else write(data).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)sender_init,
    .tp_dealloc = (destructor)sender_dealloc,
    .tp_traverse = (traverseproc)sender_traverse,
    .tp_clear = (inquiry)sender_clear,
    .tp_methods = sender_methods,
    .tp_getset = sender_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "agent.dataplane._tlsio",
    "The mesh tunnel's TLS connection as one C transport (csrc/tlsio.c).", -1, NULL,
};

PyMODINIT_FUNC PyInit__tlsio(void) {
    if (PyType_Ready(&TlsTransportType) < 0 || PyType_Ready(&LaneType) < 0
            || PyType_Ready(&SenderType) < 0)
        return NULL;
    PyObject *ssl = PyImport_ImportModule("ssl");
    if (ssl == NULL) return NULL;
    /* The SSL* is `_ssl`'s: the same OpenSSL must be the one linked here. */
    PyObject *number = PyObject_GetAttrString(ssl, "OPENSSL_VERSION_NUMBER");
    unsigned long theirs = number ? PyLong_AsUnsignedLong(number) : 0;
    Py_XDECREF(number);
    if (PyErr_Occurred() || theirs != OpenSSL_version_num()) {
        PyErr_Clear();
        Py_DECREF(ssl);
        PyErr_Format(PyExc_ImportError, "the ssl module runs OpenSSL %lx, this extension %lx",
                     theirs, OpenSSL_version_num());
        return NULL;
    }
    SSLError = PyObject_GetAttrString(ssl, "SSLError");
    Py_DECREF(ssl);
    if (SSLError == NULL) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&TlsTransportType);
    if (PyModule_AddObject(m, "TlsTransport", (PyObject *)&TlsTransportType) < 0) {
        Py_DECREF(&TlsTransportType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&LaneType);
    if (PyModule_AddObject(m, "Lane", (PyObject *)&LaneType) < 0) {
        Py_DECREF(&LaneType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&SenderType);
    if (PyModule_AddObject(m, "Sender", (PyObject *)&SenderType) < 0) {
        Py_DECREF(&SenderType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
