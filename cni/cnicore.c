/* pinion-cni's decisions (see cnicore.h): the network config, CNI_* from the environment, pod
 * addresses as Python's ipaddress reads them, the agent request, the agent's reply. */
#include "cnicore.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------- errors */

void cni_error_set(struct cni_error *error, long code, const char *msg, const char *details) {
    snprintf(error->code, sizeof error->code, "%ld", code);
    error->msg.len = error->details.len = 0;
    buf_puts(&error->msg, msg);
    buf_puts(&error->details, details);
}

void cni_error_free(struct cni_error *error) {
    buf_free(&error->msg);
    buf_free(&error->details);
}

static int bad_config(struct cni_error *error, struct buf *problem) {
    struct buf msg = {0};
    buf_puts(&msg, "invalid pinion-cni network config: ");
    buf_put(&msg, problem->data, problem->len);
    cni_error_set(error, ERR_INVALID_CONFIG, buf_cstr(&msg), "");
    buf_free(&msg);
    buf_free(problem);
    return -1;
}

/* ---------------------------------------------------------------- the network config */

static const char *const SUPPORTED_VERSIONS[] = {"0.3.0", "0.3.1", "0.4.0", "1.0.0"};
#define N_VERSIONS (sizeof SUPPORTED_VERSIONS / sizeof SUPPORTED_VERSIONS[0])

int cni_decode_config(struct json_doc *doc, const char *text, size_t len, struct cni_error *error) {
    struct buf why = {0}, msg = {0};
    int status = json_parse(doc, text, len, &why);
    int result = -1;
    if (status == JSON_TOO_DEEP)
        cni_error_set(error, ERR_DECODE, "network config on stdin is nested too deeply to be one", "");
    else if (status == JSON_NO_MEMORY)
        cni_error_set(error, ERR_INTERNAL, "pinion-cni bug: MemoryError()", "");
    else if (status != JSON_OK) {
        buf_puts(&msg, "network config on stdin is not valid JSON: ");
        buf_put(&msg, why.data, why.len);
        cni_error_set(error, ERR_DECODE, buf_cstr(&msg), "");
    } else if (doc->nodes[0].type != JSON_OBJECT)
        cni_error_set(error, ERR_DECODE, "network config on stdin must be a JSON object", "");
    else result = 0;
    buf_free(&why);
    buf_free(&msg);
    return result;
}

static const char *supported_version(const struct json_doc *doc, int index) {
    for (size_t i = 0; i < N_VERSIONS; i++)
        if (json_string_is(doc, index, SUPPORTED_VERSIONS[i])) return SUPPORTED_VERSIONS[i];
    return NULL;
}

const char *cni_error_version(const struct json_doc *doc) {
    if (doc->count == 0 || doc->nodes[0].type != JSON_OBJECT) return OWN_VERSION;
    const char *version = supported_version(doc, json_lookup(doc, 0, "cniVersion"));
    return version ? version : OWN_VERSION;
}

static int config_path(const struct json_doc *doc, const char *key, const char *fallback,
                       struct buf *out, struct cni_error *error) {
    int value = json_lookup(doc, 0, key);
    if (value < 0) { buf_puts(out, fallback); return 0; }
    if (doc->nodes[value].type == JSON_STRING && doc->nodes[value].end - doc->nodes[value].start > 2) {
        json_string(doc, value, out);
        struct buf bytes = {0};
        int usable = wtf8_to_path(&bytes, out->data, out->len);
        buf_free(&bytes);
        if (usable == 0) return 0;
        /* The reference fails on these as its own bug (ValueError from the OS layer). */
        struct buf problem = {0};
        buf_printf(&problem, "\"%s\" must be a path without NUL bytes or unpaired surrogates, got ", key);
        py_repr(&problem, doc, value);
        return bad_config(error, &problem);
    }
    struct buf problem = {0};
    buf_printf(&problem, "\"%s\" must be a non-empty path, got ", key);
    py_repr(&problem, doc, value);
    return bad_config(error, &problem);
}

static int config_timeout(const struct json_doc *doc, double *out, struct cni_error *error) {
    int value = json_lookup(doc, 0, "timeoutSeconds");
    if (value < 0) { *out = DEFAULT_TIMEOUT_SECONDS; return 0; }
    if (doc->nodes[value].type == JSON_NUMBER) {
        double seconds = json_number(doc, value);
        if (isfinite(seconds) && seconds > 0 && seconds <= MAX_TIMEOUT_SECONDS) {
            *out = seconds;
            return 0;
        }
    }
    struct buf problem = {0};
    buf_puts(&problem, "\"timeoutSeconds\" must be a number > 0 and at most ");
    py_format_g(&problem, MAX_TIMEOUT_SECONDS);
    buf_puts(&problem, ", got ");
    py_repr(&problem, doc, value);
    return bad_config(error, &problem);
}

int cni_parse_netconf(const struct json_doc *doc, struct netconf *conf, struct cni_error *error) {
    memset(conf, 0, sizeof *conf);
    conf->prev_result = -1;
    int version = json_lookup(doc, 0, "cniVersion");
    if (version < 0 || doc->nodes[version].type != JSON_STRING ||
        doc->nodes[version].end - doc->nodes[version].start == 2) {
        struct buf problem = {0};
        buf_puts(&problem, "\"cniVersion\" is missing or not a string");
        return bad_config(error, &problem);
    }
    conf->version = supported_version(doc, version);
    if (conf->version == NULL) {
        struct buf msg = {0};
        buf_puts(&msg, "cniVersion ");
        py_repr(&msg, doc, version);
        buf_puts(&msg, " in the network config is not supported by pinion-cni");
        cni_error_set(error, ERR_INCOMPATIBLE_VERSION, buf_cstr(&msg),
                      "supported versions: 0.3.0, 0.3.1, 0.4.0, 1.0.0");
        buf_free(&msg);
        return -1;
    }
    int type = json_lookup(doc, 0, "type");
    if (!json_string_is(doc, type, PLUGIN_TYPE)) {
        struct buf problem = {0};
        buf_puts(&problem, "\"type\" is ");
        if (type < 0) buf_puts(&problem, "None");
        else py_repr(&problem, doc, type);
        buf_puts(&problem, ", expected \"pinion-cni\"");
        return bad_config(error, &problem);
    }
    int policy = json_lookup(doc, 0, "failPolicy");
    if (policy >= 0 && !json_string_is(doc, policy, "closed") && !json_string_is(doc, policy, "open")) {
        struct buf problem = {0};
        buf_puts(&problem, "\"failPolicy\" must be \"closed\" or \"open\", got ");
        py_repr(&problem, doc, policy);
        return bad_config(error, &problem);
    }
    conf->fail_open = policy >= 0 && json_string_is(doc, policy, "open");
    int prev = json_lookup(doc, 0, "prevResult");
    if (prev >= 0 && doc->nodes[prev].type != JSON_NULL) {
        if (doc->nodes[prev].type != JSON_OBJECT) {
            struct buf problem = {0};
            buf_puts(&problem, "\"prevResult\" must be an object");
            return bad_config(error, &problem);
        }
        conf->prev_result = prev;
    }
    if (config_path(doc, "agentSocket", DEFAULT_AGENT_SOCKET, &conf->agent_socket, error) < 0 ||
        config_timeout(doc, &conf->timeout_seconds, error) < 0 ||
        config_path(doc, "pendingDir", DEFAULT_PENDING_DIR, &conf->pending_dir, error) < 0)
        return -1;
    return 0;
}

void netconf_free(struct netconf *conf) {
    buf_free(&conf->agent_socket);
    buf_free(&conf->pending_dir);
}

/* ---------------------------------------------------------------- CNI_* variables */

static int env_error(struct cni_error *error, struct buf *msg, const char *details) {
    cni_error_set(error, ERR_INVALID_ENV, buf_cstr(msg), details);
    buf_free(msg);
    return -1;
}

static const char *require_env(env_lookup lookup, void *context, const char *name,
                               const char *command, struct cni_error *error) {
    const char *value = lookup(name, context);
    if (value != NULL && *value) return value;
    struct buf msg = {0};
    buf_printf(&msg, "environment variable %s is not set; %s needs it", name, command);
    env_error(error, &msg, "");
    return NULL;
}

static int valid_container_id(const char *id) {
    const char *p = id;
    if (!((*p >= 'A' && *p <= 'Z') || (*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9')))
        return 0;
    for (p++; *p; p++)
        if (!((*p >= 'A' && *p <= 'Z') || (*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9') ||
              *p == '_' || *p == '.' || *p == '-'))
            return 0;
    return 1;
}

struct pair { size_t key, key_len, value, value_len; };

/* CNI_ARGS "K=V;K=V" -> the JSON object Python's json.dumps(dict) prints (a repeated key
 * keeps its first place and takes its last value). */
static int parse_cni_args(const char *raw, struct buf *json, struct cni_error *error) {
    struct buf text = {0};
    wtf8_from_bytes(&text, raw, strlen(raw));
    const char *s = buf_cstr(&text);
    size_t n = text.len, count = 0, cap = 0;
    struct pair *pairs = NULL;
    int result = 0;
    for (size_t start = 0; start <= n && !text.failed;) {
        const char *end = memchr(s + start, ';', n - start);
        size_t stop = end ? (size_t)(end - s) : n;
        if (stop > start) {
            const char *equals = memchr(s + start, '=', stop - start);
            if (equals == NULL || equals == s + start) {
                struct buf msg = {0}, details = {0};
                buf_puts(&msg, "CNI_ARGS has a malformed pair ");
                py_repr_str(&msg, s + start, stop - start);
                buf_puts(&msg, "; expected KEY=VALUE pairs joined by ';'");
                buf_puts(&details, "CNI_ARGS=");
                buf_put(&details, s, n);
                result = env_error(error, &msg, buf_cstr(&details));
                buf_free(&details);
                break;
            }
            struct pair pair = {start, (size_t)(equals - (s + start)), (size_t)(equals - s) + 1,
                                stop - ((size_t)(equals - s) + 1)};
            size_t i = 0;
            /* Past 8192 distinct keys the request is over its 64 KiB whatever follows: stop
             * looking for repeats (quadratic) and let the size check refuse it. */
            for (; i < count && count < 8192; i++)
                if (pairs[i].key_len == pair.key_len && memcmp(s + pairs[i].key, s + pair.key, pair.key_len) == 0)
                    break;
            if (i < count && count < 8192) pairs[i].value = pair.value, pairs[i].value_len = pair.value_len;
            else {
                if (count == cap) {
                    cap = cap ? cap * 2 : 16;
                    struct pair *grown = realloc(pairs, cap * sizeof *pairs);
                    if (grown == NULL) { json->failed = 1; break; }
                    pairs = grown;
                }
                pairs[count++] = pair;
            }
        }
        start = stop + 1;
    }
    if (result == 0) {
        buf_putc(json, '{');
        for (size_t i = 0; i < count; i++) {
            if (i) buf_puts(json, ", ");
            py_dumps_str(json, s + pairs[i].key, pairs[i].key_len);
            buf_puts(json, ": ");
            py_dumps_str(json, s + pairs[i].value, pairs[i].value_len);
        }
        buf_putc(json, '}');
    }
    free(pairs);
    if (text.failed) json->failed = 1;
    buf_free(&text);
    return result;
}

int cni_read_invocation(env_lookup lookup, void *context, struct invocation *invocation,
                        struct cni_error *error) {
    memset(invocation, 0, sizeof *invocation);
    const char *command = require_env(lookup, context, "CNI_COMMAND", "any command", error);
    if (command == NULL) return -1;
    static const char *const commands[] = {"ADD", "DEL", "CHECK"};
    for (size_t i = 0; i < 3; i++)
        if (strcmp(command, commands[i]) == 0) invocation->command = commands[i];
    if (invocation->command == NULL) {
        struct buf msg = {0}, text = {0};
        wtf8_from_bytes(&text, command, strlen(command));
        buf_puts(&msg, "CNI_COMMAND=");
        py_repr_str(&msg, buf_cstr(&text), text.len);
        buf_puts(&msg, " is not one of ADD, DEL, CHECK, VERSION");
        buf_free(&text);
        return env_error(error, &msg, "");
    }
    const char *id = require_env(lookup, context, "CNI_CONTAINERID", command, error);
    if (id == NULL) return -1;
    wtf8_from_bytes(&invocation->container_id, id, strlen(id));
    if (!valid_container_id(id)) {
        struct buf msg = {0};
        buf_puts(&msg, "CNI_CONTAINERID=");
        py_repr_str(&msg, buf_cstr(&invocation->container_id), invocation->container_id.len);
        buf_puts(&msg, " is not a valid container id");
        return env_error(error, &msg,
                         "expected letters, digits, '_', '.' or '-', starting with a letter or digit");
    }
    if (strcmp(command, "DEL") != 0) { /* DEL may come after the netns is gone */
        if (require_env(lookup, context, "CNI_NETNS", command, error) == NULL ||
            require_env(lookup, context, "CNI_IFNAME", command, error) == NULL)
            return -1;
    }
    const char *netns = lookup("CNI_NETNS", context), *if_name = lookup("CNI_IFNAME", context);
    const char *args = lookup("CNI_ARGS", context);
    wtf8_from_bytes(&invocation->netns, netns ? netns : "", netns ? strlen(netns) : 0);
    wtf8_from_bytes(&invocation->if_name, if_name ? if_name : "", if_name ? strlen(if_name) : 0);
    return parse_cni_args(args ? args : "", &invocation->args_json, error);
}

void invocation_free(struct invocation *invocation) {
    buf_free(&invocation->container_id);
    buf_free(&invocation->netns);
    buf_free(&invocation->if_name);
    buf_free(&invocation->args_json);
}

int cni_require_prev_result(const struct invocation *invocation, const struct netconf *conf,
                            struct cni_error *error) {
    if (strcmp(invocation->command, "DEL") == 0 || conf->prev_result >= 0) return 0;
    struct buf msg = {0};
    buf_printf(&msg, "%s without prevResult: pinion-cni must be chained after a plugin that "
               "creates the pod interface (e.g. bridge)", invocation->command);
    cni_error_set(error, ERR_INVALID_CONFIG, buf_cstr(&msg), "");
    buf_free(&msg);
    return -1;
}

/* ---------------------------------------------------------------- addresses (ipaddress) */

typedef unsigned __int128 u128;

static int ascii_digits(const char *s, size_t n) {
    if (n == 0) return 0;
    for (size_t i = 0; i < n; i++)
        if (s[i] < '0' || s[i] > '9') return 0;
    return 1;
}

/* IPv4Address(str): four decimal octets, no leading zeros. */
static int parse_ipv4(const char *s, size_t n, uint32_t *out) {
    uint32_t value = 0;
    size_t start = 0;
    int octets = 0;
    for (size_t i = 0; i <= n; i++) {
        if (i < n && s[i] != '.') continue;
        size_t len = i - start;
        if (++octets > 4 || !ascii_digits(s + start, len) || len > 3 ||
            (len > 1 && s[start] == '0'))
            return -1;
        uint32_t octet = 0;
        for (size_t j = start; j < i; j++) octet = octet * 10 + (uint32_t)(s[j] - '0');
        if (octet > 255) return -1;
        value = (value << 8) | octet;
        start = i + 1;
    }
    if (octets != 4) return -1;
    *out = value;
    return 0;
}

static int parse_hextet(const char *s, size_t n, uint32_t *out) {
    if (n == 0 || n > 4) return -1;
    uint32_t value = 0;
    for (size_t i = 0; i < n; i++) {
        int digit = hex_value((unsigned char)s[i]);
        if (digit < 0) return -1;
        value = value * 16 + (uint32_t)digit;
    }
    *out = value;
    return 0;
}

/* IPv6Address._ip_int_from_string, as Python 3.11 has it. */
static int parse_ipv6(const char *s, size_t n, u128 *out) {
    struct { size_t start, len; } parts[10];
    char tail[2][8];
    size_t count = 0, start = 0;
    if (n == 0) return -1;
    for (size_t i = 0; i <= n; i++) {
        if (i < n && s[i] != ':') continue;
        if (count == 10) return -1; /* more than 9 parts even before the IPv4 tail */
        parts[count].start = start;
        parts[count].len = i - start;
        count++;
        start = i + 1;
    }
    if (count < 3) return -1;
    const char *base[11];
    size_t lens[11];
    for (size_t i = 0; i < count; i++) { base[i] = s + parts[i].start; lens[i] = parts[i].len; }
    if (memchr(base[count - 1], '.', lens[count - 1])) {
        uint32_t v4;
        if (parse_ipv4(base[count - 1], lens[count - 1], &v4) < 0) return -1;
        snprintf(tail[0], sizeof tail[0], "%x", (v4 >> 16) & 0xFFFF);
        snprintf(tail[1], sizeof tail[1], "%x", v4 & 0xFFFF);
        base[count - 1] = tail[0];
        lens[count - 1] = strlen(tail[0]);
        base[count] = tail[1];
        lens[count] = strlen(tail[1]);
        count++;
    }
    if (count > 9) return -1;
    size_t skip = 0, hi, lo, skipped;
    int have_skip = 0;
    for (size_t i = 1; i + 1 < count; i++) {
        if (lens[i] == 0) {
            if (have_skip) return -1;
            skip = i;
            have_skip = 1;
        }
    }
    if (have_skip) {
        hi = skip;
        lo = count - skip - 1;
        if (lens[0] == 0 && --hi) return -1;
        if (lens[count - 1] == 0 && --lo) return -1;
        if (hi + lo >= 8) return -1;
        skipped = 8 - (hi + lo);
    } else {
        if (count != 8 || lens[0] == 0 || lens[count - 1] == 0) return -1;
        hi = count;
        lo = 0;
        skipped = 0;
    }
    u128 value = 0;
    for (size_t i = 0; i < hi; i++) {
        uint32_t hextet;
        if (parse_hextet(base[i], lens[i], &hextet) < 0) return -1;
        value = (value << 16) | hextet;
    }
    value <<= 16 * skipped;
    for (size_t i = count - lo; i < count; i++) {
        uint32_t hextet;
        if (parse_hextet(base[i], lens[i], &hextet) < 0) return -1;
        value = (value << 16) | hextet;
    }
    *out = value;
    return 0;
}

static void put_ipv4(struct buf *out, uint32_t v) {
    buf_printf(out, "%u.%u.%u.%u", v >> 24, (v >> 16) & 255, (v >> 8) & 255, v & 255);
}

static void put_ipv6(struct buf *out, u128 v) {
    unsigned hextets[8];
    for (int i = 7; i >= 0; i--) { hextets[i] = (unsigned)(v & 0xFFFF); v >>= 16; }
    int best = -1, best_len = 0, run = -1, run_len = 0;
    for (int i = 0; i < 8; i++) {
        if (hextets[i] == 0) {
            if (run < 0) run = i;
            if (++run_len > best_len) { best_len = run_len; best = run; }
        } else { run = -1; run_len = 0; }
    }
    if (best_len < 2) best = -1;
    for (int i = 0; i < 8; i++) {
        if (i == best) {
            buf_puts(out, i == 0 ? "::" : ":");
            i += best_len - 1;
            continue;
        }
        buf_printf(out, "%x", hextets[i]);
        if (i < 7) buf_putc(out, ':');
    }
}

/* Python's prefix-string check (ascii digits, 0..max) and, for IPv4, a dotted netmask or
 * hostmask. */
static int valid_mask(const char *s, size_t n, int v6) {
    if (ascii_digits(s, n)) {
        size_t i = 0;
        while (i + 1 < n && s[i] == '0') i++;
        if (n - i > 3) return 0;
        unsigned value = 0;
        for (; i < n; i++) value = value * 10 + (unsigned)(s[i] - '0');
        return value <= (v6 ? 128u : 32u);
    }
    uint32_t mask;
    if (v6 || parse_ipv4(s, n, &mask) < 0) return 0;
    uint32_t inverted = ~mask;
    /* a netmask is ones then zeros; a hostmask is zeros then ones */
    return (inverted & (inverted + 1)) == 0 || (mask & (mask + 1)) == 0;
}

/* The integer a JSON int/bool is, when it is one that fits 128 bits and is not negative. */
static int json_address_int(const struct json_doc *doc, int index, u128 *out) {
    const struct json_node *node = &doc->nodes[index];
    if (node->type == JSON_TRUE || node->type == JSON_FALSE) {
        *out = node->type == JSON_TRUE;
        return 0;
    }
    if (!json_is_int(doc, index)) return -1;
    const char *s = doc->text + node->start;
    size_t n = node->end - node->start;
    if (n == 2 && memcmp(s, "-0", 2) == 0) { *out = 0; return 0; }
    if (s[0] == '-' || n > 39) return -1;
    u128 value = 0, most = ~(u128)0;
    for (size_t i = 0; i < n; i++) {
        unsigned digit = (unsigned)(s[i] - '0');
        if (value > (most - digit) / 10) return -1;
        value = value * 10 + digit;
    }
    *out = value;
    return 0;
}

/* str(ipaddress.ip_interface(value).ip) (interface=1) or str(ip_address(value)); -1 when
 * Python would raise ValueError. */
static int normalize_address(const struct json_doc *doc, int index, int interface, struct buf *out) {
    u128 number;
    if (json_address_int(doc, index, &number) == 0) {
        if (number <= 0xFFFFFFFFu) put_ipv4(out, (uint32_t)number);
        else put_ipv6(out, number);
        return 0;
    }
    if (doc->nodes[index].type != JSON_STRING) return -1; /* floats, None, lists, dicts */
    struct buf text = {0};
    json_string(doc, index, &text);
    const char *s = buf_cstr(&text);
    size_t n = text.len, address_len = n;
    const char *slash = memchr(s, '/', n);
    int result = -1;
    if (slash != NULL) {
        if (!interface || memchr(slash + 1, '/', n - (size_t)(slash - s) - 1)) goto done;
        address_len = (size_t)(slash - s);
    }
    uint32_t v4;
    if (parse_ipv4(s, address_len, &v4) == 0 &&
        (slash == NULL || valid_mask(slash + 1, n - address_len - 1, 0))) {
        put_ipv4(out, v4);
        result = 0;
        goto done;
    }
    const char *percent = memchr(s, '%', address_len);
    size_t host_len = percent ? (size_t)(percent - s) : address_len;
    if (percent != NULL) {
        size_t scope_len = address_len - host_len - 1;
        if (scope_len == 0 || memchr(percent + 1, '%', scope_len)) goto done;
    }
    u128 v6;
    if (parse_ipv6(s, host_len, &v6) < 0 ||
        (slash != NULL && !valid_mask(slash + 1, n - address_len - 1, 1)))
        goto done;
    put_ipv6(out, v6);
    if (percent != NULL && !interface) buf_put(out, percent, address_len - host_len);
    result = 0;
done:
    buf_free(&text);
    return result;
}

/* A list of strings: each entry a 4-byte length, then its bytes (a scope id may hold any
 * character, so no separator will do). */
static void list_add(struct buf *list, const char *item, size_t len) {
    uint32_t n = (uint32_t)len;
    buf_put(list, &n, sizeof n);
    buf_put(list, item, len);
}

static int list_has(const struct buf *list, const struct buf *item) {
    for (size_t at = 0; at + sizeof(uint32_t) <= list->len;) {
        uint32_t n;
        memcpy(&n, list->data + at, sizeof n);
        at += sizeof n;
        if (n == item->len && memcmp(list->data + at, item->data, n) == 0) return 1;
        at += n;
    }
    return 0;
}

static void put_string_list(struct buf *json, const struct buf *list) {
    buf_putc(json, '[');
    for (size_t at = 0; at + sizeof(uint32_t) <= list->len;) {
        uint32_t n;
        memcpy(&n, list->data + at, sizeof n);
        if (at) buf_puts(json, ", ");
        at += sizeof n;
        py_dumps_str(json, list->data + at, n);
        at += n;
    }
    buf_putc(json, ']');
}

static int invalid_address(const struct json_doc *doc, int index, int value, int interface,
                           struct cni_error *error) {
    struct buf problem = {0};
    buf_printf(&problem, "prevResult.ips[%d] has an invalid address: ", index);
    if (value < 0) buf_puts(&problem, "None");
    else py_repr(&problem, doc, value);
    buf_printf(&problem, " does not appear to be an IPv4 or IPv6 %s", interface ? "interface" : "address");
    return bad_config(error, &problem);
}

/* Pod IPs (no prefix length) and distinct gateways, "\n"-joined, from prevResult.ips. */
static int pod_addresses(const struct json_doc *doc, int prev_result, struct buf *ips,
                         struct buf *gateways, struct cni_error *error) {
    int entries = prev_result >= 0 ? json_lookup(doc, prev_result, "ips") : -1;
    if (entries < 0) return 0;
    if (doc->nodes[entries].type != JSON_ARRAY) {
        struct buf problem = {0};
        buf_puts(&problem, "prevResult.ips must be a list");
        return bad_config(error, &problem);
    }
    int index = 0;
    for (int entry = json_first_child(doc, entries); entry >= 0; entry = json_next(doc, entry), index++) {
        if (doc->nodes[entry].type != JSON_OBJECT) {
            struct buf problem = {0};
            buf_printf(&problem, "prevResult.ips[%d] must be an object", index);
            return bad_config(error, &problem);
        }
        int address = json_lookup(doc, entry, "address");
        struct buf normal = {0};
        if (address < 0 || normalize_address(doc, address, 1, &normal) < 0) {
            buf_free(&normal);
            return invalid_address(doc, index, address, 1, error);
        }
        list_add(ips, normal.data, normal.len);
        normal.len = 0;
        int gateway = json_lookup(doc, entry, "gateway");
        if (gateway >= 0 && json_truthy(doc, gateway)) {
            if (normalize_address(doc, gateway, 0, &normal) < 0) {
                buf_free(&normal);
                return invalid_address(doc, index, gateway, 0, error);
            }
            if (!list_has(gateways, &normal)) list_add(gateways, normal.data, normal.len);
        }
        buf_free(&normal);
    }
    return 0;
}

int cni_build_request(const struct invocation *invocation, const struct netconf *conf,
                      const struct json_doc *doc, struct buf *request, struct cni_error *error) {
    struct buf ips = {0}, gateways = {0};
    if (pod_addresses(doc, conf->prev_result, &ips, &gateways, error) < 0) {
        buf_free(&ips);
        buf_free(&gateways);
        return -1;
    }
    buf_printf(request, "{\"version\": 1, \"command\": \"%s\", \"containerId\": ", invocation->command);
    py_dumps_str(request, invocation->container_id.data, invocation->container_id.len);
    buf_puts(request, ", \"netns\": ");
    py_dumps_str(request, invocation->netns.data, invocation->netns.len);
    buf_puts(request, ", \"ifName\": ");
    py_dumps_str(request, invocation->if_name.data, invocation->if_name.len);
    buf_puts(request, ", \"args\": ");
    buf_put(request, invocation->args_json.data, invocation->args_json.len);
    buf_puts(request, ", \"ips\": ");
    put_string_list(request, &ips);
    buf_puts(request, ", \"gateways\": ");
    put_string_list(request, &gateways);
    buf_printf(request, ", \"cniVersion\": \"%s\"}", conf->version);
    buf_free(&ips);
    buf_free(&gateways);
    return 0;
}

/* ---------------------------------------------------------------- the agent's reply */

int cni_check_reply(const char *line, size_t len, const char *socket_path, struct cni_error *error) {
    size_t first = 0, last = len;
    while (first < last && strchr(" \t\n\r\v\f", line[first]) && line[first]) first++;
    while (last > first && strchr(" \t\n\r\v\f", line[last - 1]) && line[last - 1]) last--;
    struct buf msg = {0}, details = {0}, why = {0};
    if (first == last) {
        buf_printf(&msg, "pinion agent at %s closed the connection without replying", socket_path);
        cni_error_set(error, ERR_IO, buf_cstr(&msg),
                      "the agent may have crashed while handling this pod; see the agent log");
        buf_free(&msg);
        return 1;
    }
    struct json_doc doc;
    int parsed = json_parse(&doc, line, len, &why) == JSON_OK && doc.nodes[0].type == JSON_OBJECT;
    int ok = parsed ? json_lookup(&doc, 0, "ok") : -1;
    int result = 1;
    if (ok < 0 || (doc.nodes[ok].type != JSON_TRUE && doc.nodes[ok].type != JSON_FALSE)) {
        buf_printf(&msg, "pinion agent at %s sent an invalid reply; expected one JSON object "
                   "with a boolean \"ok\"", socket_path);
        buf_puts(&details, "reply: ");
        py_repr_bytes(&details, line, len < 200 ? len : 200);
        cni_error_set(error, ERR_IO, buf_cstr(&msg), buf_cstr(&details));
    } else if (doc.nodes[ok].type == JSON_TRUE) {
        result = 0;
    } else {
        int code = json_lookup(&doc, 0, "code"), text = json_lookup(&doc, 0, "msg");
        int more = json_lookup(&doc, 0, "details");
        if (text >= 0 && doc.nodes[text].type == JSON_STRING && doc.nodes[text].end - doc.nodes[text].start > 2)
            json_string(&doc, text, &msg);
        else buf_puts(&msg, "pinion agent refused the request without saying why");
        if (more >= 0 && doc.nodes[more].type == JSON_STRING) json_string(&doc, more, &details);
        else if (more >= 0) py_dumps(&details, &doc, more);
        cni_error_set(error, ERR_AGENT_REFUSED, "", "");
        buf_put(&error->msg, msg.data, msg.len);
        buf_put(&error->details, details.data, details.len);
        const struct json_node *node = code >= 0 ? &doc.nodes[code] : NULL;
        size_t digits = node ? node->end - node->start : 0;
        if (node != NULL && json_is_int(&doc, code) && doc.text[node->start] != '-' &&
            !(digits == 1 && doc.text[node->start] == '0') && digits < sizeof error->code) {
            memcpy(error->code, doc.text + node->start, digits);
            error->code[digits] = '\0';
        }
    }
    json_free(&doc);
    buf_free(&msg);
    buf_free(&details);
    buf_free(&why);
    return result;
}
