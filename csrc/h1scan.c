/* h1scan: see h1scan.h for the accepted shape and why it is narrow. */
#include "h1scan.h"

#include <string.h>

const char *const h1_method_names[H1_METHODS] = {"GET", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"};

/* RFC 9110 tchar */
static int is_tchar(uint8_t c) {
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'))
        return 1;
    return c != 0 && strchr("!#$%&'*+-.^_`|~", c) != NULL;
}

/* origin-form characters: unreserved, sub-delims, ":@/?%" (no '#', no quotes, no brackets) */
static int is_target_char(uint8_t c) {
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'))
        return 1;
    return c != 0 && strchr("-._~!$&'()*+,;=:@/?%", c) != NULL;
}

static int is_text(uint8_t c) { return c == '\t' || (c >= 0x20 && c <= 0x7e); }

/* The three classes above as one table, made from them when the library loads: the loops
 * over a head's bytes cost a load and a test per byte instead of the compares (and strchr)
 * of the functions: the head scan was most of the fast path's per-request cost (issue #16). */
enum { CLASS_TCHAR = 1, CLASS_TEXT = 2, CLASS_TARGET = 4 };
static uint8_t classes[256];

/* 8 bytes at once, all printable ASCII (0x20..0x7e)? Bit Twiddling Hacks' hasless(x, 0x20)
 * and hasmore(x, 0x7e): each is zero exactly when no byte is below / above. Field values are
 * most of a head's bytes; the byte loop after it decides the rest (tab, CR) as before. */
static int printable8(const uint8_t *p) {
    const uint64_t ones = 0x0101010101010101ULL, highs = 0x8080808080808080ULL;
    uint64_t w;
    memcpy(&w, p, sizeof w);
    return (((w - ones * 0x20) & ~w & highs) | (((w + ones * (127 - 0x7e)) | w) & highs)) == 0;
}

__attribute__((constructor)) static void make_classes(void) {
    int c;
    for (c = 0; c < 256; c++)
        classes[c] = (uint8_t)((is_tchar((uint8_t)c) ? CLASS_TCHAR : 0) |
                               (is_text((uint8_t)c) ? CLASS_TEXT : 0) |
                               (is_target_char((uint8_t)c) ? CLASS_TARGET : 0));
}

static int name_is(const uint8_t *name, size_t length, const char *lower) {
    size_t i;
    if (strlen(lower) != length)
        return 0;
    for (i = 0; i < length; i++) {
        uint8_t c = name[i];
        if (c >= 'A' && c <= 'Z')
            c = (uint8_t)(c - 'A' + 'a');
        if (c != (uint8_t)lower[i])
            return 0;
    }
    return 1;
}

/* Header lines from `pos` to the empty line; fills out->head_length and the framing. */
static int scan_fields(const uint8_t *p, size_t n, size_t pos, h1_head *out) {
    int seen_length = 0, seen_encoding = 0, seen_connection = 0;
    out->content_length = 0;
    out->chunked = 0;
    out->keep_alive = out->close = 0;
    for (;;) {
        size_t name, name_length, value, value_end;
        if (pos + 2 > n)
            return 0;
        if (p[pos] == '\r') {
            if (p[pos + 1] != '\n')
                return 0;
            if (seen_length && seen_encoding)
                return 0; /* llhttp refuses both */
            out->head_length = pos + 2;
            out->has_length = seen_length || seen_encoding;
            return 1;
        }
        name = pos;
        while (pos < n && (classes[p[pos]] & CLASS_TCHAR))
            pos++;
        name_length = pos - name;
        if (name_length == 0 || pos >= n || p[pos] != ':')
            return 0;
        pos++;
        while (pos < n && (p[pos] == ' ' || p[pos] == '\t'))
            pos++;
        value = pos;
        while (pos + 8 <= n && printable8(p + pos))
            pos += 8;
        while (pos < n && (classes[p[pos]] & CLASS_TEXT))
            pos++;
        value_end = pos;
        if (pos + 2 > n || p[pos] != '\r' || p[pos + 1] != '\n')
            return 0;
        pos += 2;
        if (value_end > value && (p[value_end - 1] == ' ' || p[value_end - 1] == '\t'))
            return 0; /* trailing whitespace: leave it to llhttp */
        if (name_is(p + name, name_length, "content-length")) {
            uint64_t length = 0;
            size_t i;
            if (seen_length || value_end == value || value_end - value > 15)
                return 0;
            for (i = value; i < value_end; i++) {
                if (p[i] < '0' || p[i] > '9')
                    return 0;
                length = length * 10 + (uint64_t)(p[i] - '0');
            }
            seen_length = 1;
            out->content_length = length;
        } else if (name_is(p + name, name_length, "transfer-encoding")) {
            /* exactly one "chunked", nothing else (gzip, lists, repeats: llhttp's business) */
            if (seen_encoding || !name_is(p + value, value_end - value, "chunked"))
                return 0;
            seen_encoding = 1;
            out->chunked = 1;
        } else if (name_is(p + name, name_length, "connection")) {
            /* one Connection header, "keep-alive" or "close"; anything else (upgrade, a
             * list, both) changes the framing or the connection's fate: llhttp's business */
            if (seen_connection)
                return 0;
            seen_connection = 1;
            if (name_is(p + value, value_end - value, "keep-alive"))
                out->keep_alive = 1;
            else if (name_is(p + value, value_end - value, "close"))
                out->close = 1;
            else
                return 0;
        } else if (name_is(p + name, name_length, "proxy-connection") ||
                   name_is(p + name, name_length, "upgrade")) {
            return 0;
        }
    }
}

static int match(const uint8_t *p, size_t n, size_t pos, const char *literal) {
    size_t length = strlen(literal);
    return pos + length <= n && memcmp(p + pos, literal, length) == 0;
}

int h1_scan_request(const uint8_t *data, size_t length, h1_head *out) {
    size_t n = length < H1_MAX_HEAD ? length : H1_MAX_HEAD, pos = 0, target;
    int method, version10;
    for (method = 0; method < H1_METHODS; method++) {
        const char *name = h1_method_names[method];
        if (match(data, n, 0, name) && n > strlen(name) && data[strlen(name)] == ' ')
            break;
    }
    if (method == H1_METHODS)
        return 0;
    pos = strlen(h1_method_names[method]) + 1;
    target = pos;
    if (pos >= n || data[pos] != '/')
        return 0;
    while (pos < n && (classes[data[pos]] & CLASS_TARGET))
        pos++;
    if (pos == target)
        return 0;
    if (match(data, n, pos, " HTTP/1.1\r\n"))
        version10 = 0;
    else if (match(data, n, pos, " HTTP/1.0\r\n"))
        version10 = 1;
    else
        return 0;
    out->method = method;
    out->status = 0;
    if (!scan_fields(data, n, pos + 11, out))
        return 0;
    if (version10 && out->chunked)
        return 0; /* chunked in HTTP/1.0: llhttp's business */
    /* llhttp's should_keep_alive: HTTP/1.1 unless "close", HTTP/1.0 only with "keep-alive" */
    out->closes = version10 ? !out->keep_alive : out->close;
    return 1;
}

int h1_scan_response(const uint8_t *data, size_t length, h1_head *out) {
    size_t n = length < H1_MAX_HEAD ? length : H1_MAX_HEAD, pos;
    int status, i;
    if (!match(data, n, 0, "HTTP/1.1 ") || n < 13)
        return 0;
    status = 0;
    for (i = 9; i < 12; i++) {
        if (data[i] < '0' || data[i] > '9')
            return 0;
        status = status * 10 + (data[i] - '0');
    }
    if (status < 200 || status > 599 || data[12] != ' ')
        return 0;
    pos = 13;
    while (pos < n && (classes[data[pos]] & CLASS_TEXT))
        pos++;
    if (!match(data, n, pos, "\r\n"))
        return 0;
    out->method = -1;
    out->status = status;
    if (!scan_fields(data, n, pos + 2, out))
        return 0;
    out->closes = out->close; /* HTTP/1.1: alive unless "Connection: close" */
    if (status == 204 || status == 304) { /* never a body, whatever the head says (llhttp too) */
        out->content_length = 0;
        out->chunked = 0;
        out->has_length = 1;
        return 1;
    }
    /* neither Content-Length nor chunked: the body runs to the close (llhttp: "read until EOF") */
    return out->has_length;
}

/* ------------------------------------------------------------------------ bodies */

void h1_start_body(h1_body *body, const h1_head *head) {
    body->digits = 0;
    body->left = 0;
    if (head->chunked)
        body->state = H1_CHUNK_SIZE;
    else if (head->content_length)
        body->state = H1_BODY_LENGTH, body->left = head->content_length;
    else
        body->state = H1_BODY_NONE;
}

static int hex_value(uint8_t c) {
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

int h1_walk_body(h1_body *body, const uint8_t *data, size_t length, size_t *pos) {
    while (*pos < length) {
        uint8_t c = data[*pos];
        size_t available = length - *pos;
        switch (body->state) {
        case H1_BODY_LENGTH:
        case H1_CHUNK_DATA: {
            uint64_t skip = (uint64_t)available < body->left ? (uint64_t)available : body->left;
            body->left -= skip;
            *pos += (size_t)skip;
            if (body->left == 0) {
                if (body->state == H1_BODY_LENGTH) {
                    body->state = H1_BODY_NONE;
                    return 1;
                }
                body->state = H1_CHUNK_DATA_CR;
            }
            continue;
        }
        case H1_CHUNK_SIZE:
            if (hex_value(c) >= 0 && body->digits < H1_MAX_CHUNK_DIGITS) {
                body->left = body->left * 16 + (uint64_t)hex_value(c);
                body->digits++;
            } else if (c == '\r' && body->digits > 0) {
                body->state = H1_CHUNK_SIZE_LF;
            } else {
                return -1;
            }
            break;
        case H1_CHUNK_SIZE_LF:
            if (c != '\n')
                return -1;
            body->state = body->left ? H1_CHUNK_DATA : H1_CHUNK_LAST_CR;
            body->digits = 0;
            break;
        case H1_CHUNK_DATA_CR:
        case H1_CHUNK_LAST_CR:
            if (c != '\r')
                return -1;
            body->state = body->state == H1_CHUNK_DATA_CR ? H1_CHUNK_DATA_LF : H1_CHUNK_LAST_LF;
            break;
        case H1_CHUNK_DATA_LF:
            if (c != '\n')
                return -1;
            body->state = H1_CHUNK_SIZE, body->left = 0, body->digits = 0;
            break;
        case H1_CHUNK_LAST_LF:
            if (c != '\n')
                return -1;
            body->state = H1_BODY_NONE;
            *pos += 1;
            return 1;
        default:
            return 0; /* H1_BODY_NONE: not in a body */
        }
        *pos += 1;
    }
    return 0;
}

/* ------------------------------------------------------------------ Host */

static int is_space_or_tab(uint8_t c) { return c == ' ' || c == '\t'; }

/* The value of a Host line whose CRLF starts at data[at] (the regex's leftmost attempt at
 * `at`): its offset in *value and length, or 0 when there is none at `at`. Every repetition
 * in the pattern is of a class the next element cannot start with, so matching greedily
 * without backtracking finds what the regex finds. */
static size_t host_line_at(const uint8_t *p, size_t n, size_t at, size_t *value) {
    static const char host[] = "host";
    size_t pos = at + 2, start, i;
    if (at + 2 > n || p[at] != '\r' || p[at + 1] != '\n' || pos + 4 > n)
        return 0;
    for (i = 0; i < 4; i++)
        if ((p[pos + i] | 0x20) != (uint8_t)host[i])
            return 0;
    pos += 4;
    while (pos < n && is_space_or_tab(p[pos]))
        pos++;
    if (pos >= n || p[pos] != ':')
        return 0;
    pos++;
    while (pos < n && is_space_or_tab(p[pos]))
        pos++;
    start = pos;
    while (pos < n && p[pos] >= '!' && p[pos] <= '~' && pos - start < H1_MAX_HOST)
        pos++;
    if (pos == start || (pos < n && p[pos] >= '!' && p[pos] <= '~'))
        return 0; /* empty, or longer than 300: [!-~]{1,300} cannot be followed by [!-~] */
    *value = start;
    i = pos - start;
    while (pos < n && is_space_or_tab(p[pos]))
        pos++;
    if (pos + 2 > n || p[pos] != '\r' || p[pos + 1] != '\n')
        return 0;
    return i;
}

static int is_lower_alnum(uint8_t c) { return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9'); }

/* `(:[0-9]{1,5})?` then the end, from s[pos]. */
static int port_then_end(const char *s, size_t n, size_t pos) {
    size_t digits = 0;
    if (pos == n)
        return 1;
    if (s[pos] != ':')
        return 0;
    for (pos++; pos < n; pos++, digits++)
        if (s[pos] < '0' || s[pos] > '9')
            return 0;
    return digits >= 1 && digits <= 5;
}

/* fullmatch of [a-z0-9][a-z0-9.\-]{0,252}(:[0-9]{1,5})? | \[[0-9a-f:.]{2,45}\](:[0-9]{1,5})? */
static int is_authority(const char *s, size_t n) {
    size_t pos = 1;
    if (n == 0)
        return 0;
    if (is_lower_alnum((uint8_t)s[0])) {
        while (pos < n && (is_lower_alnum((uint8_t)s[pos]) || s[pos] == '.' || s[pos] == '-'))
            pos++;
        return pos <= 253 && port_then_end(s, n, pos);
    }
    if (s[0] != '[')
        return 0;
    while (pos < n && ((s[pos] >= '0' && s[pos] <= '9') || (s[pos] >= 'a' && s[pos] <= 'f') ||
                       s[pos] == ':' || s[pos] == '.'))
        pos++;
    if (pos - 1 < 2 || pos - 1 > 45 || pos >= n || s[pos] != ']')
        return 0;
    return port_then_end(s, n, pos + 1);
}

size_t h1_host_in(const uint8_t *data, size_t length, char out[H1_MAX_HOST]) {
    size_t at = 0, value = 0, found = 0, i;
    for (;;) {
        const uint8_t *cr = at < length ? memchr(data + at, '\r', length - at) : NULL;
        if (cr == NULL)
            return 0;
        at = (size_t)(cr - data);
        if ((found = host_line_at(data, length, at, &value)) != 0)
            break;
        at++;
    }
    for (i = 0; i < found; i++) {
        uint8_t c = data[value + i];
        out[i] = (char)(c >= 'A' && c <= 'Z' ? c + ('a' - 'A') : c);
    }
    return is_authority(out, found) ? found : 0;
}
