/* agent.dataplane._podio: a pod's sockets as C transports, and its listeners' accepts (issue #16).
 *
 * `PodTransport` is an asyncio transport for one connected, non-blocking TCP socket: the
 * upstream a relay opens from inside the pod's network namespace (agent/dataplane/relay.py,
 * `PlainUpstream`), or a connection the pod's 15001/15006 accepted (`PodAcceptor`, below;
 * agent/dataplane/listening.py). uvloop's TCP transport for the same socket is made by a coroutine
 * (`create_connection`: a future, a connection_made one loop iteration later, the transport
 * kept in a weak dictionary, a Python socket object made for each `get_extra_info("socket")`)
 * and costs a good part of a new connection's Python; this one is made by its constructor,
 * and the caller calls `protocol.connection_made` itself, at once. Readiness comes from the
 * event loop's `add_reader`/`add_writer` (C methods as callbacks: no Python frame), as for
 * the tunnel's `TlsTransport` (csrc/tlsio.c).
 *
 * asyncio's semantics, the parts the relay uses: `write` sends at once, keeping what the
 * socket does not take until it is writable, with pause_writing above the high-water mark and
 * resume_writing at the low one; `write_eof` shuts the writing half once the buffer is out;
 * `close` stops reading, sends what is buffered, then closes; `abort` drops it; EOF is
 * `eof_received` (a false answer closes); a socket error ends the connection with
 * `connection_lost(exc)` (an OSError subclass carrying errno). connection_lost is called once,
 * from the loop (call_soon), and the socket object is closed after it (an armed SO_LINGER
 * makes that close an RST). A protocol callback that raises is reported to the loop's
 * exception handler and ends the connection. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <unistd.h>

#define READ_SIZE 65536        /* bytes read per readiness callback (on the stack) */
#define DEFAULT_HIGH 65536     /* asyncio's default high-water mark */
#define KEEP_CAPACITY 65536    /* an emptied output buffer larger than this is freed */

typedef struct {
    PyObject_HEAD
    PyObject *loop, *sock, *protocol;
    PyObject *data_received;        /* protocol.data_received, bound once */
    PyObject *read_cb, *write_cb, *lost_cb;  /* our own bound methods; dropped once lost */
    PyObject *peername, *sockname;  /* asked once */
    int fd;
    char *out;
    size_t out_start, out_end, out_cap;
    size_t high, low;
    char started, paused, reading, writing, closing, eof_wanted, eof_sent;
    char read_eof;                  /* the peer's FIN came: nothing more to read, ever */
    char lost_scheduled, lost, protocol_paused;
} PodTransport;

static size_t out_len(PodTransport *self) { return self->out_end - self->out_start; }

/* ------------------------------------------------------------------ loop calls */

static int loop_call(PodTransport *self, const char *method, PyObject *cb) {
    PyObject *r = cb == NULL
        ? PyObject_CallMethod(self->loop, method, "i", self->fd)
        : PyObject_CallMethod(self->loop, method, "iO", self->fd, cb);
    if (r == NULL) return -1;
    Py_DECREF(r);
    return 0;
}

static int start_reading(PodTransport *self) {
    if (self->reading || self->closing || self->paused || !self->started || self->read_eof
            || self->read_cb == NULL)
        return 0;
    if (loop_call(self, "add_reader", self->read_cb) < 0) return -1;
    self->reading = 1;
    return 0;
}

static int stop_reading(PodTransport *self) {
    if (!self->reading) return 0;
    self->reading = 0;
    return loop_call(self, "remove_reader", NULL);
}

static int start_writing(PodTransport *self) {
    if (self->writing || self->write_cb == NULL) return 0;
    if (loop_call(self, "add_writer", self->write_cb) < 0) return -1;
    self->writing = 1;
    return 0;
}

static int stop_writing(PodTransport *self) {
    if (!self->writing) return 0;
    self->writing = 0;
    return loop_call(self, "remove_writer", NULL);
}

/* A protocol callback raised: asyncio's "Fatal error" report to the loop's handler. */
static void report(PodTransport *self, const char *message) {
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
static void force_close(PodTransport *self, PyObject *exc) {
    self->closing = 1;
    if (stop_reading(self) < 0) PyErr_Clear();
    if (stop_writing(self) < 0) PyErr_Clear();
    self->out_start = self->out_end = 0;
    if (self->lost_scheduled || self->lost_cb == NULL) return;
    self->lost_scheduled = 1;
    PyObject *r = PyObject_CallMethod(self->loop, "call_soon", "OO", self->lost_cb, exc ? exc : Py_None);
    if (r == NULL) PyErr_Clear();
    Py_XDECREF(r);
}

/* The pending Python error (a socket error) ends the connection with it. */
static void fail_with_error(PodTransport *self) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    force_close(self, value);
    Py_XDECREF(type); Py_XDECREF(value); Py_XDECREF(tb);
}

/* A protocol callback raised: reported, and the connection ends with the exception. -1. */
static int callback_failed(PodTransport *self, const char *message) {
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

/* ------------------------------------------------------------------ output */

static int reserve(PodTransport *self, size_t more) {
    size_t used = out_len(self);
    if (used == 0) {
        self->out_start = self->out_end = 0;
    } else if (self->out_start > 0 && self->out_end + more > self->out_cap) {
        memmove(self->out, self->out + self->out_start, used);
        self->out_start = 0; self->out_end = used;
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

static void maybe_pause_protocol(PodTransport *self) {
    if (self->protocol_paused || out_len(self) <= self->high || self->protocol == NULL) return;
    self->protocol_paused = 1;
    PyObject *r = PyObject_CallMethod(self->protocol, "pause_writing", NULL);
    if (r == NULL) report(self, "protocol.pause_writing() failed");
    Py_XDECREF(r);
}

static void maybe_resume_protocol(PodTransport *self) {
    if (!self->protocol_paused || out_len(self) > self->low || self->protocol == NULL) return;
    self->protocol_paused = 0;
    PyObject *r = PyObject_CallMethod(self->protocol, "resume_writing", NULL);
    if (r == NULL) report(self, "protocol.resume_writing() failed");
    Py_XDECREF(r);
}

static void shut_writing(PodTransport *self) {
    self->eof_wanted = 0;
    self->eof_sent = 1;
    if (shutdown(self->fd, SHUT_WR) < 0 && errno != ENOTCONN) {
        PyErr_SetFromErrno(PyExc_OSError);
        fail_with_error(self);
    }
}

/* Everything buffered is out: the FIN asked for, or the close. */
static void drained(PodTransport *self) {
    if (self->out_cap > KEEP_CAPACITY) {
        PyMem_Free(self->out);
        self->out = NULL;
        self->out_cap = 0;
    }
    self->out_start = self->out_end = 0;
    if (self->closing) {
        force_close(self, NULL);
        return;
    }
    if (self->eof_wanted) shut_writing(self);
}

/* `n` bytes to the socket: what it takes now, the rest buffered until it is writable. 0, or
 * -1 with a Python error set (out of memory); a socket error ends the connection (0). */
static int send_or_buffer(PodTransport *self, const char *data, size_t n) {
    size_t sent = 0;
    if (out_len(self) == 0) {
        ssize_t r = send(self->fd, data, n, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (r < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
                PyErr_SetFromErrno(PyExc_OSError);
                fail_with_error(self);
                return 0;
            }
        } else {
            sent = (size_t)r;
        }
    }
    if (sent < n) {
        if (reserve(self, n - sent) < 0) return -1;
        memcpy(self->out + self->out_end, data + sent, n - sent);
        self->out_end += n - sent;
        if (start_writing(self) < 0) return -1;
        maybe_pause_protocol(self);
    }
    return 0;
}

static PyObject *write_ready(PodTransport *self, PyObject *unused) {
    if (self->lost_scheduled) Py_RETURN_NONE;
    while (out_len(self) > 0) {
        ssize_t r = send(self->fd, self->out + self->out_start, out_len(self), MSG_NOSIGNAL | MSG_DONTWAIT);
        if (r < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            PyErr_SetFromErrno(PyExc_OSError);
            fail_with_error(self);
            Py_RETURN_NONE;
        }
        self->out_start += (size_t)r;
    }
    maybe_resume_protocol(self);
    if (out_len(self) == 0 && !self->lost_scheduled) {
        if (stop_writing(self) < 0) return NULL;
        drained(self);
    }
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------ input */

static PyObject *read_ready(PodTransport *self, PyObject *unused) {
    if (!self->reading || self->closing) Py_RETURN_NONE;
    char buffer[READ_SIZE];
    ssize_t n = recv(self->fd, buffer, sizeof buffer, 0);
    if (n > 0) {
        PyObject *chunk = PyBytes_FromStringAndSize(buffer, n);
        if (chunk == NULL) { report(self, "out of memory for received data"); force_close(self, NULL); Py_RETURN_NONE; }
        PyObject *r = PyObject_CallOneArg(self->data_received, chunk);
        Py_DECREF(chunk);
        if (r == NULL) callback_failed(self, "Fatal error: protocol.data_received() call failed.");
        Py_XDECREF(r);
        Py_RETURN_NONE;
    }
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) Py_RETURN_NONE;
        PyErr_SetFromErrno(PyExc_OSError);
        fail_with_error(self);
        Py_RETURN_NONE;
    }
    /* the peer's FIN: no more reading (a resume_reading later does not ask again); the
     * protocol says whether our half stays open */
    self->read_eof = 1;
    if (stop_reading(self) < 0) return NULL;
    PyObject *r = PyObject_CallMethod(self->protocol, "eof_received", NULL);
    if (r == NULL) {
        callback_failed(self, "Fatal error: protocol.eof_received() call failed.");
        Py_RETURN_NONE;
    }
    int keep = PyObject_IsTrue(r);
    Py_DECREF(r);
    if (keep < 0) { callback_failed(self, "Fatal error: protocol.eof_received() answer"); Py_RETURN_NONE; }
    if (!keep && !self->closing) {
        self->closing = 1;
        if (out_len(self) == 0) force_close(self, NULL);
    }
    Py_RETURN_NONE;
}

/* connection_lost(exc), from the loop: once; then the socket is closed and the transport lets
 * go of the protocol and of its own callbacks (no cycle is left for the collector). */
static PyObject *call_connection_lost(PodTransport *self, PyObject *exc) {
    if (self->lost) Py_RETURN_NONE;
    self->lost = 1;
    self->reading = self->writing = 0;  /* force_close removed both */
    PyObject *protocol = self->protocol;
    self->protocol = NULL;
    PyObject *r = protocol ? PyObject_CallMethod(protocol, "connection_lost", "O", exc) : NULL;
    if (protocol != NULL && r == NULL) {
        PyObject *saved = self->protocol;
        self->protocol = protocol;  /* named in the report */
        report(self, "Fatal error: protocol.connection_lost() call failed.");
        self->protocol = saved;
    }
    Py_XDECREF(r);
    Py_XDECREF(protocol);
    PyObject *closed = PyObject_CallMethod(self->sock, "close", NULL);
    if (closed == NULL) PyErr_Clear();
    Py_XDECREF(closed);
    Py_CLEAR(self->data_received);
    Py_CLEAR(self->read_cb);
    Py_CLEAR(self->write_cb);
    Py_CLEAR(self->lost_cb);
    PyMem_Free(self->out);
    self->out = NULL;
    self->out_cap = self->out_start = self->out_end = 0;
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------ transport API */

static PyObject *pt_start(PodTransport *self, PyObject *unused) {
    self->started = 1;
    if (start_reading(self) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *pt_write(PodTransport *self, PyObject *data) {
    if (self->eof_wanted || self->eof_sent) {
        PyErr_SetString(PyExc_RuntimeError, "Cannot call write() after write_eof()");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0) return NULL;
    int r = 0;
    if (!self->closing && !self->lost_scheduled && view.len > 0)
        r = send_or_buffer(self, view.buf, (size_t)view.len);
    PyBuffer_Release(&view);
    if (r < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *pt_writelines(PodTransport *self, PyObject *chunks) {
    PyObject *it = PyObject_GetIter(chunks);
    if (it == NULL) return NULL;
    PyObject *chunk;
    while ((chunk = PyIter_Next(it)) != NULL) {
        PyObject *r = pt_write(self, chunk);
        Py_DECREF(chunk);
        if (r == NULL) { Py_DECREF(it); return NULL; }
        Py_DECREF(r);
    }
    Py_DECREF(it);
    if (PyErr_Occurred()) return NULL;
    Py_RETURN_NONE;
}

static PyObject *pt_write_eof(PodTransport *self, PyObject *unused) {
    if (self->closing || self->eof_sent || self->eof_wanted) Py_RETURN_NONE;
    if (out_len(self) > 0) self->eof_wanted = 1;
    else shut_writing(self);
    Py_RETURN_NONE;
}

static PyObject *pt_can_write_eof(PodTransport *self, PyObject *unused) { Py_RETURN_TRUE; }

static PyObject *pt_close(PodTransport *self, PyObject *unused) {
    if (self->closing) Py_RETURN_NONE;
    self->closing = 1;
    if (stop_reading(self) < 0) PyErr_Clear();
    if (out_len(self) == 0) force_close(self, NULL);
    Py_RETURN_NONE;
}

static PyObject *pt_abort(PodTransport *self, PyObject *unused) {
    force_close(self, NULL);
    Py_RETURN_NONE;
}

static PyObject *pt_is_closing(PodTransport *self, PyObject *unused) {
    return PyBool_FromLong(self->closing);
}

static PyObject *pt_pause_reading(PodTransport *self, PyObject *unused) {
    self->paused = 1;
    if (stop_reading(self) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *pt_resume_reading(PodTransport *self, PyObject *unused) {
    self->paused = 0;
    if (start_reading(self) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *pt_is_reading(PodTransport *self, PyObject *unused) {
    return PyBool_FromLong(!self->paused && !self->closing);
}

static PyObject *sock_info(PodTransport *self, PyObject **cache, const char *method) {
    if (*cache == NULL) {
        *cache = PyObject_CallMethod(self->sock, method, NULL);
        if (*cache == NULL) { PyErr_Clear(); return NULL; }
    }
    Py_INCREF(*cache);
    return *cache;
}

static PyObject *pt_get_extra_info(PodTransport *self, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"name", "default", NULL};
    const char *name;
    PyObject *fallback = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "s|O", names, &name, &fallback)) return NULL;
    PyObject *value = NULL;
    if (strcmp(name, "socket") == 0) { value = self->sock; Py_INCREF(value); }
    else if (strcmp(name, "peername") == 0) value = sock_info(self, &self->peername, "getpeername");
    else if (strcmp(name, "sockname") == 0) value = sock_info(self, &self->sockname, "getsockname");
    if (value != NULL) return value;
    Py_INCREF(fallback);
    return fallback;
}

static PyObject *pt_set_write_buffer_limits(PodTransport *self, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"high", "low", NULL};
    PyObject *high = Py_None, *low = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|OO", names, &high, &low)) return NULL;
    Py_ssize_t h, l;
    if (high == Py_None) {
        if (low == Py_None) h = DEFAULT_HIGH;
        else { l = PyLong_AsSsize_t(low); if (l == -1 && PyErr_Occurred()) return NULL; h = 4 * l; }
    } else {
        h = PyLong_AsSsize_t(high);
        if (h == -1 && PyErr_Occurred()) return NULL;
    }
    if (low == Py_None) l = h / 4;
    else { l = PyLong_AsSsize_t(low); if (l == -1 && PyErr_Occurred()) return NULL; }
    if (h < l || l < 0) {
        PyErr_Format(PyExc_ValueError, "high (%zd) must be >= low (%zd) must be >= 0", h, l);
        return NULL;
    }
    self->high = (size_t)h;
    self->low = (size_t)l;
    maybe_pause_protocol(self);
    Py_RETURN_NONE;
}

static PyObject *pt_get_write_buffer_size(PodTransport *self, PyObject *unused) {
    return PyLong_FromSize_t(out_len(self));
}

/* A socket object's descriptor (`sock.fileno()`); -1 with an exception set (closed: ValueError). */
static int socket_fd(PyObject *sock) {
    PyObject *fileno = PyObject_CallMethod(sock, "fileno", NULL);
    if (fileno == NULL) return -1;
    int fd = (int)PyLong_AsLong(fileno);
    Py_DECREF(fileno);
    if (fd < 0 && !PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "the socket is closed");
    return fd < 0 ? -1 : fd;
}

static int pt_init(PodTransport *self, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"loop", "sock", "protocol", NULL};
    PyObject *loop, *sock, *protocol;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO", names, &loop, &sock, &protocol)) return -1;
    if (self->loop != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "PodTransport is initialised once");
        return -1;
    }
    int fd = socket_fd(sock);
    if (fd < 0) return -1;
    int one = 1;  /* as uvloop's TCP transports: no Nagle delay on the relay's small writes */
    if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) < 0 && errno != EOPNOTSUPP) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    self->data_received = PyObject_GetAttrString(protocol, "data_received");
    if (self->data_received == NULL) return -1;
    self->read_cb = PyObject_GetAttrString((PyObject *)self, "_read_ready");
    self->write_cb = PyObject_GetAttrString((PyObject *)self, "_write_ready");
    self->lost_cb = PyObject_GetAttrString((PyObject *)self, "_call_connection_lost");
    if (self->read_cb == NULL || self->write_cb == NULL || self->lost_cb == NULL) return -1;
    Py_INCREF(loop); self->loop = loop;
    Py_INCREF(sock); self->sock = sock;
    Py_INCREF(protocol); self->protocol = protocol;
    self->fd = fd;
    self->high = DEFAULT_HIGH;
    self->low = DEFAULT_HIGH / 4;
    return 0;
}

static int pt_traverse(PodTransport *self, visitproc visit, void *arg) {
    Py_VISIT(self->loop); Py_VISIT(self->sock); Py_VISIT(self->protocol);
    Py_VISIT(self->data_received); Py_VISIT(self->read_cb); Py_VISIT(self->write_cb);
    Py_VISIT(self->lost_cb); Py_VISIT(self->peername); Py_VISIT(self->sockname);
    return 0;
}

static int pt_clear(PodTransport *self) {
    Py_CLEAR(self->protocol); Py_CLEAR(self->data_received); Py_CLEAR(self->read_cb);
    Py_CLEAR(self->write_cb); Py_CLEAR(self->lost_cb); Py_CLEAR(self->peername);
    Py_CLEAR(self->sockname); Py_CLEAR(self->sock); Py_CLEAR(self->loop);
    return 0;
}

static void pt_dealloc(PodTransport *self) {
    PyObject_GC_UnTrack(self);
    pt_clear(self);
    PyMem_Free(self->out);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef pt_methods[] = {
    {"start", (PyCFunction)pt_start, METH_NOARGS,
     "Start reading (after the protocol's connection_made, unless it paused reading)."},
    {"write", (PyCFunction)pt_write, METH_O, NULL},
    {"writelines", (PyCFunction)pt_writelines, METH_O, NULL},
    {"write_eof", (PyCFunction)pt_write_eof, METH_NOARGS, NULL},
    {"can_write_eof", (PyCFunction)pt_can_write_eof, METH_NOARGS, NULL},
    {"close", (PyCFunction)pt_close, METH_NOARGS, NULL},
    {"abort", (PyCFunction)pt_abort, METH_NOARGS, NULL},
    {"is_closing", (PyCFunction)pt_is_closing, METH_NOARGS, NULL},
    {"pause_reading", (PyCFunction)pt_pause_reading, METH_NOARGS, NULL},
    {"resume_reading", (PyCFunction)pt_resume_reading, METH_NOARGS, NULL},
    {"is_reading", (PyCFunction)pt_is_reading, METH_NOARGS, NULL},
    {"get_extra_info", (PyCFunction)(void (*)(void))pt_get_extra_info, METH_VARARGS | METH_KEYWORDS, NULL},
    {"set_write_buffer_limits", (PyCFunction)(void (*)(void))pt_set_write_buffer_limits,
     METH_VARARGS | METH_KEYWORDS, NULL},
    {"get_write_buffer_size", (PyCFunction)pt_get_write_buffer_size, METH_NOARGS, NULL},
    {"_read_ready", (PyCFunction)read_ready, METH_NOARGS, NULL},
    {"_write_ready", (PyCFunction)write_ready, METH_NOARGS, NULL},
    {"_call_connection_lost", (PyCFunction)call_connection_lost, METH_O, NULL},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject PodTransportType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "agent.dataplane._podio.PodTransport",
    .tp_doc = "PodTransport(loop, sock, protocol): a connected non-blocking TCP socket as an "
              "asyncio transport; the caller calls protocol.connection_made(transport), then "
              "start().",
    .tp_basicsize = sizeof(PodTransport),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)pt_init,
    .tp_dealloc = (destructor)pt_dealloc,
    .tp_traverse = (traverseproc)pt_traverse,
    .tp_clear = (inquiry)pt_clear,
    .tp_methods = pt_methods,
};

/* ------------------------------------------------------------------ accepting */

/* `PodAcceptor(loop, sock, factory, on_error)`: a pod's listener (15001, 15006) served from C.
 * On readiness (`_accept_ready`, the loop's add_reader callback) it accepts up to
 * ACCEPT_BATCH connections; each becomes a `PodTransport` on a bare `_socket.socket`, its
 * protocol made by `factory()` and told `connection_made` at once (uvloop's server calls it
 * one loop iteration later, after making its own transport and tracking it), then reading
 * starts unless the protocol paused it. An accept that fails for want of descriptors or
 * memory stops accepting and calls `on_error(exc)` (the caller retries later, as asyncio's
 * servers do); anything else that fails is reported, and that one connection closed. */

#define ACCEPT_BATCH 32

typedef struct {
    PyObject_HEAD
    PyObject *loop, *sock, *factory, *on_error, *ready_cb;
    int fd, family;
    char serving;
} PodAcceptor;

static PyObject *BareSocket;  /* _socket.socket */

static void acceptor_report(PodAcceptor *self, const char *message) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (value == NULL) { Py_XDECREF(type); Py_XDECREF(tb); return; }
    PyObject *context = Py_BuildValue("{s:s,s:O,s:O}", "message", message, "exception", value,
                                      "socket", self->sock);
    if (context != NULL) {
        PyObject *r = PyObject_CallMethod(self->loop, "call_exception_handler", "O", context);
        Py_XDECREF(r);
        Py_DECREF(context);
    }
    PyErr_Clear();
    Py_XDECREF(type); Py_XDECREF(value); Py_XDECREF(tb);
}

/* One accepted descriptor: its transport and protocol (a failure is reported and that
 * connection closed). */
static void adopt(PodAcceptor *self, int fd) {
    PyObject *sock = PyObject_CallFunction(BareSocket, "iiii", self->family, SOCK_STREAM, 0, fd);
    if (sock == NULL) {
        close(fd);
        acceptor_report(self, "accepted connection: no socket object");
        return;
    }
    PyObject *protocol = PyObject_CallNoArgs(self->factory);
    if (protocol == NULL) {
        acceptor_report(self, "accepted connection: the protocol factory failed");
        PyObject *r = PyObject_CallMethod(sock, "close", NULL);
        Py_XDECREF(r); PyErr_Clear();
        Py_DECREF(sock);
        return;
    }
    PyObject *transport = PyObject_CallFunctionObjArgs((PyObject *)&PodTransportType, self->loop,
                                                       sock, protocol, NULL);
    if (transport == NULL) {
        acceptor_report(self, "accepted connection: no transport");
        PyObject *r = PyObject_CallMethod(sock, "close", NULL);
        Py_XDECREF(r); PyErr_Clear();
        Py_DECREF(sock);
        Py_DECREF(protocol);
        return;
    }
    Py_DECREF(sock);
    PyObject *r = PyObject_CallMethod(protocol, "connection_made", "O", transport);
    Py_DECREF(protocol);
    if (r == NULL) {
        PodTransport *t = (PodTransport *)transport;
        t->started = 1;  /* as asyncio: a raising connection_made ends the connection */
        callback_failed(t, "Fatal error: protocol.connection_made() call failed.");
    } else {
        Py_DECREF(r);
        PyObject *started = pt_start((PodTransport *)transport, NULL);
        if (started == NULL) fail_with_error((PodTransport *)transport);
        Py_XDECREF(started);
    }
    Py_DECREF(transport);
}

static PyObject *accept_ready(PodAcceptor *self, PyObject *unused) {
    for (int i = 0; i < ACCEPT_BATCH && self->serving; i++) {
        int fd = accept4(self->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ECONNABORTED || errno == EPROTO)
                break;
            /* EMFILE, ENFILE, ENOBUFS, ENOMEM...: stop; the owner retries later */
            PyErr_SetFromErrno(PyExc_OSError);
            PyObject *type, *value, *tb;
            PyErr_Fetch(&type, &value, &tb);
            PyErr_NormalizeException(&type, &value, &tb);
            if (self->serving) {
                self->serving = 0;
                PyObject *r = PyObject_CallMethod(self->loop, "remove_reader", "i", self->fd);
                Py_XDECREF(r);
                if (r == NULL) PyErr_Clear();
            }
            PyObject *r = value ? PyObject_CallOneArg(self->on_error, value) : NULL;
            if (r == NULL) acceptor_report(self, "accepting: the error callback failed");
            Py_XDECREF(r);
            Py_XDECREF(type); Py_XDECREF(value); Py_XDECREF(tb);
            break;
        }
        adopt(self, fd);
    }
    Py_RETURN_NONE;
}

static PyObject *pa_start(PodAcceptor *self, PyObject *unused) {
    if (self->serving) Py_RETURN_NONE;
    PyObject *r = PyObject_CallMethod(self->loop, "add_reader", "iO", self->fd, self->ready_cb);
    if (r == NULL) return NULL;
    Py_DECREF(r);
    self->serving = 1;
    Py_RETURN_NONE;
}

static PyObject *pa_stop(PodAcceptor *self, PyObject *unused) {
    if (!self->serving) Py_RETURN_NONE;
    self->serving = 0;
    PyObject *r = PyObject_CallMethod(self->loop, "remove_reader", "i", self->fd);
    if (r == NULL) return NULL;
    Py_DECREF(r);
    Py_RETURN_NONE;
}

static PyObject *pa_get_serving(PodAcceptor *self, void *unused) { return PyBool_FromLong(self->serving); }

static int pa_init(PodAcceptor *self, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"loop", "sock", "factory", "on_error", NULL};
    PyObject *loop, *sock, *factory, *on_error;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOO", names, &loop, &sock, &factory, &on_error))
        return -1;
    if (self->loop != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "PodAcceptor is initialised once");
        return -1;
    }
    int fd = socket_fd(sock);
    if (fd < 0) return -1;
    PyObject *family = PyObject_GetAttrString(sock, "family");
    if (family == NULL) return -1;
    self->family = (int)PyLong_AsLong(family);
    Py_DECREF(family);
    if (self->family == -1 && PyErr_Occurred()) return -1;
    self->ready_cb = PyObject_GetAttrString((PyObject *)self, "_accept_ready");
    if (self->ready_cb == NULL) return -1;
    Py_INCREF(loop); self->loop = loop;
    Py_INCREF(sock); self->sock = sock;
    Py_INCREF(factory); self->factory = factory;
    Py_INCREF(on_error); self->on_error = on_error;
    self->fd = fd;
    return 0;
}

static int pa_traverse(PodAcceptor *self, visitproc visit, void *arg) {
    Py_VISIT(self->loop); Py_VISIT(self->sock); Py_VISIT(self->factory);
    Py_VISIT(self->on_error); Py_VISIT(self->ready_cb);
    return 0;
}

static int pa_clear(PodAcceptor *self) {
    Py_CLEAR(self->ready_cb); Py_CLEAR(self->on_error); Py_CLEAR(self->factory);
    Py_CLEAR(self->sock); Py_CLEAR(self->loop);
    return 0;
}

static void pa_dealloc(PodAcceptor *self) {
    PyObject_GC_UnTrack(self);
    pa_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef pa_methods[] = {
    {"start", (PyCFunction)pa_start, METH_NOARGS, "Accept whenever the listener is readable."},
    {"stop", (PyCFunction)pa_stop, METH_NOARGS, "Accept no more (the listener stays open)."},
    {"_accept_ready", (PyCFunction)accept_ready, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef pa_getset[] = {
    {"serving", (getter)pa_get_serving, NULL, "Accepting now.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject PodAcceptorType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "agent.dataplane._podio.PodAcceptor",
    .tp_doc = "PodAcceptor(loop, sock, factory, on_error): a listening socket's connections as "
              "PodTransports of factory() protocols, accepted from C.",
    .tp_basicsize = sizeof(PodAcceptor),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)pa_init,
    .tp_dealloc = (destructor)pa_dealloc,
    .tp_traverse = (traverseproc)pa_traverse,
    .tp_clear = (inquiry)pa_clear,
    .tp_methods = pa_methods,
    .tp_getset = pa_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "agent.dataplane._podio",
    "A pod's upstream TCP connection as one C asyncio transport (csrc/podio.c).", -1, NULL,
};

PyMODINIT_FUNC PyInit__podio(void) {
    if (PyType_Ready(&PodTransportType) < 0 || PyType_Ready(&PodAcceptorType) < 0) return NULL;
    PyObject *socket_module = PyImport_ImportModule("_socket");
    if (socket_module == NULL) return NULL;
    BareSocket = PyObject_GetAttrString(socket_module, "socket");
    Py_DECREF(socket_module);
    if (BareSocket == NULL) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&PodTransportType);
    if (PyModule_AddObject(m, "PodTransport", (PyObject *)&PodTransportType) < 0) {
        Py_DECREF(&PodTransportType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&PodAcceptorType);
    if (PyModule_AddObject(m, "PodAcceptor", (PyObject *)&PodAcceptorType) < 0) {
        Py_DECREF(&PodAcceptorType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
