/* pinion-cni: CNI chained plugin that announces every pod to the node's Pinion agent.
 *
 * It runs after the plugin that creates the pod interface (e.g. bridge), forwards the netns,
 * CNI_ARGS and the pod IPs from prevResult to the agent over a Unix socket, waits until the
 * agent has the pod captured, and passes prevResult through unchanged. A static binary: the
 * host needs nothing else (no python3). cni/pinion_cni_reference.py is the reference it
 * follows, message for message; tests/unit/test_cni_plugin.py runs both.
 *
 * Agent protocol: one exchange per connection; each side sends one JSON object + "\n".
 *   request: {"version": 1, "command": "ADD"|"DEL"|"CHECK", "containerId", "netns",
 *             "ifName", "args": {CNI_ARGS}, "ips": [...], "gateways": [...], "cniVersion"}
 *   reply:   {"ok": true} | {"ok": false, "code": N, "msg": "...", "details": "..."}
 * When the agent is unreachable and failPolicy is "open", ADD stores the request (plus
 * "receivedAt") as <pendingDir>/<containerId>.json for the agent to pick up on return. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "cnicore.h"

static const char VERSION_REPLY[] =
    "{\"cniVersion\": \"1.0.0\", \"supportedVersions\": [\"0.3.0\", \"0.3.1\", \"0.4.0\", \"1.0.0\"]}";

static void warn(const char *message) { fprintf(stderr, "pinion-cni: %s\n", message); }

/* str(OSError): "[Errno N] Text", then ": 'file'" and " -> 'other'" when known. */
static void os_error(struct buf *out, int error, const char *file, const char *other) {
    buf_printf(out, "[Errno %d] %s", error, strerror(error));
    const char *names[2] = {file, other};
    for (int i = 0; i < 2 && names[i]; i++) {
        struct buf text = {0};
        wtf8_from_bytes(&text, names[i], strlen(names[i]));
        buf_puts(out, i ? " -> " : ": ");
        py_repr_str(out, buf_cstr(&text), text.len);
        buf_free(&text);
    }
}

static double monotonic(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)now.tv_sec + (double)now.tv_nsec / 1e9;
}

/* ---------------------------------------------------------------- agent exchange */

enum outcome { REPLIED, UNREACHABLE, FAILED };

/* Wait for `events` until the deadline; 0 when ready, -1 when the time is spent. */
static int wait_for(int fd, short events, double deadline) {
    for (;;) {
        double left = deadline - monotonic();
        if (left <= 0) return -1;
        struct pollfd poller = {fd, events, 0};
        int ready = poll(&poller, 1, (int)(left * 1000) + 1);
        if (ready > 0) return 0;
        if (ready < 0 && errno != EINTR) return 0; /* let the I/O call report it */
    }
}

/* Send one request line, read one reply line; the whole exchange within `timeout`. */
static enum outcome exchange(const char *socket_path, const struct buf *line, double timeout,
                             struct buf *reply, struct buf *why) {
    double deadline = monotonic() + timeout;
    struct buf path = {0};
    wtf8_to_path(&path, socket_path, strlen(socket_path));
    struct sockaddr_un address = {.sun_family = AF_UNIX};
    if (path.len > sizeof address.sun_path) {
        buf_puts(why, "af_unix path too long");
        buf_free(&path);
        return UNREACHABLE;
    }
    memcpy(address.sun_path, path.data, path.len);
    socklen_t length = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + path.len);
    buf_free(&path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&address, length) < 0) {
        if (errno == ENOENT) buf_puts(why, "socket does not exist (is the agent running?)");
        else
            for (const char *c = strerror(errno); *c; c++)
                buf_putc(why, (char)((*c >= 'A' && *c <= 'Z') ? *c + 32 : *c));
        if (fd >= 0) close(fd);
        return UNREACHABLE;
    }
    enum outcome outcome = REPLIED;
    for (size_t sent = 0; sent < line->len && outcome == REPLIED;) {
        if (wait_for(fd, POLLOUT, deadline) < 0) { outcome = UNREACHABLE; break; }
        ssize_t n = send(fd, line->data + sent, line->len - sent, MSG_NOSIGNAL);
        if (n >= 0) sent += (size_t)n;
        else if (errno != EAGAIN && errno != EINTR) outcome = FAILED;
    }
    /* Read until a newline, or more than MAX_REPLY_BYTES, or the end (as the reference). */
    char chunk[4096];
    while (outcome == REPLIED && !(reply->len && memchr(reply->data, '\n', reply->len)) &&
           reply->len <= MAX_REPLY_BYTES) {
        if (wait_for(fd, POLLIN, deadline) < 0) { outcome = UNREACHABLE; break; }
        ssize_t n = recv(fd, chunk, sizeof chunk, 0);
        if (n == 0) break;
        if (n > 0) buf_put(reply, chunk, (size_t)n);
        else if (errno != EAGAIN && errno != EINTR) outcome = FAILED;
    }
    if (outcome == UNREACHABLE) {
        buf_puts(why, "connected, but no reply within ");
        py_format_g(why, timeout);
        buf_puts(why, "s");
    } else if (outcome == FAILED) {
        int error = errno;
        buf_printf(why, "connection to pinion agent at %s failed mid-request: ", socket_path);
        os_error(why, error, NULL, NULL);
    }
    close(fd);
    return outcome;
}

/* ---------------------------------------------------------------- pending records */

static void join(struct buf *out, const char *dir, const char *name) {
    buf_puts(out, dir);
    if (out->len && out->data[out->len - 1] != '/') buf_putc(out, '/');
    buf_puts(out, name);
}

/* posixpath.split: head (trailing slashes dropped unless all slashes) and tail. */
static void split_path(const char *path, size_t n, size_t *head_len, size_t *tail_start) {
    const char *slash = memrchr(path, '/', n);
    size_t split = slash ? (size_t)(slash - path) + 1 : 0, head = split;
    int all_slashes = 1;
    for (size_t i = 0; i < split; i++) all_slashes &= path[i] == '/';
    if (head && !all_slashes)
        while (head > 0 && path[head - 1] == '/') head--;
    *head_len = head;
    *tail_start = split;
}

/* os.makedirs(name, mode): parents first (mode 0777), then name. On failure errno is set
 * and `failed` names the directory that could not be made. */
static int makedirs(const char *name, mode_t mode, struct buf *failed) {
    size_t n = strlen(name), head, tail;
    split_path(name, n, &head, &tail);
    if (tail == n) { /* no tail: a trailing slash, split the head again */
        n = head;
        split_path(name, n, &head, &tail);
    }
    struct stat info;
    if (head > 0 && tail < n) {
        char *parent = strndup(name, head);
        if (parent == NULL) { errno = ENOMEM; buf_puts(failed, name); return -1; }
        if (stat(parent, &info) < 0) {
            struct buf inner = {0};
            if (makedirs(parent, 0777, &inner) < 0 && errno != EEXIST) {
                buf_put(failed, inner.data, inner.len);
                buf_free(&inner);
                free(parent);
                return -1;
            }
            buf_free(&inner);
            if (n - tail == 1 && name[tail] == '.') { free(parent); return 0; }
        }
        free(parent);
    }
    if (mkdir(name, mode) < 0) {
        buf_puts(failed, name);
        return -1;
    }
    return 0;
}

static int write_all(int fd, const char *data, size_t len) {
    while (len) {
        ssize_t n = write(fd, data, len);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return -1;
        data += n;
        len -= (size_t)n;
    }
    return 0;
}

static double wall_clock(void) {
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    return (double)now.tv_sec + (double)now.tv_nsec / 1e9;
}

/* Atomically store the request for the agent to replay; on failure `why` is str(OSError). */
static int write_pending(const char *dir, const char *container, const struct buf *request,
                         struct buf *path, struct buf *why) {
    struct buf failed = {0}, temporary = {0}, record = {0}, name = {0};
    int result = -1, fd = -1;
    if (makedirs(dir, 0700, &failed) == 0) {
        if (chmod(dir, 0700) < 0) { os_error(why, errno, dir, NULL); goto done; }
    } else if (errno != EEXIST) {
        os_error(why, errno, buf_cstr(&failed), NULL);
        goto done;
    }
    buf_printf(&name, "%s.json", container);
    join(path, dir, buf_cstr(&name));
    name.len = 0;
    buf_printf(&name, ".%s.%d.tmp", container, (int)getpid());
    join(&temporary, dir, buf_cstr(&name));
    buf_put(&record, request->data, request->len - 1); /* without its closing brace */
    buf_puts(&record, ", \"receivedAt\": ");
    py_float_repr(&record, wall_clock());
    buf_puts(&record, "}\n");
    fd = open(buf_cstr(&temporary), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) { os_error(why, errno, buf_cstr(&temporary), NULL); goto done; }
    if (record.failed || write_all(fd, record.data, record.len) < 0 || fsync(fd) < 0 ||
        close(fd) < 0) {
        os_error(why, record.failed ? ENOMEM : errno, NULL, NULL);
        fd = -1;
        unlink(buf_cstr(&temporary));
        goto done;
    }
    fd = -1;
    if (rename(buf_cstr(&temporary), buf_cstr(path)) < 0) {
        os_error(why, errno, buf_cstr(&temporary), buf_cstr(path));
        unlink(buf_cstr(&temporary));
        goto done;
    }
    int directory = open(dir, O_RDONLY | O_CLOEXEC);
    if (directory < 0) { os_error(why, errno, dir, NULL); goto done; }
    if (fsync(directory) < 0) { os_error(why, errno, NULL, NULL); close(directory); goto done; }
    close(directory);
    result = 0;
done:
    if (fd >= 0) close(fd);
    buf_free(&failed);
    buf_free(&temporary);
    buf_free(&record);
    buf_free(&name);
    return result;
}

/* Forget a pending ADD; 1 when there was one. DEL must not fail, so only warn. */
static int remove_pending(const char *dir, const char *container) {
    struct buf path = {0}, name = {0};
    buf_printf(&name, "%s.json", container);
    join(&path, dir, buf_cstr(&name));
    int removed = unlink(buf_cstr(&path)) == 0;
    if (!removed && errno != ENOENT) {
        struct buf message = {0}, text = {0};
        wtf8_from_bytes(&text, path.data, path.len);
        buf_printf(&message, "could not remove pending record %s: ", buf_cstr(&text));
        os_error(&message, errno, buf_cstr(&path), NULL);
        warn(buf_cstr(&message));
        buf_free(&message);
        buf_free(&text);
    }
    buf_free(&path);
    buf_free(&name);
    return removed;
}

/* ---------------------------------------------------------------- commands */

struct run {
    const struct json_doc *doc;
    struct netconf conf;
    struct invocation invocation;
    struct buf pending_dir; /* bytes, for the file system */
    struct buf output;      /* what to print on stdout */
};

static void output_prev_result(struct run *run) { json_compact(&run->output, run->doc, run->conf.prev_result); }

static int handle_unreachable(struct run *run, const struct buf *request, const char *reason,
                              struct cni_error *error) {
    const char *command = run->invocation.command, *container = run->invocation.container_id.data;
    const char *dir = buf_cstr(&run->pending_dir);
    struct buf message = {0};
    int result = 0;
    if (strcmp(command, "DEL") == 0) {
        int removed = remove_pending(dir, container);
        buf_printf(&message, "%s; DEL of container %s treated as done", reason, container);
        if (removed)
            buf_printf(&message, "; removed its pending ADD record in %s", buf_cstr(&run->conf.pending_dir));
        warn(buf_cstr(&message));
    } else if (strcmp(command, "CHECK") == 0) {
        buf_printf(&message, "%s; cannot check that the pod is captured", reason);
        cni_error_set(error, ERR_TRY_AGAIN_LATER, buf_cstr(&message), "");
        result = -1;
    } else if (!run->conf.fail_open) {
        buf_printf(&message, "%s; pod not started because failPolicy=closed", reason);
        cni_error_set(error, ERR_TRY_AGAIN_LATER, buf_cstr(&message),
                      "start the pinion agent on this node, or set failPolicy=open to let pods "
                      "start uncaptured until it returns");
        result = -1;
    } else {
        struct buf path = {0}, why = {0};
        if (write_pending(dir, container, request, &path, &why) < 0) {
            buf_printf(&message, "%s; failPolicy=open but recording the pod failed: %s; pod not started",
                       reason, buf_cstr(&why));
            cni_error_set(error, ERR_IO, buf_cstr(&message), "");
            result = -1;
        } else {
            struct buf text = {0};
            wtf8_from_bytes(&text, path.data, path.len);
            buf_printf(&message, "%s; failPolicy=open, so the pod starts uncaptured; recorded in %s",
                       reason, buf_cstr(&text));
            warn(buf_cstr(&message));
            buf_free(&text);
            output_prev_result(run);
        }
        buf_free(&path);
        buf_free(&why);
    }
    buf_free(&message);
    return result;
}

/* Run ADD, DEL or CHECK once the config and environment are read. */
static int handle(struct run *run, struct cni_error *error) {
    struct buf request = {0}, reply = {0}, why = {0};
    int result = -1;
    if (cni_require_prev_result(&run->invocation, &run->conf, error) < 0 ||
        cni_build_request(&run->invocation, &run->conf, run->doc, &request, error) < 0)
        goto done;
    buf_putc(&request, '\n');
    if (request.failed) { cni_error_set(error, ERR_INTERNAL, "pinion-cni bug: MemoryError()", ""); goto done; }
    if (request.len > MAX_REQUEST_BYTES) {
        struct buf message = {0};
        buf_printf(&message, "the request for the agent is %zu bytes, over its %d KiB: CNI_ARGS "
                   "or the pod's addresses are far too long", request.len, MAX_REQUEST_BYTES / 1024);
        cni_error_set(error, ERR_INVALID_ENV, buf_cstr(&message), "");
        buf_free(&message);
        goto done;
    }
    const char *socket_path = buf_cstr(&run->conf.agent_socket);
    enum outcome outcome = exchange(socket_path, &request, run->conf.timeout_seconds, &reply, &why);
    if (outcome == FAILED) {
        cni_error_set(error, ERR_IO, buf_cstr(&why), "");
        goto done;
    }
    if (outcome == UNREACHABLE) {
        struct buf reason = {0};
        buf_printf(&reason, "pinion agent not reachable at %s: %s", socket_path, buf_cstr(&why));
        request.len--; /* the record is the request without its newline */
        result = handle_unreachable(run, &request, buf_cstr(&reason), error);
        buf_free(&reason);
        goto done;
    }
    const char *newline = reply.len ? memchr(reply.data, '\n', reply.len) : NULL;
    size_t line = newline ? (size_t)(newline - reply.data) : reply.len;
    if (cni_check_reply(reply.data ? reply.data : "", line, socket_path, error) != 0) goto done;
    if (strcmp(run->invocation.command, "DEL") == 0)
        remove_pending(buf_cstr(&run->pending_dir), run->invocation.container_id.data);
    if (strcmp(run->invocation.command, "ADD") == 0) output_prev_result(run);
    result = 0;
done:
    buf_free(&request);
    buf_free(&reply);
    buf_free(&why);
    return result;
}

static const char *from_environment(const char *name, void *context) {
    (void)context;
    return getenv(name);
}

/* All of stdin, refusing more than MAX_CONFIG_BYTES. */
static int read_stdin(struct buf *in, struct cni_error *error) {
    char chunk[65536];
    for (;;) {
        ssize_t n = read(STDIN_FILENO, chunk, sizeof chunk);
        if (n == 0) return 0;
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) {
            struct buf message = {0};
            buf_puts(&message, "pinion-cni bug: reading stdin: ");
            os_error(&message, errno, NULL, NULL);
            cni_error_set(error, ERR_INTERNAL, buf_cstr(&message), "");
            buf_free(&message);
            return -1;
        }
        if (in->len + (size_t)n > MAX_CONFIG_BYTES) {
            cni_error_set(error, ERR_DECODE, "network config on stdin is over 1 MiB: not read", "");
            return -1;
        }
        buf_put(in, chunk, (size_t)n);
    }
}

static void print_error(const char *version, struct cni_error *error) {
    struct buf message = {0}, out = {0};
    buf_printf(&message, "error %s: %s", error->code, buf_cstr(&error->msg));
    warn(buf_cstr(&message));
    buf_printf(&out, "{\"cniVersion\": \"%s\", \"code\": %s, \"msg\": ", version, error->code);
    py_dumps_str(&out, error->msg.data, error->msg.len);
    buf_puts(&out, ", \"details\": ");
    py_dumps_str(&out, error->details.data, error->details.len);
    buf_puts(&out, "}\n");
    fwrite(out.data, 1, out.len, stdout);
    buf_free(&message);
    buf_free(&out);
}

int main(void) {
    const char *command = getenv("CNI_COMMAND");
    if (command != NULL && strcmp(command, "VERSION") == 0) {
        puts(VERSION_REPLY);
        return 0;
    }
    struct cni_error error = {0};
    struct buf in = {0};
    struct json_doc doc = {0};
    struct run run = {.doc = &doc};
    const char *version = OWN_VERSION;
    int status = 1;
    if (read_stdin(&in, &error) == 0 &&
        cni_decode_config(&doc, in.data ? in.data : "", in.len, &error) == 0) {
        version = cni_error_version(&doc);
        if (cni_parse_netconf(&doc, &run.conf, &error) == 0 &&
            cni_read_invocation(from_environment, NULL, &run.invocation, &error) == 0) {
            wtf8_to_path(&run.pending_dir, run.conf.pending_dir.data, run.conf.pending_dir.len);
            if (handle(&run, &error) == 0) status = 0;
        }
    }
    if (status == 0) {
        if (run.output.len) {
            buf_putc(&run.output, '\n');
            fwrite(run.output.data, 1, run.output.len, stdout);
        }
    } else print_error(version, &error);
    fflush(stdout);
    netconf_free(&run.conf);
    invocation_free(&run.invocation);
    buf_free(&run.pending_dir);
    buf_free(&run.output);
    json_free(&doc);
    buf_free(&in);
    cni_error_free(&error);
    return status;
}
