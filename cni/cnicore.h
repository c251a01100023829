/* The pure part of pinion-cni (cni/pinion-cni.c): a bounded, strict JSON reader, values
 * printed as Python's json.dumps() and repr() print them (so messages match the reference,
 * cni/pinion_cni_reference.py), and the plugin's decisions: the network config, CNI_* from
 * the environment, the agent request, the agent's reply. No I/O here: the fuzz target
 * (cni/fuzz.c) drives every parser of untrusted bytes in this file. */
#ifndef PINION_CNICORE_H
#define PINION_CNICORE_H

#include <stddef.h>
#include <stdint.h>

#define OWN_VERSION "1.0.0"
#define PLUGIN_TYPE "pinion-cni"
#define DEFAULT_AGENT_SOCKET "/run/pinion/cni.sock"
#define DEFAULT_PENDING_DIR "/run/pinion/pending"
#define DEFAULT_TIMEOUT_SECONDS 30.0
#define MAX_TIMEOUT_SECONDS 3600.0
#define MAX_REPLY_BYTES (64 * 1024)
#define MAX_REQUEST_BYTES (64 * 1024)
#define MAX_CONFIG_BYTES (1024 * 1024) /* a network config with prevResult is a few KiB */
#define MAX_JSON_DEPTH 512
#define MAX_INT_DIGITS 4300 /* Python's int-from-text limit: json.loads refuses longer ints */

/* CNI spec error codes; 100 and up are ours. */
#define ERR_INCOMPATIBLE_VERSION 1
#define ERR_INVALID_ENV 4
#define ERR_IO 5
#define ERR_DECODE 6
#define ERR_INVALID_CONFIG 7
#define ERR_TRY_AGAIN_LATER 11
#define ERR_AGENT_REFUSED 100
#define ERR_INTERNAL 101

/* A growable byte buffer; a failed allocation sticks (`failed`) and later writes are dropped. */
struct buf {
    char *data;
    size_t len, cap;
    int failed;
};
void buf_put(struct buf *b, const void *bytes, size_t n);
void buf_puts(struct buf *b, const char *text);
void buf_putc(struct buf *b, char c);
void buf_printf(struct buf *b, const char *format, ...) __attribute__((format(printf, 2, 3)));
void buf_free(struct buf *b);
const char *buf_cstr(struct buf *b); /* NUL-terminated view (not counted in len) */

enum json_type { JSON_NULL, JSON_FALSE, JSON_TRUE, JSON_NUMBER, JSON_STRING, JSON_ARRAY,
                 JSON_OBJECT };

/* One value: its raw text is text[start, end). Children of a container follow it in the
 * array; `next` links siblings (0: last). An object's children alternate key, value. */
struct json_node {
    uint32_t start, end, next;
    uint8_t type, has_children;
};

struct json_doc {
    const char *text;
    size_t len;
    struct json_node *nodes;
    size_t count, cap;
};

enum json_status { JSON_OK, JSON_SYNTAX, JSON_TOO_DEEP, JSON_NO_MEMORY };

/* Strict RFC 8259 (UTF-8, no NaN/Infinity, one value, a leading BOM ignored as Python does);
 * on failure `why` says where. Node 0 is the top value. */
int json_parse(struct json_doc *doc, const char *text, size_t len, struct buf *why);
void json_free(struct json_doc *doc);
int json_first_child(const struct json_doc *doc, int index);
int json_next(const struct json_doc *doc, int index);
/* An object's value for `key` (the last one, as Python's dict keeps), or -1. */
int json_lookup(const struct json_doc *doc, int object, const char *key);
/* A string value decoded to WTF-8 (a lone \uD800-\uDFFF escape kept as its 3-byte form). */
void json_string(const struct json_doc *doc, int index, struct buf *out);
int json_string_is(const struct json_doc *doc, int index, const char *literal);
int json_is_int(const struct json_doc *doc, int index);
double json_number(const struct json_doc *doc, int index);
int json_truthy(const struct json_doc *doc, int index);

/* Python's json.dumps(value) (ensure_ascii, ", " and ": ") and repr(value) of a parsed value. */
void py_dumps(struct buf *out, const struct json_doc *doc, int index);
void py_repr(struct buf *out, const struct json_doc *doc, int index);
/* The value's own text without insignificant whitespace: the same JSON, byte for byte. */
void json_compact(struct buf *out, const struct json_doc *doc, int index);

/* Python strings are kept as WTF-8: what os.environ's surrogateescape makes of any bytes. */
void wtf8_from_bytes(struct buf *out, const char *bytes, size_t n);
/* Back to bytes for a file name (surrogateescape); -1 on NUL or a surrogate not from a byte. */
int wtf8_to_path(struct buf *out, const char *text, size_t n);
void py_dumps_str(struct buf *out, const char *text, size_t n);
void py_repr_str(struct buf *out, const char *text, size_t n);
void py_repr_bytes(struct buf *out, const char *bytes, size_t n);
void py_float_repr(struct buf *out, double value);
void py_format_g(struct buf *out, double value);
int hex_value(unsigned char c); /* 0-15, or -1 */

/* A failure for the runtime: CNI error JSON on stdout. `code` is decimal text (an agent's
 * code may be any JSON integer). */
struct cni_error {
    char code[64];
    struct buf msg, details;
};
void cni_error_set(struct cni_error *error, long code, const char *msg, const char *details);
void cni_error_free(struct cni_error *error);

struct netconf {
    const char *version; /* one of the supported versions (static) */
    struct buf agent_socket, pending_dir; /* WTF-8 */
    int fail_open;
    double timeout_seconds;
    int prev_result; /* node index, or -1 */
};

/* stdin bytes -> parsed object (code 6 errors). */
int cni_decode_config(struct json_doc *doc, const char *text, size_t len, struct cni_error *error);
/* The version errors speak: the config's cniVersion when it is a supported one. */
const char *cni_error_version(const struct json_doc *doc);
int cni_parse_netconf(const struct json_doc *doc, struct netconf *conf, struct cni_error *error);
void netconf_free(struct netconf *conf);

struct invocation {
    const char *command; /* ADD, DEL or CHECK (static) */
    struct buf container_id, netns, if_name; /* WTF-8 */
    struct buf args_json; /* the CNI_ARGS pairs as a JSON object, Python's formatting */
};
/* getenv-like lookup so the fuzz target and tests can feed their own environment. */
typedef const char *(*env_lookup)(const char *name, void *context);
int cni_read_invocation(env_lookup lookup, void *context, struct invocation *invocation,
                        struct cni_error *error);
void invocation_free(struct invocation *invocation);

/* The agent request, as Python's json.dumps(request) prints it (no newline). */
int cni_build_request(const struct invocation *invocation, const struct netconf *conf,
                      const struct json_doc *doc, struct buf *request, struct cni_error *error);
/* A reply line (without its newline): 0 when {"ok": true}; else 1 and the error to report. */
int cni_check_reply(const char *line, size_t len, const char *socket_path,
                    struct cni_error *error);

/* The command's need for prevResult (ADD/CHECK). */
int cni_require_prev_result(const struct invocation *invocation, const struct netconf *conf,
                            struct cni_error *error);

#endif
