/* pinion-keeper: holds the pods' listening sockets while agents come and go.
 *
 * The same program as agent/inpod/keeper.py (its reference, and its documentation: the
 * protocol, the limits, the take-over), in C so that a process that lives as long as the
 * node costs a few hundred KiB instead of a Python interpreter's 8 MiB. tests/unit/
 * test_keeper.py runs every behaviour test against both; keeper/fuzz.c fuzzes the request
 * handling (`make fuzz-keeper`).
 *
 *   pinion-keeper --socket /run/pinion/keeper.sock
 *
 * Requests (SOCK_SEQPACKET, one per message): "PUT <key>" + one fd, "DROP <key>", "LIST"
 * (answered by "FDS <key> <key>..." messages carrying as many fds, then "END"); the others
 * answer "OK" or "ERR <why>". Keys: [A-Za-z0-9._:/-]{1,200}. Callers: uid 0 or our own. */

#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "keeper.h"

/* ------------------------------------------------------------------ the store */

struct store *store_new(size_t max_held) {
    struct store *s = calloc(1, sizeof(*s));
    if (s == NULL) return NULL;
    s->items = calloc(max_held ? max_held : 1, sizeof(*s->items));
    if (s->items == NULL) { free(s); return NULL; }
    s->max = max_held;
    return s;
}

void store_free(struct store *s) {
    if (s == NULL) return;
    for (size_t i = 0; i < s->count; i++) close(s->items[i].fd);
    free(s->items);
    free(s);
}

static long store_find(const struct store *s, const char *key) {
    for (size_t i = 0; i < s->count; i++)
        if (strcmp(s->items[i].key, key) == 0) return (long)i;
    return -1;
}

/* Takes ownership of fd (closed on failure). 0, or -1 when full. */
int store_hold(struct store *s, const char *key, int fd) {
    long at = store_find(s, key);
    if (at >= 0) {
        close(s->items[at].fd);
        s->items[at].fd = fd;
        return 0;
    }
    if (s->count >= s->max) { close(fd); return -1; }
    strcpy(s->items[s->count].key, key);  /* checked: at most MAX_KEY bytes */
    s->items[s->count].fd = fd;
    s->count++;
    return 0;
}

static void store_drop(struct store *s, const char *key) {
    long at = store_find(s, key);
    if (at < 0) return;
    close(s->items[at].fd);
    s->items[at] = s->items[s->count - 1];
    s->count--;
}

int valid_key(const char *key, size_t len) {
    if (len < 1 || len > MAX_KEY) return 0;
    for (size_t i = 0; i < len; i++) {
        char c = key[i];
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
              c == '.' || c == '_' || c == ':' || c == '/' || c == '-'))
            return 0;
    }
    return 1;
}

/* ------------------------------------------------------------------ one request */

static int send_list(int client, const struct store *s) {
    char message[MAX_MESSAGE];
    for (size_t start = 0; start < s->count; start += FDS_PER_MESSAGE) {
        size_t end = start + FDS_PER_MESSAGE < s->count ? start + FDS_PER_MESSAGE : s->count;
        size_t len = 3;
        memcpy(message, "FDS", 3);
        int fds[FDS_PER_MESSAGE];
        for (size_t i = start; i < end; i++) {
            size_t key_len = strlen(s->items[i].key);
            message[len++] = ' ';
            memcpy(message + len, s->items[i].key, key_len);
            len += key_len;
            fds[i - start] = s->items[i].fd;
        }
        union { struct cmsghdr header; char space[CMSG_SPACE(sizeof(int) * FDS_PER_MESSAGE)]; } control;
        memset(&control, 0, sizeof(control));
        struct iovec iov = {message, len};
        struct msghdr msg = {0};
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.space;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * (end - start));
        struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
        cmsg->cmsg_level = SOL_SOCKET;
        cmsg->cmsg_type = SCM_RIGHTS;
        cmsg->cmsg_len = CMSG_LEN(sizeof(int) * (end - start));
        memcpy(CMSG_DATA(cmsg), fds, sizeof(int) * (end - start));
        if (sendmsg(client, &msg, MSG_NOSIGNAL) < 0) return -1;
    }
    return 0;
}

/* The request in `message` (len bytes) with `nfds` descriptors received (owned: each is kept
 * or closed here). Writes the reply into `reply` (NUL-terminated), or "" when the reply was
 * already sent (LIST, whose last message "END" is left to the caller as the reply). */
int handle_request(struct store *s, int client, const char *message, size_t len, int truncated,
                   int *fds, int nfds, char *reply, size_t reply_size) {
    /* "<verb>[ <argument>]": split at the first space, as the Python keeper does */
    const char *space = memchr(message, ' ', len);
    size_t verb_len = space != NULL ? (size_t)(space - message) : len;
    const char *argument = space != NULL ? space + 1 : message + len;
    size_t argument_len = len - (size_t)(argument - message);
    int keep = -1;
    const char *answer;
    char key[MAX_KEY + 1];
    int key_ok = valid_key(argument, argument_len);
    if (key_ok) {
        memcpy(key, argument, argument_len);
        key[argument_len] = '\0';
    }
    if (truncated) {
        answer = "ERR message or descriptors truncated";
    } else if (verb_len == 3 && memcmp(message, "PUT", 3) == 0) {
        if (!key_ok) answer = "ERR bad key";
        else if (nfds != 1) answer = "ERR PUT takes exactly one descriptor";
        else if (store_find(s, key) < 0 && s->count >= s->max) answer = "ERR keeper full";
        else {
            store_hold(s, key, fds[0]);
            keep = 0;
            answer = "OK";
        }
    } else if (nfds > 0) {
        answer = "ERR descriptors only with PUT";
    } else if (verb_len == 4 && memcmp(message, "DROP", 4) == 0) {
        if (key_ok) store_drop(s, key);
        answer = "OK";  /* nothing held under it: nothing to do */
    } else if (verb_len == 4 && memcmp(message, "LIST", 4) == 0) {
        if (client >= 0 && send_list(client, s) < 0) {
            answer = NULL;
        } else {
            answer = "END";
        }
    } else {
        answer = "ERR unknown request";
    }
    for (int i = 0; i < nfds; i++)
        if (i != keep) close(fds[i]);
    if (answer == NULL) return -1;
    snprintf(reply, reply_size, "%s", answer);
    return 0;
}

/* ------------------------------------------------------------------ the process */

static volatile sig_atomic_t stopping = 0;
static void on_signal(int sig) { (void)sig; stopping = 1; }

static int receive(int sock, char *buf, size_t size, int *fds, int *nfds, int *truncated) {
    union { struct cmsghdr header; char space[CMSG_SPACE(sizeof(int) * MAX_FDS_IN)]; } control;
    struct iovec iov = {buf, size};
    struct msghdr msg = {0};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.space;
    msg.msg_controllen = sizeof(control.space);
    ssize_t n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    if (n < 0) return -1;
    *nfds = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        int count = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        int *data = (int *)CMSG_DATA(c);
        for (int i = 0; i < count; i++) {
            if (*nfds < MAX_FDS_IN) fds[(*nfds)++] = data[i];
            else close(data[i]);
        }
    }
    *truncated = (msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) != 0;
    return (int)n;
}

static int connect_to(const char *path) {
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof(addr.sun_path)) { errno = ENAMETOOLONG; return -1; }
    strcpy(addr.sun_path, path);
    int sock = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (sock < 0) return -1;
    struct timeval timeout = {2, 0};
    setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
    setsockopt(sock, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof(timeout));
    if (connect(sock, (struct sockaddr *)&addr, sizeof(addr)) < 0) { close(sock); return -1; }
    return sock;
}

/* A keeper already answering on our path: take everything it holds. */
static size_t take_over(struct store *s, const char *path) {
    int sock = connect_to(path);
    if (sock < 0) return 0;
    static char buf[MAX_MESSAGE + 1];
    if (send(sock, "LIST", 4, MSG_NOSIGNAL) != 4) { close(sock); return 0; }
    for (;;) {
        int fds[MAX_FDS_IN], nfds = 0, truncated = 0;
        int n = receive(sock, buf, MAX_MESSAGE, fds, &nfds, &truncated);
        if (n <= 0 || truncated) {
            for (int i = 0; i < nfds; i++) close(fds[i]);
            break;
        }
        buf[n] = '\0';
        if (strcmp(buf, "END") == 0) {
            for (int i = 0; i < nfds; i++) close(fds[i]);
            break;
        }
        int used = 0;
        if (strncmp(buf, "FDS ", 4) == 0) {
            char *save = NULL;
            for (char *key = strtok_r(buf + 4, " ", &save); key != NULL; key = strtok_r(NULL, " ", &save)) {
                if (used >= nfds || !valid_key(key, strlen(key))) break;
                store_hold(s, key, fds[used++]);
            }
        }
        for (int i = used; i < nfds; i++) close(fds[i]);
    }
    close(sock);
    return s->count;
}

static int trusted(int client) {
    struct ucred cred;
    socklen_t len = sizeof(cred);
    if (getsockopt(client, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0) return 0;
    return cred.uid == 0 || cred.uid == getuid();
}

static void say(const char *what, const char *path, long n) {
    time_t now = time(NULL);
    struct tm tm;
    char stamp[32];
    strftime(stamp, sizeof(stamp), "%Y-%m-%d %H:%M:%S", gmtime_r(&now, &tm));
    fprintf(stderr, "%s INFO pinion-keeper: %s %s (%ld sockets)\n", stamp, what, path, n);
}

#ifndef KEEPER_FUZZING
int main(int argc, char **argv) {
    const char *path = "/run/pinion/keeper.sock";
    size_t max_held = MAX_HELD;
    int max_clients = MAX_CLIENTS;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--socket") == 0 && i + 1 < argc) path = argv[++i];
        else if (strncmp(argv[i], "--socket=", 9) == 0) path = argv[i] + 9;
        else if (strcmp(argv[i], "--max-held") == 0 && i + 1 < argc) max_held = strtoul(argv[++i], NULL, 10);
        else if (strcmp(argv[i], "--max-clients") == 0 && i + 1 < argc) max_clients = atoi(argv[++i]);
        else {
            fprintf(stderr, "usage: pinion-keeper [--socket PATH] [--max-held N] [--max-clients N]\n");
            return 2;
        }
    }
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    char staging[sizeof(addr.sun_path)];
    if (snprintf(staging, sizeof(staging), "%s.%d", path, (int)getpid()) >= (int)sizeof(staging)) {
        fprintf(stderr, "pinion-keeper: socket path too long: %s\n", path);
        return 2;
    }
    if (max_clients < 1 || max_clients > MAX_CLIENTS || max_held < 1 || max_held > MAX_HELD) {
        fprintf(stderr, "pinion-keeper: --max-held 1..%d, --max-clients 1..%d\n", MAX_HELD, MAX_CLIENTS);
        return 2;
    }
    struct store *s = store_new(max_held);
    if (s == NULL) return 1;
    signal(SIGPIPE, SIG_IGN);
    struct sigaction action = {0};
    action.sa_handler = on_signal;  /* no SA_RESTART: poll() returns EINTR */
    sigaction(SIGTERM, &action, NULL);
    sigaction(SIGINT, &action, NULL);

    size_t taken = take_over(s, path);
    char *slash = strrchr(path, '/');
    if (slash != NULL && slash != path) {
        char dir[sizeof(addr.sun_path)];
        snprintf(dir, sizeof(dir), "%.*s", (int)(slash - path), path);
        mkdir(dir, 0700);
    }
    int listener = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    strcpy(addr.sun_path, staging);
    unlink(staging);
    mode_t old_mask = umask(0177);
    int bound = bind(listener, (struct sockaddr *)&addr, sizeof(addr));
    umask(old_mask);
    struct stat st;
    if (bound < 0 || listen(listener, MAX_CLIENTS) < 0 || stat(staging, &st) < 0 ||
        rename(staging, path) < 0) {
        fprintf(stderr, "pinion-keeper: cannot listen on %s: %s\n", path, strerror(errno));
        store_free(s);
        return 1;
    }
    ino_t inode = st.st_ino;
    say(taken ? "keeper on (took sockets over)" : "keeper on", path, (long)taken);

    struct pollfd polls[MAX_CLIENTS + 1];
    int nclients = 0;
    polls[0] = (struct pollfd){.fd = listener, .events = POLLIN};
    static char buf[MAX_MESSAGE + 1];
    while (!stopping) {
        if (poll(polls, (nfds_t)(nclients + 1), -1) < 0) {
            if (errno == EINTR) continue;
            break;
        }
        for (int i = nclients; i >= 1; i--) {
            if (!polls[i].revents) continue;
            int client = polls[i].fd, fds[MAX_FDS_IN], nfds = 0, truncated = 0;
            int n = (polls[i].revents & POLLIN) ? receive(client, buf, MAX_MESSAGE, fds, &nfds, &truncated) : 0;
            char reply[128];
            if (n <= 0 && !truncated) {
                for (int k = 0; k < nfds; k++) close(fds[k]);
                close(client);
                polls[i] = polls[nclients--];
                continue;
            }
            if (handle_request(s, client, buf, (size_t)(n > 0 ? n : 0), truncated, fds, nfds,
                               reply, sizeof(reply)) < 0 ||
                send(client, reply, strlen(reply), MSG_NOSIGNAL) < 0) {
                close(client);
                polls[i] = polls[nclients--];
            }
        }
        if (polls[0].revents & POLLIN) {
            int client = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
            if (client >= 0) {
                if (nclients >= max_clients || !trusted(client)) close(client);
                else {
                    struct timeval timeout = {2, 0};
                    setsockopt(client, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof(timeout));
                    polls[++nclients] = (struct pollfd){.fd = client, .events = POLLIN};
                }
            }
        }
    }
    if (stat(path, &st) == 0 && st.st_ino == inode) unlink(path);  /* not a successor's */
    for (int i = 1; i <= nclients; i++) close(polls[i].fd);
    close(listener);
    store_free(s);
    return 0;
}
#endif
